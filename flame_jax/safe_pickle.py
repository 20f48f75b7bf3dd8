"""The restricted unpickler: the security boundary of every pickle we read.

`restricted_unpickle` admits only an allow-list of globals (numpy array reconstruction, scipy
sparse matrices rebuilt from their arrays, a few inert builtins, and inert stand-ins for chumpy
classes). A pickle naming any other global (`os.system`, `builtins.eval`, `subprocess.Popen`,
torch classes, ...) is refused in `find_class`, *before* anything is called, so loading an
untrusted file cannot run code. Persistent ids (torch zip checkpoints) are refused unless the
caller passes a `persistent_load` callable that resolves them.

Pickled `.npy` files (object arrays, e.g. FLAME's dynamic landmark embedding) are read by
`load_npy` through the same unpickler, never with `np.load(allow_pickle=True)`.

Every failure raises `flame_jax.FlameFileError` naming the source (file path).
"""

from __future__ import annotations

import _compat_pickle
import io as _io
import os
import pickle
import struct
from typing import Any, BinaryIO, Callable, Mapping, Optional, Union

import numpy as np
import scipy.sparse

from flame_jax.errors import FlameFileError
from flame_jax.fileio import describe_content, open_binary, sniff

PathLike = Union[str, os.PathLike]


class ChumpyStandIn:
    """Inert replacement for a chumpy class met while unpickling.

    chumpy's `Ch.__getstate__` returns the instance `__dict__` minus its weak-reference caches, so
    the pickled state is a dict; for a plain `Ch` its `'x'` holds the float64 array, for an
    operator node (e.g. `chumpy.reordering.Select`) it holds the operands. `chumpy_class` is the
    original `module.name`. Nothing of chumpy is imported or executed.
    """

    chumpy_class = "chumpy.ch.Ch"

    def __init__(self, *args, **kwargs):
        self.state = {"args": args, **kwargs}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}

    def __repr__(self):
        return f"<chumpy stand-in {self.chumpy_class} keys={sorted(map(str, self.state))}>"


class SparseStandIn:
    """Inert replacement for a pickled scipy sparse matrix; `to_scipy()` rebuilds it.

    Rebuilding from `(data, indices, indptr, shape)` instead of unpickling scipy's class keeps
    old files (module `scipy.sparse.csc`, attribute `_shape` or `shape`) readable on any scipy.
    """

    sparse_format = "csc"

    def __init__(self, *args, **kwargs):
        self.state = {}

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"state": state}

    def to_scipy(self):
        state = self.state
        shape = state.get("_shape", state.get("shape"))
        missing = [k for k in ("data", "indices", "indptr") if k not in state]
        if missing or shape is None:
            raise ValueError(f"pickled sparse matrix lacks {missing or ['shape']}")
        make = scipy.sparse.csc_matrix if self.sparse_format == "csc" else scipy.sparse.csr_matrix
        return make((np.asarray(state["data"]), np.asarray(state["indices"]),
                     np.asarray(state["indptr"])), shape=tuple(int(s) for s in shape))


_CHUMPY_MODULES = ("chumpy", "chumpy.ch", "chumpy.ch_ops", "chumpy.reordering")
_stand_in_classes: dict = {}


def _chumpy_stand_in(module: str, name: str) -> type:
    key = (module, name)
    if key not in _stand_in_classes:
        _stand_in_classes[key] = type(name, (ChumpyStandIn,), {"chumpy_class": f"{module}.{name}"})
    return _stand_in_classes[key]


def _sparse_stand_in(fmt: str) -> type:
    key = ("sparse", fmt)
    if key not in _stand_in_classes:
        _stand_in_classes[key] = type(f"{fmt}_matrix", (SparseStandIn,), {"sparse_format": fmt})
    return _stand_in_classes[key]


def _safe_codecs_encode(text, encoding="utf-8", errors="strict"):
    """Python 3 pickles of `bytes` at protocol <= 2 call `_codecs.encode(str, 'latin1')`."""
    if str(encoding).lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return str(text).encode("latin1", errors)


def _safe_reconstructor(cls, base, state):
    """Protocol 0/1 pickles of new-style objects call `copy_reg._reconstructor(cls, object, None)`.

    Only our inert stand-ins may be built this way (the real one would call `base.__init__`)."""
    if not (isinstance(cls, type) and issubclass(cls, (ChumpyStandIn, SparseStandIn))
            and base is object and state is None):
        raise pickle.UnpicklingError(f"copy_reg._reconstructor({cls!r}, {base!r}) is not allowed")
    return object.__new__(cls)


