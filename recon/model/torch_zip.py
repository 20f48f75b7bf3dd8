"""Read a torch `state_dict` checkpoint (zip format, torch >= 1.6) into numpy without torch.

The zip holds `<name>/data.pkl` (the pickled OrderedDict) and `<name>/data/<key>` (raw storage
bytes); tensors are pickled as `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` with the storage as the persistent id `('storage', torch.FloatStorage, key, location,
numel)`. The pickle goes through the project's restricted unpickler with an allow-list of exactly
these globals (mapped to numpy stand-ins), so a malicious file cannot run code: any other global
raises naming it.
"""

from __future__ import annotations

import collections
import os
import zipfile
from typing import Any, Dict, Mapping

import numpy as np

try:  # the shared restricted unpickler (flame_jax.safe_pickle, with persistent_load)
    from flame_jax.safe_pickle import restricted_unpickle as _shared_unpickle
except ImportError:  # older checkouts: flame_jax.io's version has no persistent_load
    _shared_unpickle = None


class TorchCheckpointError(ValueError):
    """A torch checkpoint that cannot be read (names the file and the problem)."""


class _StorageType:
    """Stand-in for `torch.FloatStorage` & co.: only carries the numpy dtype."""

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f"<torch.{self.name} stand-in ({self.dtype})>"


class _Storage:
    def __init__(self, array: np.ndarray):
        self.array = array


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    """numpy version of torch._utils._rebuild_tensor_v2 (bounds-checked strided view, copied)."""
    if not isinstance(storage, _Storage):
        raise TypeError(f"tensor storage is {type(storage).__name__}, not a checkpoint storage")
    size = tuple(int(s) for s in size)
    stride = tuple(int(s) for s in stride)
    offset = int(storage_offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size + stride):
        raise ValueError(f"bad tensor geometry size={size} stride={stride} offset={offset}")
    flat = storage.array
    if 0 in size:
        return np.zeros(size, flat.dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride))
    if last >= flat.size:
        raise ValueError(f"tensor (size {size}, stride {stride}, offset {offset}) reads past its "
                         f"storage of {flat.size} elements")
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(st * flat.itemsize for st in stride),
        writeable=False)
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _allowed_globals() -> Dict[tuple, Any]:
    allowed = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    import ml_dtypes  # ships with jax; numpy has no bfloat16

    allowed[("torch", "BFloat16Storage")] = _StorageType("BFloat16Storage", ml_dtypes.bfloat16)
    return allowed


def _local_unpickle(data: bytes, *, allowed, source, persistent_load):
    """Fallback when flame_jax.safe_pickle is absent: same allow-list rule, nothing else."""
    import io
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in allowed:
                return allowed[(module, name)]
            raise TorchCheckpointError(f"{source}: pickle refers to the forbidden global "
                                       f"{module}.{name}; refusing to load it")

        def persistent_load(self, pid):
            return persistent_load(pid)

    try:
        return Unpickler(io.BytesIO(data), encoding="latin1").load()
    except TorchCheckpointError:
        raise
    except Exception as exc:  # any malformed pickle: report it with the file name
        raise TorchCheckpointError(f"{source}: truncated or corrupt pickle "
                                   f"({type(exc).__name__}: {exc})") from exc


def load_torch_state_dict(path: str | os.PathLike) -> Dict[str, np.ndarray]:
    """{key: numpy array} of a torch zip checkpoint holding a (possibly nested) state dict.

    Raises FileNotFoundError naming a missing path, `TorchCheckpointError` for a legacy
    (pre-1.6) or corrupt file, a forbidden pickle global, or content that is not a flat
    {str: tensor} mapping.
    """
    source = os.fspath(path)
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such torch checkpoint")
    if not zipfile.is_zipfile(source):
        raise TorchCheckpointError(f"{source}: not a zip-format torch checkpoint (legacy torch "
                                   f"< 1.6 files and other formats are not supported)")
    with zipfile.ZipFile(source) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchCheckpointError(f"{source}: expected one '<name>/data.pkl' in the zip, "
                                       f"found {pickles or 'none'}")
        prefix = pickles[0][:-len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in names:
            byteorder = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise TorchCheckpointError(f"{source}: unknown byteorder {byteorder!r}")
        storages: Dict[str, _Storage] = {}

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
                raise TorchCheckpointError(f"{source}: unsupported persistent id {pid!r}")
            _, storage_type, key, _location, numel = pid
            if not isinstance(storage_type, _StorageType):
                raise TorchCheckpointError(f"{source}: storage type {storage_type!r} is not an "
                                           f"allowed torch storage class")
            key = str(key)
            if key not in storages:
                entry = f"{prefix}data/{key}"
                if entry not in names:
                    raise TorchCheckpointError(f"{source}: storage {entry} is missing")
                raw = archive.read(entry)
                dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
                if len(raw) < int(numel) * dtype.itemsize:
                    raise TorchCheckpointError(f"{source}: storage {entry} holds {len(raw)} "
                                               f"bytes, fewer than {numel} x {dtype}")
                array = np.frombuffer(raw, dtype=dtype, count=int(numel))
                storages[key] = _Storage(array.astype(dtype.newbyteorder("=")))
            return storages[key]

        data = archive.read(pickles[0])
        allowed = _allowed_globals()
        if _shared_unpickle is not None:
            try:
                state = _shared_unpickle(data, allowed=allowed, allow_chumpy=False, source=source,
                                         persistent_load=persistent_load)
            except TorchCheckpointError:
                raise
            except ValueError as exc:  # FlameFileError: forbidden global, corrupt pickle
                raise TorchCheckpointError(str(exc)) from exc
        else:
            state = _local_unpickle(data, allowed=allowed, source=source,
                                    persistent_load=persistent_load)
    return _flat_state_dict(state, source)


def _flat_state_dict(state: Any, source: str) -> Dict[str, np.ndarray]:
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"],
                                                                            Mapping):
        state = state["state_dict"]  # {'state_dict': ..., 'epoch': ...} style checkpoints
    if not isinstance(state, Mapping):
        raise TorchCheckpointError(f"{source}: holds a {type(state).__name__}, not a state dict")
    out = {}
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise TorchCheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, "
                                       f"not a tensor")
        out[key] = value
    return out
