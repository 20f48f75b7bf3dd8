"""Writers of the pickles the official FLAME files are: Python-2 cPickle output
(`recon.training.fakes.write_py2_pickle`) and chumpy objects (through stand-in `chumpy` modules
that are removed again before loading).

Shared by tests/test_io.py and tests/test_safe_pickle.py.
"""

import sys
import types
import weakref

import numpy as np
import pytest

# The Python-2 pickler lives in the library, which writes the fake FLAME 2020 files of the paper
# smoke run with it.
from recon.training.fakes import Py2Pickler, write_py2_pickle  # noqa: F401


def make_fake_chumpy():
    """Modules `chumpy`, `chumpy.ch`, `chumpy.ch_ops`, `chumpy.reordering` whose classes pickle
    like the real ones: plain `object` subclasses (so protocol 2 emits NEWOBJ with no args, and
    protocol 0 `copy_reg._reconstructor`) whose `__getstate__` is the instance `__dict__` minus
    the weak-reference `_parents` / `_cache` entries (chumpy/ch.py)."""

    class Ch:
        def __init__(self, x=None, **terms):
            self.__dict__.update(_dirty_vars=set(), _itr=None, _depends_on_deps={},
                                 _make_dense=False, _make_sparse=False,
                                 _parents=weakref.WeakKeyDictionary(),
                                 _cache={"r": None, "drs": weakref.WeakKeyDictionary()})
            if x is not None:
                self.__dict__["x"] = np.asarray(x, np.float64)
            self.__dict__.update(terms)

        def __getstate__(self):
            state = dict(self.__dict__)
            del state["_parents"]
            del state["_cache"]
            return state

    class Select(Ch):
        pass

    class dot(Ch):  # noqa: N801 (chumpy's name)
        pass

    modules = {name: types.ModuleType(name)
               for name in ("chumpy", "chumpy.ch", "chumpy.ch_ops", "chumpy.reordering")}
    for cls, module in ((Ch, "chumpy.ch"), (Select, "chumpy.reordering"),
                        (dot, "chumpy.ch_ops")):
        cls.__module__, cls.__qualname__ = module, cls.__name__
        setattr(modules[module], cls.__name__, cls)
    modules["chumpy"].Ch = Ch
    return modules, Ch, Select, dot


@pytest.fixture()
def fake_chumpy(monkeypatch):
    """Yields (Ch, Select, dot) while the fake modules are importable; removes them afterwards
    (and checks no real chumpy is around either)."""
    modules, ch, select, dot = make_fake_chumpy()
    with monkeypatch.context() as patch:
        for name, module in modules.items():
            patch.setitem(sys.modules, name, module)
        yield ch, select, dot
    assert "chumpy" not in sys.modules and "chumpy.ch" not in sys.modules
