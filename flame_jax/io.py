"""FLAME files -> `FlameModel`, and our own `.npz` back and forth.

`load` reads, without chumpy or torch:
  * the official FLAME 2020 `generic_model.pkl` (a Python-2 pickle whose arrays are chumpy `Ch`
    objects and whose `J_regressor` is a scipy CSC matrix),
  * `flame2023_Open.pkl` (the same keys as plain numpy / scipy objects),
  * an `.npz` with the official keys (`f`, `weights`, `J_regressor` dense, ...),
  * our own `.npz` written by `save` (the layout of `flame_jax.model.to_numpy`).

Every pickle goes through `restricted_unpickle`, whose `find_class` admits only an allow-list of
globals (numpy array reconstruction, scipy sparse matrices, a few builtins and inert stand-ins for
chumpy classes). A pickle naming any other global (e.g. `os.system`) is refused *before* anything
is called, so loading an untrusted file cannot run code. Pickled `.npy` files (the dynamic
landmark embedding) are parsed the same way, never with `np.load(allow_pickle=True)`.

Errors: every problem with a file raises `FlameFileError` (a `ValueError`) whose message names the
file and the problem. A path that does not exist raises `FlameFileNotFoundError`, a subclass of
both `FlameFileError` and `FileNotFoundError`, so either `except` clause catches it.
"""

from __future__ import annotations

import _compat_pickle
import io as _io
import os
import pathlib
import pickle
import struct
import tempfile
import zipfile
from typing import Any, BinaryIO, Mapping, Optional, Union

import jax.numpy as jnp
import numpy as np
import scipy.sparse

from flame_jax.model import FLAME_PARENTS, NUM_CONTOUR_LANDMARKS, NUM_DYNAMIC_BINS, FlameModel
from flame_jax.model import to_numpy

PathLike = Union[str, os.PathLike]

NUM_IDENTITY_COMPONENTS = 300  # official shapedirs: first 300 identity, the rest expression
NUM_POSE_FEATURES = 36  # 4 non-root joints x 9 entries of (R - I)
DEFAULT_LANDMARK_EMBEDDING = (pathlib.Path(__file__).resolve().parent / "assets"
                              / "flame_landmark_embedding_ringnet.npz")

_ZIP_MAGIC = b"PK\x03\x04"
_NPY_MAGIC = b"\x93NUMPY"
_KNOWN_NON_PICKLES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                      (b"GIF8", "a GIF image"), (b"%PDF", "a PDF document"),
                      (b"ply", "a PLY mesh"), (b"\x1f\x8b", "a gzip archive"))


class FlameFileError(ValueError):
    """A FLAME-related file is missing, corrupt, of the wrong kind or holds bad arrays.

    The message names the file and the problem (missing key, wrong shape, non-finite values,
    truncated or corrupt content, forbidden pickle global)."""


class FlameFileNotFoundError(FlameFileError, FileNotFoundError):
    """The path does not exist (catchable as `FlameFileError` or `FileNotFoundError`)."""


# ---------------------------------------------------------------------------------------------
# Restricted unpickling
# ---------------------------------------------------------------------------------------------


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
    def __init__(self, file, *, allowed: Mapping, allow_chumpy: bool, source: str, **kwargs):
        super().__init__(file, **kwargs)
        self._allowed = allowed
        self._allow_chumpy = allow_chumpy
        self._source = source

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
        raise FlameFileError(f"{self._source}: pickle uses persistent ids ({pid!r}), which are "
                             f"not supported (torch-style files are refused)")


