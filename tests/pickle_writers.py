"""Writers of the pickles the official FLAME files are: Python-2 cPickle output and chumpy
objects (through stand-in `chumpy` modules that are removed again before loading).

Shared by tests/test_io.py and tests/test_safe_pickle.py.
"""

import pickle
import struct
import sys
import types
import weakref

import numpy as np
import pytest


class Py2Pickler(pickle._Pickler):
    """Writes what Python 2's cPickle wrote: `bytes`/`str` as py2 `str` (BINSTRING) and the old
    module names `numpy.core.multiarray` / `scipy.sparse.csc`, so loading needs latin1."""

    renames = {"numpy._core.multiarray": "numpy.core.multiarray",
               "scipy.sparse._csc": "scipy.sparse.csc"}
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str

    def save_global(self, obj, name=None):
        module = getattr(obj, "__module__", None)
        if module in self.renames:
            self.write(pickle.GLOBAL + f"{self.renames[module]}\n{obj.__name__}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


def write_py2_pickle(obj, path, protocol=2):
    with open(path, "wb") as handle:
        Py2Pickler(handle, protocol=protocol).dump(obj)


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
