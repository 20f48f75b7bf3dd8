"""Test helpers: random arcface_torch state dicts, ONNX exports of them, torch zip checkpoints.

Nothing here imports torch. `onnx_from_state_dict` (from `recon.training.fakes`) writes the graph
torch.onnx.export produces for arcface_torch's IResNet (numeric tensor names, NCHW input), with
each conv's following BatchNorm folded into the conv (`fold_bn=True`, what insightface ships) or
kept as BatchNormalization nodes.
`write_torch_zip` writes a `torch.save(state_dict)` zip by hand: the pickle names
`torch._utils._rebuild_tensor_v2` and `torch.FloatStorage` through stand-in modules that exist only
while pickling.
"""

from __future__ import annotations

import collections
import contextlib
import io
import pickle
import sys
import types
import zipfile

import numpy as np

# The random arcface_torch state dicts and their ONNX export live in the library, which writes
# the fake ArcFace network of the paper smoke run with them.
from recon.training.fakes import BN_EPS as EPS  # noqa: F401
from recon.training.fakes import (block_keys, onnx_from_state_dict,  # noqa: F401
                                  random_state_dict)


def run_onnxruntime(model, images_nhwc):
    """Embeddings of (B, 112, 112, 3) images from onnxruntime (the model takes NCHW)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))})[0]


# ---------------------------------------------------------------------------------------------
# torch zip checkpoints without torch
# ---------------------------------------------------------------------------------------------


def _rebuild_tensor_v2(*args):  # never called: only its name goes into the pickle
    raise AssertionError("stand-in called")


_rebuild_tensor_v2.__module__ = "torch._utils"
_STORAGE_CLASSES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.int64): "LongStorage",
                    np.dtype(np.float16): "HalfStorage"}


@contextlib.contextmanager
def _fake_torch_modules():
    """`torch`, `torch._utils` in sys.modules only while pickling, so pickle can name them."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in _STORAGE_CLASSES.values():
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value


class _Storage:
    def __init__(self, key, flat):
        self.key, self.flat = key, flat


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def __reduce__(self):
        return (_rebuild_tensor_v2, (self.storage, self.offset, self.size, self.stride, False,
                                     collections.OrderedDict()))


def write_torch_zip(path, state, *, strided_keys=(), archive_name="backbone"):
    """Write `state` ({key: array}) as torch.save would (zip, protocol 2 pickle + storages).

    Keys in `strided_keys` (2-D) are stored as a transposed view with an offset into a larger
    storage, as torch does for views, to exercise the strided rebuild.
    """
    storages, tensors = [], collections.OrderedDict()
    for index, (key, value) in enumerate(state.items()):
        value = np.asarray(value)
        if key in strided_keys:
            rows, cols = value.shape
            flat = np.concatenate([np.full(3, -7, value.dtype), value.T.reshape(-1)])
            storage = _Storage(str(index), flat)
            tensors[key] = _Tensor(storage, 3, (rows, cols), (1, rows))
        else:
            value = np.array(value, order="C")  # (ascontiguousarray would make 0-d 1-d)
            storage = _Storage(str(index), value.reshape(-1))
            strides = tuple(int(s // value.itemsize) for s in value.strides)
            tensors[key] = _Tensor(storage, 0, tuple(value.shape), strides)
        storages.append(storage)

    with _fake_torch_modules() as torch:
        class Pickler(pickle.Pickler):
            def persistent_id(self, obj):
                if isinstance(obj, _Storage):
                    kind = getattr(torch, _STORAGE_CLASSES[obj.flat.dtype])
                    return ("storage", kind, obj.key, "cpu", obj.flat.size)
                return None

        buffer = io.BytesIO()
        Pickler(buffer, protocol=2).dump(tensors)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{archive_name}/data.pkl", buffer.getvalue())
        archive.writestr(f"{archive_name}/byteorder", "little")
        for storage in storages:
            archive.writestr(f"{archive_name}/data/{storage.key}",
                             storage.flat.astype(storage.flat.dtype.newbyteorder("<")).tobytes())
        archive.writestr(f"{archive_name}/version", "3\n")


def write_malicious_torch_zip(path, sentinel):
    """A torch-style zip whose pickle would create directory `sentinel` if it were executed."""
    import os

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(sentinel),))

    data = pickle.dumps(collections.OrderedDict([("conv1.weight", Evil())]), protocol=2)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("backbone/data.pkl", data)
        archive.writestr("backbone/version", "3\n")