def restricted_unpickle(fileobj_or_bytes: Union[bytes, bytearray, BinaryIO], *,
                        allowed: Optional[Mapping] = None, allow_chumpy: bool = True,
                        source: str = "<pickle>", encoding: str = "latin1") -> Any:
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

    Returns the unpickled object (chumpy values stay `ChumpyStandIn`; see `chumpy_to_numpy`).
    Raises `FlameFileError` naming `source` for a forbidden global or a truncated/corrupt pickle.
    """
    allowed = DEFAULT_ALLOWED_GLOBALS if allowed is None else allowed
    if isinstance(fileobj_or_bytes, (bytes, bytearray, memoryview)):
        fileobj_or_bytes = _io.BytesIO(bytes(fileobj_or_bytes))
    unpickler = _RestrictedUnpickler(fileobj_or_bytes, allowed=allowed, allow_chumpy=allow_chumpy,
                                     source=source, encoding=encoding)
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
        with _open_binary(path_or_file) as handle:
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


# ---------------------------------------------------------------------------------------------
# File helpers
# ---------------------------------------------------------------------------------------------


def _open_binary(path: PathLike) -> BinaryIO:
    path = pathlib.Path(path)
    if not path.exists():
        raise FlameFileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise FlameFileError(f"{path}: is a directory, expected a file")
    return open(path, "rb")


def _sniff(path: PathLike) -> bytes:
    with _open_binary(path) as handle:
        return handle.read(8)


def _describe_non_pickle(head: bytes) -> str:
    for magic, kind in _KNOWN_NON_PICKLES:
        if head.startswith(magic):
            return f"; the file looks like {kind}"
    return ""


def _load_pickle_file(path: PathLike) -> Any:
    source = str(path)
    head = _sniff(path)
    if not head:
        raise FlameFileError(f"{source}: file is empty")
    with _open_binary(path) as handle:
        try:
            return restricted_unpickle(handle, source=source)
        except FlameFileError as exc:
            hint = _describe_non_pickle(head)
            if hint:
                raise FlameFileError(f"{exc}{hint}") from exc
            raise


def _load_npz(path: PathLike) -> dict:
    """All arrays of an `.npz` (no pickles), as a dict; FlameFileError if unreadable."""
    source = str(path)
    head = _sniff(path)
    if not head.startswith(_ZIP_MAGIC):
        raise FlameFileError(f"{source}: not an .npz (zip) archive{_describe_non_pickle(head)}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise FlameFileError(f"{source}: truncated or corrupt .npz ({type(exc).__name__}: "
                             f"{exc})") from exc


def _require_keys(data: Mapping, keys, source: str, what: str = "file") -> None:
    if not isinstance(data, Mapping):
        raise FlameFileError(f"{source}: expected a dict-like {what}, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise FlameFileError(f"{source}: missing key(s) {missing}; keys present: "
                             f"{sorted(map(str, data))}")


def _array(value: Any, key: str, source: str, *, dtype, shape: tuple) -> np.ndarray:
    """Numpy array of `dtype` with `shape` (None = any size); checks shape and finiteness."""
    value = chumpy_to_numpy(value, what=f"key {key!r}", source=source)
    if scipy.sparse.issparse(value):
        value = value.toarray()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], np.ndarray):
        try:
            value = np.stack(value)
        except ValueError as exc:
            raise FlameFileError(f"{source}: key {key!r}: ragged list of arrays ({exc})") from exc
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise FlameFileError(f"{source}: key {key!r} is not an array ({exc})") from exc
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                     or array.dtype == bool):
        raise FlameFileError(f"{source}: key {key!r} has non-numeric dtype {array.dtype}")
    if len(array.shape) != len(shape) or any(
            want is not None and got != want for got, want in zip(array.shape, shape)):
        expected = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
        raise FlameFileError(f"{source}: key {key!r} has shape {array.shape}, expected "
                             f"{expected}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise FlameFileError(f"{source}: key {key!r} has {bad} NaN/inf value(s)")
    if np.issubdtype(np.dtype(dtype), np.integer) and np.issubdtype(array.dtype, np.floating):
        if not np.all(array == np.round(array)):
            raise FlameFileError(f"{source}: key {key!r} must hold integers")
    return array.astype(dtype)


def _check_index_range(array: np.ndarray, upper: int, key: str, source: str, what: str) -> None:
    if array.size and (array.min() < 0 or array.max() >= upper):
        raise FlameFileError(f"{source}: key {key!r} has {what} indices in "
                             f"[{array.min()}, {array.max()}], outside [0, {upper})")


# ---------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------

_OFFICIAL_KEYS = ("v_template", "f", "shapedirs", "posedirs", "weights", "J_regressor",
                  "kintree_table")
_OWN_KEYS = ("v_template", "shapedirs", "exprdirs", "posedirs", "j_regressor", "lbs_weights",
             "faces", "static_lmk_faces", "static_lmk_bary", "dynamic_lmk_faces",
             "dynamic_lmk_bary", "parents")


def _parents_from_kintree(kintree: np.ndarray, source: str) -> tuple:
    parents = kintree[0].astype(np.int64)
    # The root's parent is stored as -1 or as uint32 max (4294967295) in the official files.
    parents[0] = -1
    return _check_parents(tuple(int(p) for p in parents), source)


def _check_parents(parents: tuple, source: str) -> tuple:
    if parents != FLAME_PARENTS:
        raise FlameFileError(f"{source}: kinematic tree parents {parents} are not FLAME's "
                             f"{FLAME_PARENTS}")
    return parents


def _official_arrays(data: Mapping, source: str) -> dict:
    """Arrays of an official-layout dict (2020 pkl, 2023 pkl or an npz with the same keys)."""
    _require_keys(data, _OFFICIAL_KEYS, source)
    v_template = _array(data["v_template"], "v_template", source, dtype=np.float32,
                        shape=(None, 3))
    num_vertices = v_template.shape[0]
    shapedirs = _array(data["shapedirs"], "shapedirs", source, dtype=np.float32,
                       shape=(num_vertices, 3, None))
    if shapedirs.shape[-1] <= NUM_IDENTITY_COMPONENTS:
        raise FlameFileError(f"{source}: key 'shapedirs' has {shapedirs.shape[-1]} components; "
                             f"the official layout has {NUM_IDENTITY_COMPONENTS} identity "
                             f"components followed by the expression components")
    posedirs = _array(data["posedirs"], "posedirs", source, dtype=np.float32,
                      shape=(num_vertices, 3, NUM_POSE_FEATURES))
    j_regressor = _array(data["J_regressor"], "J_regressor", source, dtype=np.float32,
                         shape=(len(FLAME_PARENTS), num_vertices))
    weights = _array(data["weights"], "weights", source, dtype=np.float32,
                     shape=(num_vertices, len(FLAME_PARENTS)))
    faces = _array(data["f"], "f", source, dtype=np.int64, shape=(None, 3))
    _check_index_range(faces, num_vertices, "f", source, "vertex")
    kintree = _array(data["kintree_table"], "kintree_table", source, dtype=np.int64,
                     shape=(2, len(FLAME_PARENTS)))
    return dict(
        v_template=v_template,
        shapedirs=shapedirs[..., :NUM_IDENTITY_COMPONENTS],
        exprdirs=shapedirs[..., NUM_IDENTITY_COMPONENTS:],
        # smplx layout: (V, 3, 36) -> (V * 3, 36) -> (36, V * 3), so pose_feature @ posedirs.
        posedirs=posedirs.reshape(-1, NUM_POSE_FEATURES).T,
        j_regressor=j_regressor,
        lbs_weights=weights,
        faces=faces.astype(np.int32),
        parents=_parents_from_kintree(kintree, source),
    )


def _own_arrays(data: Mapping, source: str) -> dict:
    """Arrays of our `.npz` (written by `save`), validated like the official ones."""
    _require_keys(data, _OWN_KEYS, source)
    out = {}
    v_template = _array(data["v_template"], "v_template", source, dtype=np.float32,
                        shape=(None, 3))
    num_vertices = v_template.shape[0]
    out["v_template"] = v_template
    out["shapedirs"] = _array(data["shapedirs"], "shapedirs", source, dtype=np.float32,
                              shape=(num_vertices, 3, None))
    out["exprdirs"] = _array(data["exprdirs"], "exprdirs", source, dtype=np.float32,
                             shape=(num_vertices, 3, None))
    out["posedirs"] = _array(data["posedirs"], "posedirs", source, dtype=np.float32,
                             shape=(NUM_POSE_FEATURES, num_vertices * 3))
    out["j_regressor"] = _array(data["j_regressor"], "j_regressor", source, dtype=np.float32,
                                shape=(len(FLAME_PARENTS), num_vertices))
    out["lbs_weights"] = _array(data["lbs_weights"], "lbs_weights", source, dtype=np.float32,
                                shape=(num_vertices, len(FLAME_PARENTS)))
    out["faces"] = _array(data["faces"], "faces", source, dtype=np.int32, shape=(None, 3))
    _check_index_range(out["faces"], num_vertices, "faces", source, "vertex")
    parents = _array(data["parents"], "parents", source, dtype=np.int64,
                     shape=(len(FLAME_PARENTS),))
    out["parents"] = _check_parents(tuple(int(p) for p in parents), source)
    out.update(_landmark_arrays(data, source, "static_lmk_faces", "static_lmk_bary",
                                "dynamic_lmk_faces", "dynamic_lmk_bary"))
    if any(k in data for k in ("mediapipe_lmk_faces", "mediapipe_lmk_bary",
                               "mediapipe_lmk_ids")):
        out.update(_mediapipe_arrays(data, source, "mediapipe_lmk_faces", "mediapipe_lmk_bary",
                                     "mediapipe_lmk_ids"))
    if "albedo_mean" in data or "albedo_basis" in data:
        _require_keys(data, ("albedo_mean", "albedo_basis"), source)
        out["albedo_mean"] = _array(data["albedo_mean"], "albedo_mean", source,
                                    dtype=np.float32, shape=(num_vertices, 3))
        out["albedo_basis"] = _array(data["albedo_basis"], "albedo_basis", source,
                                     dtype=np.float32, shape=(num_vertices, 3, None))
    masks = {key[len("mask_"):]: data[key] for key in data if key.startswith("mask_")}
    if masks:
        out["masks"] = _mask_arrays(masks, num_vertices, source)
    return out


def _landmark_arrays(data: Mapping, source: str, static_faces_key: str, static_bary_key: str,
                     dynamic_faces_key: str, dynamic_bary_key: str) -> dict:
    out = {}
    if static_faces_key is not None:
        faces = _array(data[static_faces_key], static_faces_key, source, dtype=np.int64,
                       shape=(None,))
        out["static_lmk_faces"] = faces.astype(np.int32)
        out["static_lmk_bary"] = _array(data[static_bary_key], static_bary_key, source,
                                        dtype=np.float32, shape=(faces.shape[0], 3))
    if dynamic_faces_key is not None:
        faces = _array(data[dynamic_faces_key], dynamic_faces_key, source, dtype=np.int64,
                       shape=(NUM_DYNAMIC_BINS, NUM_CONTOUR_LANDMARKS))
        out["dynamic_lmk_faces"] = faces.astype(np.int32)
        out["dynamic_lmk_bary"] = _array(data[dynamic_bary_key], dynamic_bary_key, source,
                                         dtype=np.float32,
                                         shape=(NUM_DYNAMIC_BINS, NUM_CONTOUR_LANDMARKS, 3))
    return out


def _mediapipe_arrays(data: Mapping, source: str, faces_key: str, bary_key: str,
                      ids_key: str) -> dict:
    _require_keys(data, (faces_key, bary_key, ids_key), source)
    faces = _array(data[faces_key], faces_key, source, dtype=np.int64, shape=(None,))
    count = faces.shape[0]
    return dict(
        mediapipe_lmk_faces=faces.astype(np.int32),
        mediapipe_lmk_bary=_array(data[bary_key], bary_key, source, dtype=np.float32,
                                  shape=(count, 3)),
        mediapipe_lmk_ids=_array(data[ids_key], ids_key, source, dtype=np.int32,
                                 shape=(count,)),
    )


def _mask_arrays(masks: Mapping, num_vertices: int, source: str) -> dict:
    out = {}
    for name, indices in masks.items():
        key = str(name)
        array = _array(indices, key, source, dtype=np.int64, shape=(None,))
        _check_index_range(array, num_vertices, key, source, "vertex")
        out[key] = array.astype(np.int32)
    return out


def _read_model_file(path: PathLike) -> dict:
    source = str(path)
    head = _sniff(path)
    if head.startswith(_NPY_MAGIC):
        raise FlameFileError(f"{source}: is a single .npy array, not a FLAME model (.pkl/.npz)")
    if head.startswith(_ZIP_MAGIC):
        data = _load_npz(path)
        if "exprdirs" in data or "j_regressor" in data:
            return _own_arrays(data, source)
        return _official_arrays(data, source)
    data = _load_pickle_file(path)
    if not isinstance(data, dict):
        raise FlameFileError(f"{source}: expected a pickled dict of FLAME arrays, got "
                             f"{type(data).__name__}")
    return _official_arrays(data, source)


# ---------------------------------------------------------------------------------------------
# Auxiliary files
# ---------------------------------------------------------------------------------------------


def load_landmark_embedding(path: PathLike = DEFAULT_LANDMARK_EMBEDDING) -> dict:
    """Static (51) and dynamic (79 x 17) landmark embedding from our `.npz` layout.

    Returns {static_lmk_faces (51,) int32, static_lmk_bary (51, 3) float32,
             dynamic_lmk_faces (79, 17) int32, dynamic_lmk_bary (79, 17, 3) float32}.
    """
    data = _load_npz(path)
    keys = ("static_lmk_faces", "static_lmk_bary", "dynamic_lmk_faces", "dynamic_lmk_bary")
    _require_keys(data, keys, str(path))
    return _landmark_arrays(data, str(path), *keys)


def load_static_landmarks(path: PathLike) -> dict:
    """Official `flame_static_embedding.pkl` (dict lmk_face_idx (51,), lmk_b_coords (51, 3)),
    or an `.npz` with `static_lmk_faces` / `static_lmk_bary`.

    Returns {static_lmk_faces (51,) int32, static_lmk_bary (51, 3) float32}."""
    source = str(path)
    if _sniff(path).startswith(_ZIP_MAGIC):
        data = _load_npz(path)
        _require_keys(data, ("static_lmk_faces", "static_lmk_bary"), source)
        return _landmark_arrays(data, source, "static_lmk_faces", "static_lmk_bary", None, None)
    data = _load_pickle_file(path)
    _require_keys(data, ("lmk_face_idx", "lmk_b_coords"), source)
    return _landmark_arrays(data, source, "lmk_face_idx", "lmk_b_coords", None, None)


def load_dynamic_landmarks(path: PathLike) -> dict:
    """Official `flame_dynamic_embedding.npy` (0-d object array holding a dict whose
    lmk_face_idx is a list of 79 (17,) arrays and lmk_b_coords a list of 79 (17, 3) arrays),
    or an `.npz` with `dynamic_lmk_faces` / `dynamic_lmk_bary`.

    Returns {dynamic_lmk_faces (79, 17) int32, dynamic_lmk_bary (79, 17, 3) float32}."""
    source = str(path)
    head = _sniff(path)
    if head.startswith(_ZIP_MAGIC):
        data = _load_npz(path)
        _require_keys(data, ("dynamic_lmk_faces", "dynamic_lmk_bary"), source)
        return _landmark_arrays(data, source, None, None, "dynamic_lmk_faces", "dynamic_lmk_bary")
    if not head.startswith(_NPY_MAGIC):
        raise FlameFileError(f"{source}: expected the .npy dynamic landmark embedding"
                             f"{_describe_non_pickle(head)}")
    data = load_npy(path)
    _require_keys(data, ("lmk_face_idx", "lmk_b_coords"), source)
    return _landmark_arrays(data, source, None, None, "lmk_face_idx", "lmk_b_coords")


def load_masks(path: PathLike, num_vertices: int) -> dict:
    """`FLAME_masks.pkl` (dict name -> int vertex indices) -> {name: (K,) int32}."""
    data = _load_pickle_file(path)
    if not isinstance(data, dict) or not data:
        raise FlameFileError(f"{path}: expected a non-empty dict of vertex-index arrays, got "
                             f"{type(data).__name__}")
    return _mask_arrays(data, num_vertices, str(path))


def load_mediapipe(path: PathLike) -> dict:
    """`mediapipe_landmark_embedding.npz` (lmk_face_idx (M,), lmk_b_coords (M, 3),
    landmark_indices (M,)) -> mediapipe_lmk_faces / mediapipe_lmk_bary / mediapipe_lmk_ids."""
    data = _load_npz(path)
    return _mediapipe_arrays(data, str(path), "lmk_face_idx", "lmk_b_coords", "landmark_indices")


def _read_obj_uv(path: PathLike) -> tuple:
    """`vt` lines and the texture indices of triangular `f v/vt[/vn]` lines of an OBJ."""
    source = str(path)
    vt, ft = [], []
    with _open_binary(path) as handle:
        try:
            for line in handle.read().decode("utf-8").splitlines():
                parts = line.split()
                if not parts:
                    continue
                if parts[0] == "vt":
                    vt.append([float(parts[1]), float(parts[2])])
                elif parts[0] == "f":
                    if len(parts) != 4:
                        raise ValueError(f"face line is not a triangle: {line!r}")
                    ft.append([int(p.split("/")[1]) - 1 for p in parts[1:]])
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise FlameFileError(f"{source}: cannot read OBJ texture coordinates ({exc})") from exc
    if not vt or not ft:
        raise FlameFileError(f"{source}: OBJ has no 'vt' texture coordinates or no faces")
    return np.asarray(vt), np.asarray(ft)


def _texture_uv(data: Mapping, source: str, texture_uv: Optional[PathLike]) -> tuple:
    if texture_uv is not None:
        uv_source = str(texture_uv)
        if _sniff(texture_uv).startswith(_ZIP_MAGIC):
            uv_data = _load_npz(texture_uv)
            _require_keys(uv_data, ("vt", "ft"), uv_source)
            vt, ft = uv_data["vt"], uv_data["ft"]
        else:
            vt, ft = _read_obj_uv(texture_uv)
    elif "vt" in data and "ft" in data:
        vt, ft, uv_source = data["vt"], data["ft"], source
    else:
        raise FlameFileError(f"{source}: texture space has no 'vt'/'ft' UV keys (e.g. "
                             f"FLAME_albedo_from_BFM.npz); pass texture_uv= an .npz with vt/ft "
                             f"or the FLAME UV template .obj")
    vt = _array(vt, "vt", uv_source, dtype=np.float64, shape=(None, 2))
    ft = _array(ft, "ft", uv_source, dtype=np.int64, shape=(None, 3))
    _check_index_range(ft, vt.shape[0], "ft", uv_source, "texture-coordinate")
    return vt, ft


def sample_uv_bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of an (H, W, ...) texture at (N, 2) UV coordinates -> (N, ...).

    Convention (OBJ / OpenGL, and BFM_to_FLAME's `col_to_tex.py`): u runs along columns, v runs
    bottom-up, so image row 0 is v = 1; texel (row, col) has its centre at
    u = (col + 0.5) / W, v = 1 - (row + 0.5) / H. Lookups beyond the outer texel centres clamp.
    """
    height, width = image.shape[:2]
    x = np.clip(uv[:, 0] * width - 0.5, 0.0, width - 1.0)
    y = np.clip((1.0 - uv[:, 1]) * height - 0.5, 0.0, height - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.int64), width - 2) if width > 1 else np.zeros_like(
        x, np.int64)
    y0 = np.minimum(np.floor(y).astype(np.int64), height - 2) if height > 1 else np.zeros_like(
        y, np.int64)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    wx = (x - x0).reshape((-1,) + (1,) * (image.ndim - 2))
    wy = (y - y0).reshape((-1,) + (1,) * (image.ndim - 2))
    top = image[y0, x0] * (1 - wx) + image[y0, x1] * wx
    bottom = image[y1, x0] * (1 - wx) + image[y1, x1] * wx
    return top * (1 - wy) + bottom * wy