def _numpy_globals() -> dict:
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric

    out = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for prefix in ("numpy.core", "numpy._core"):
        out[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        out[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        out[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType", "UInt32DType",
                 "UInt64DType", "ObjectDType", "BoolDType", "Int16DType", "UInt8DType"):
        if hasattr(np.dtypes, name):
            out[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    return out


def _default_allowed() -> dict:
    allowed = _numpy_globals()
    allowed.update({
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
        ("builtins", "object"): object, ("builtins", "slice"): slice,
        ("builtins", "complex"): complex, ("builtins", "bytearray"): bytearray,
        ("_codecs", "encode"): _safe_codecs_encode,
        ("copyreg", "_reconstructor"): _safe_reconstructor,
    })
    for fmt in ("csc", "csr"):
        for module in (f"scipy.sparse.{fmt}", f"scipy.sparse._{fmt}"):
            allowed[(module, f"{fmt}_matrix")] = _sparse_stand_in(fmt)
            allowed[(module, f"{fmt}_array")] = _sparse_stand_in(fmt)
    return allowed


DEFAULT_ALLOWED_GLOBALS: Mapping = _default_allowed()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, *, allowed: Mapping, allow_chumpy: bool, source: str,
                 persistent_load: Optional[Callable[[Any], Any]], **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = allowed
        self._allow_chumpy = allow_chumpy
        self._source = source
        self._persistent_load = persistent_load

    def find_class(self, module, name):
        # Python-2 names (`copy_reg`, `__builtin__`) reach us raw; map them like pickle would.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        if self._allow_chumpy and module in _CHUMPY_MODULES and name.isidentifier():
            return _chumpy_stand_in(module, name)
        hint = ""
        if module.split(".")[0] == "torch":
            hint = " (the file holds torch tensors; convert it to numpy arrays first)"
        raise FlameFileError(f"{self._source}: pickle refers to the forbidden global "
                             f"{module}.{name}; refusing to load it{hint}")

    def persistent_load(self, pid):
        if self._persistent_load is None:
            raise FlameFileError(f"{self._source}: pickle uses persistent ids ({pid!r}), which "
                                 f"are refused unless a persistent_load callable is given "
                                 f"(torch-style files)")
        return self._persistent_load(pid)


def restricted_unpickle(fileobj_or_bytes: Union[bytes, bytearray, BinaryIO], *,
                        allowed: Optional[Mapping] = None, allow_chumpy: bool = True,
                        source: str = "<pickle>", encoding: str = "latin1",
                        persistent_load: Optional[Callable[[Any], Any]] = None) -> Any:
    """Unpickle data while admitting only allow-listed globals; never executes foreign code.

    Args:
      fileobj_or_bytes: the pickle bytes or a binary file object positioned at the pickle.
      allowed: {(module, name): object} the globals a pickle may name, with Python-3 module
        names (Python-2 names are mapped first). Default `DEFAULT_ALLOWED_GLOBALS`: numpy array,
        scalar and dtype reconstruction (numpy.core and numpy._core names), scipy CSC/CSR
        matrices (as `SparseStandIn`), `set`, `frozenset`, `object`, `slice`, `complex`,
        `bytearray`, latin-1 `_codecs.encode` and a `copy_reg._reconstructor` limited to the
        stand-ins.
      allow_chumpy: map classes of `chumpy`, `chumpy.ch`, `chumpy.ch_ops`, `chumpy.reordering`
        to inert `ChumpyStandIn` subclasses.
      source: name used in error messages (the file path).
      encoding: how Python-2 `str` objects are decoded; latin1 keeps numpy buffers intact.
      persistent_load: callable(pid) -> object resolving persistent ids (e.g. the storages of a
        torch zip checkpoint: pid = ('storage', storage_type, key, location, numel)); the
        callable sees only the pid tuple, the globals inside it were already allow-listed.
        None (default) refuses any persistent id with `FlameFileError`.

    Returns the unpickled object (chumpy values stay `ChumpyStandIn`; see `chumpy_to_numpy`).
    Raises `FlameFileError` naming `source` for a forbidden global or a truncated/corrupt pickle.
    """
    allowed = DEFAULT_ALLOWED_GLOBALS if allowed is None else allowed
    if isinstance(fileobj_or_bytes, (bytes, bytearray, memoryview)):
        fileobj_or_bytes = _io.BytesIO(bytes(fileobj_or_bytes))
    unpickler = _RestrictedUnpickler(fileobj_or_bytes, allowed=allowed, allow_chumpy=allow_chumpy,
                                     source=source, encoding=encoding,
                                     persistent_load=persistent_load)
    try:
        return unpickler.load()
    except FlameFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, UnicodeError, OverflowError, MemoryError,
            RecursionError) as exc:
        raise FlameFileError(f"{source}: truncated or corrupt pickle "
                             f"({type(exc).__name__}: {exc})") from exc


def chumpy_to_numpy(value: Any, *, what: str = "value", source: str = "<pickle>") -> Any:
    """Replace chumpy stand-ins / sparse stand-ins by numpy / scipy objects; others unchanged.

    Supports a plain `Ch` (its `'x'`) and `chumpy.reordering.Select` (`a.ravel()[idxs]` reshaped
    to `preferred_shape`, the one operator found in official body-model pickles); any other
    chumpy operator raises `FlameFileError` naming it and `what`.
    """
    if isinstance(value, SparseStandIn):
        try:
            return value.to_scipy()
        except (ValueError, TypeError, IndexError) as exc:
            raise FlameFileError(f"{source}: {what}: bad sparse matrix ({exc})") from exc
    if not isinstance(value, ChumpyStandIn):
        return value
    state, kind = value.state, value.chumpy_class
    if kind.endswith(".Ch") and "x" in state:
        return np.asarray(chumpy_to_numpy(state["x"], what=what, source=source))
    if kind.endswith("reordering.Select") and "a" in state and "idxs" in state:
        operand = np.asarray(chumpy_to_numpy(state["a"], what=what, source=source))
        result = operand.ravel()[np.asarray(state["idxs"]).ravel()]
        if "preferred_shape" in state:
            result = result.reshape(state["preferred_shape"])
        return result
    raise FlameFileError(f"{source}: {what} is a chumpy expression {kind} with state keys "
                         f"{sorted(map(str, state))}; only plain Ch arrays and Select are "
                         f"supported without chumpy")


def load_npy(path_or_file: Union[PathLike, BinaryIO], *, allowed: Optional[Mapping] = None,
             source: Optional[str] = None) -> Any:
    """Read a `.npy`; an object array (pickle payload) goes through `restricted_unpickle`.

    Returns the array, or for a 0-d object array its single item (e.g. the dict of the FLAME
    dynamic landmark embedding). Raises `FlameFileError` for a bad header or payload.
    """
    if isinstance(path_or_file, (str, os.PathLike)):
        source = source or str(path_or_file)
        with open_binary(path_or_file) as handle:
            return load_npy(handle, allowed=allowed, source=source)
    source = source or "<npy>"
    handle = path_or_file
    try:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(handle)
        elif version in ((2, 0), (3, 0)):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(handle)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, EOFError, OSError, SyntaxError) as exc:
        raise FlameFileError(f"{source}: not a valid .npy file ({exc})") from exc
    if not dtype.hasobject:
        handle.seek(0)
        try:
            return np.load(handle, allow_pickle=False)
        except (ValueError, EOFError, OSError) as exc:
            raise FlameFileError(f"{source}: truncated or corrupt .npy ({exc})") from exc
    array = restricted_unpickle(handle, allowed=allowed, source=source)
    if not isinstance(array, np.ndarray):
        raise FlameFileError(f"{source}: .npy pickle payload is a {type(array).__name__}, "
                             f"not an array")
    if array.shape != tuple(shape):
        raise FlameFileError(f"{source}: .npy payload has shape {array.shape}, header says "
                             f"{tuple(shape)}")
    return array.item() if array.shape == () else array


def load_pickle_file(path: PathLike, *, allowed: Optional[Mapping] = None) -> Any:
    """`restricted_unpickle` of a whole file, with errors naming it (empty file; 'looks like a
    PNG image' hints for well-known non-pickles)."""
    source = str(path)
    head = sniff(path)
    if not head:
        raise FlameFileError(f"{source}: file is empty")
    with open_binary(path) as handle:
        try:
            return restricted_unpickle(handle, allowed=allowed, source=source)
        except FlameFileError as exc:
            hint = describe_content(head)
            if hint:
                raise FlameFileError(f"{exc}{hint}") from exc
            raise


__all__ = ["restricted_unpickle", "load_npy", "load_pickle_file", "chumpy_to_numpy",
           "DEFAULT_ALLOWED_GLOBALS", "ChumpyStandIn", "SparseStandIn"]