def load_texture(path: PathLike, faces: np.ndarray, num_vertices: int, *,
                 num_texture: int = 50, texture_uv: Optional[PathLike] = None,
                 bgr: bool = True) -> dict:
    """A FLAME UV albedo space -> per-vertex albedo mean (V, 3) and basis (V, 3, n) in [0, 1].

    Accepted files:
      * `FLAME_texture.npz`: `mean` (H, W, 3) and `tex_dir` (H, W, 3, n) in 0..255 (scaled by
        1/255 here), `vt` (Nvt, 2), `ft` (F, 3).
      * `FLAME_albedo_from_BFM.npz`: `MU` (H * W * 3,) and `PC` (H * W * 3, n) in 0..1, no UVs:
        give `texture_uv` (an `.npz` with vt/ft or FLAME's UV template `.obj`).
    Both store the channels as BGR (written with OpenCV; DECA flips them with [2, 1, 0]); with
    `bgr=True` they are returned as RGB.

    Each triangle corner `faces[i, k]` samples the texture at `vt[ft[i, k]]` (bilinear, see
    `sample_uv_bilinear`); a vertex's albedo is the mean over all its corners, so vertices on
    UV seams average both sides. `ft` must have the shape of `faces`.
    """
    source = str(path)
    data = _load_npz(path)
    if "mean" in data and "tex_dir" in data:
        tex_dir = np.asarray(data["tex_dir"])
        if tex_dir.ndim != 4 or tex_dir.shape[2] != 3:
            raise FlameFileError(f"{source}: key 'tex_dir' has shape {tex_dir.shape}, expected "
                                 f"(H, W, 3, n)")
        height, width, _, available = tex_dir.shape
        keep = _check_count(num_texture, available, "num_texture", source)
        mean = _array(data["mean"], "mean", source, dtype=np.float32, shape=(height, width, 3))
        basis = _array(tex_dir[..., :keep], "tex_dir", source, dtype=np.float32,
                       shape=(height, width, 3, keep))
        mean, basis = mean / 255.0, basis / 255.0
    elif "MU" in data and "PC" in data:
        pc = np.asarray(data["PC"])
        if pc.ndim != 2:
            raise FlameFileError(f"{source}: key 'PC' has shape {pc.shape}, expected "
                                 f"(H * W * 3, n)")
        side = int(round(np.sqrt(pc.shape[0] / 3)))
        if side * side * 3 != pc.shape[0]:
            raise FlameFileError(f"{source}: key 'PC' has {pc.shape[0]} rows, not a square "
                                 f"H * W * 3 texture")
        keep = _check_count(num_texture, pc.shape[1], "num_texture", source)
        mean = _array(data["MU"], "MU", source, dtype=np.float32,
                      shape=(side * side * 3,)).reshape(side, side, 3)
        basis = _array(pc[:, :keep], "PC", source, dtype=np.float32,
                       shape=(side * side * 3, keep)).reshape(side, side, 3, keep)
    else:
        raise FlameFileError(f"{source}: not a FLAME texture space: expected keys "
                             f"'mean'/'tex_dir' (FLAME_texture.npz) or 'MU'/'PC' "
                             f"(FLAME_albedo_from_BFM.npz); keys present: {sorted(data)}")
    vt, ft = _texture_uv(data, source, texture_uv)
    faces = np.asarray(faces)
    if ft.shape != faces.shape:
        raise FlameFileError(f"{source}: 'ft' has shape {ft.shape} but the model has "
                             f"{faces.shape} faces")
    if bgr:
        mean, basis = mean[:, :, ::-1], basis[:, :, ::-1]
    height, width = mean.shape[:2]
    stacked = np.concatenate([mean[..., None], basis], axis=-1)  # (H, W, 3, 1 + n)
    corner_colours = sample_uv_bilinear(stacked, vt[ft.reshape(-1)])  # (F * 3, 3, 1 + n)
    corners = faces.reshape(-1)
    counts = np.bincount(corners, minlength=num_vertices)
    if np.any(counts == 0):
        raise FlameFileError(f"{source}: {int(np.sum(counts == 0))} vertices belong to no "
                             f"triangle, so they have no texture coordinate")
    summed = np.zeros((num_vertices,) + corner_colours.shape[1:], np.float64)
    np.add.at(summed, corners, corner_colours)
    per_vertex = (summed / counts[:, None, None]).astype(np.float32)
    return dict(albedo_mean=per_vertex[..., 0], albedo_basis=per_vertex[..., 1:])


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def _check_count(requested: Optional[int], available: int, name: str, source: str) -> int:
    if requested is None:
        return available
    if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)):
        raise TypeError(f"{name} must be an int or None, got {requested!r}")
    if requested < 0 or requested > available:
        raise FlameFileError(f"{source}: {name}={requested} requested but the file has "
                             f"{available} component(s)")
    return int(requested)


def load(path: PathLike, *, num_shape: Optional[int] = None,
         num_expression: Optional[int] = None, static_landmarks: Optional[PathLike] = None,
         dynamic_landmarks: Optional[PathLike] = None, masks: Optional[PathLike] = None,
         mediapipe: Optional[PathLike] = None, texture: Optional[PathLike] = None,
         num_texture: int = 50, texture_uv: Optional[PathLike] = None,
         texture_bgr: bool = True) -> FlameModel:
    """Read a FLAME model file (and optional auxiliary files) into a `FlameModel`.

    Args:
      path: `generic_model.pkl` (FLAME 2020, chumpy), `flame2023_Open.pkl`, an `.npz` with the
        official keys, or our `.npz` from `save`. The kind is detected from the content.
      num_shape, num_expression: keep the first n identity / expression components
        (None = all; official files: 300 identity and 100 expression).
      static_landmarks: `flame_static_embedding.pkl` overriding the 51 static landmarks.
      dynamic_landmarks: `flame_dynamic_embedding.npy` overriding the 79 x 17 contour landmarks.
        Without these two (and for official files, which carry no landmarks) the shipped MIT
        RingNet embedding `assets/flame_landmark_embedding_ringnet.npz` is used.
      masks: `FLAME_masks.pkl` -> `model.masks` {name: (K,) int32 vertex ids}.
      mediapipe: `mediapipe_landmark_embedding.npz` -> `model.mediapipe_lmk_*`.
      texture: `FLAME_texture.npz` or `FLAME_albedo_from_BFM.npz` -> per-vertex albedo
        (see `load_texture`); `num_texture` components kept; `texture_uv` supplies UVs for
        files without vt/ft; `texture_bgr` says the stored channels are BGR.

    Auxiliary arguments replace what our `.npz` holds. Raises `FlameFileError` naming the file
    and the problem; `FlameFileNotFoundError` (also a `FileNotFoundError`) for a missing path.
    """
    source = str(path)
    arrays = _read_model_file(path)
    num_vertices = arrays["v_template"].shape[0]
    keep_shape = _check_count(num_shape, arrays["shapedirs"].shape[-1], "num_shape", source)
    keep_expression = _check_count(num_expression, arrays["exprdirs"].shape[-1],
                                   "num_expression", source)
    arrays["shapedirs"] = arrays["shapedirs"][..., :keep_shape]
    arrays["exprdirs"] = arrays["exprdirs"][..., :keep_expression]

    if "static_lmk_faces" not in arrays or "dynamic_lmk_faces" not in arrays:
        arrays.update(load_landmark_embedding(DEFAULT_LANDMARK_EMBEDDING))
    if static_landmarks is not None:
        arrays.update(load_static_landmarks(static_landmarks))
    if dynamic_landmarks is not None:
        arrays.update(load_dynamic_landmarks(dynamic_landmarks))
    if mediapipe is not None:
        arrays.update(load_mediapipe(mediapipe))
    if masks is not None:
        arrays["masks"] = load_masks(masks, num_vertices)
    if texture is not None:
        arrays.update(load_texture(texture, arrays["faces"], num_vertices,
                                   num_texture=num_texture, texture_uv=texture_uv,
                                   bgr=texture_bgr))

    num_faces = arrays["faces"].shape[0]
    for key in ("static_lmk_faces", "dynamic_lmk_faces", "mediapipe_lmk_faces"):
        if key in arrays:
            _check_index_range(arrays[key], num_faces, key, source, "triangle")

    parents = arrays.pop("parents")
    fields = {key: jnp.asarray(value) for key, value in arrays.items() if key != "masks"}
    if "masks" in arrays:
        fields["masks"] = {name: jnp.asarray(idx) for name, idx in arrays["masks"].items()}
    return FlameModel(parents=parents, **fields)


def save(model: FlameModel, path: PathLike) -> None:
    """Write `model` to `path` as an uncompressed `.npz` (layout of `model.to_numpy`).

    The file is written to a temporary file in the same folder and moved into place with
    `os.replace`, so an interrupted save never leaves a partial file at `path`. The name is used
    as given (no `.npz` is appended).
    """
    path = pathlib.Path(path)
    arrays = to_numpy(model)
    for name in arrays:
        if name.startswith("mask_") and not name[len("mask_"):]:
            raise ValueError("mask names must be non-empty")
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        if os.path.exists(handle.name):
            os.remove(handle.name)
        raise


__all__ = ["FlameFileError", "FlameFileNotFoundError", "load", "save", "restricted_unpickle",
           "chumpy_to_numpy", "load_npy", "load_landmark_embedding", "load_static_landmarks",
           "load_dynamic_landmarks", "load_masks", "load_mediapipe", "load_texture",
           "sample_uv_bilinear", "DEFAULT_ALLOWED_GLOBALS", "ChumpyStandIn", "SparseStandIn"]

