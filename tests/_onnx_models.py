"""Test helpers: random arcface_torch state dicts, ONNX exports of them, torch zip checkpoints.

Nothing here imports torch. `onnx_from_state_dict` writes the graph torch.onnx.export produces for
arcface_torch's IResNet (numeric tensor names, NCHW input), with each conv's following BatchNorm
folded into the conv (`fold_bn=True`, what insightface ships) or kept as BatchNormalization nodes.
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

EPS = 1e-5


def block_keys(stages):
    for stage, blocks in enumerate(stages, start=1):
        for block in range(blocks):
            yield f"layer{stage}.{block}", block == 0


def random_state_dict(stages, width, embedding_size, seed=0):
    """{arcface_torch key: float32 array (int64 num_batches_tracked)} with random weights."""
    rng = np.random.default_rng(seed)
    state = {}

    def conv(key, out_c, in_c, k):
        state[f"{key}.weight"] = (rng.standard_normal((out_c, in_c, k, k))
                                  * np.sqrt(2.0 / (in_c * k * k))).astype(np.float32)

    def bn(key, c):
        state[f"{key}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        state[f"{key}.bias"] = rng.normal(0, 0.1, c).astype(np.float32)
        state[f"{key}.running_mean"] = rng.normal(0, 0.1, c).astype(np.float32)
        state[f"{key}.running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        state[f"{key}.num_batches_tracked"] = np.array(1000, np.int64)

    def prelu(key, c):
        state[f"{key}.weight"] = rng.uniform(0.1, 0.3, c).astype(np.float32)

    conv("conv1", width, 3, 3)
    bn("bn1", width)
    prelu("prelu", width)
    channels = width
    for key, first in block_keys(stages):
        stage = int(key[5])
        planes = width * 2 ** (stage - 1)
        bn(f"{key}.bn1", channels)
        conv(f"{key}.conv1", planes, channels, 3)
        bn(f"{key}.bn2", planes)
        prelu(f"{key}.prelu", planes)
        conv(f"{key}.conv2", planes, planes, 3)
        bn(f"{key}.bn3", planes)
        if first:
            conv(f"{key}.downsample.0", planes, channels, 1)
            bn(f"{key}.downsample.1", planes)
        channels = planes
    bn("bn2", channels)
    fan_in = channels * 49
    state["fc.weight"] = (rng.standard_normal((embedding_size, fan_in))
                          / np.sqrt(fan_in)).astype(np.float32)
    state["fc.bias"] = rng.normal(0, 0.1, embedding_size).astype(np.float32)
    bn("features", embedding_size)
    return state


class _Builder:
    def __init__(self, state, seed):
        self.state = state
        self.nodes, self.initializers = [], []
        self.counter = 0
        self.rng = np.random.default_rng(seed)

    def name(self):
        self.counter += 1
        return str(self.counter + 100)

    def tensor(self, array):
        from onnx import numpy_helper

        name = self.name()
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op, inputs, **attrs):
        from onnx import helper

        out = self.name()
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op}_{len(self.nodes)}",
                                           **attrs))
        return out

    def bn(self, x, key):
        s = self.state
        return self.node("BatchNormalization",
                         [x] + [self.tensor(s[f"{key}.{f}"]) for f in
                                ("weight", "bias", "running_mean", "running_var")],
                         epsilon=EPS, momentum=0.9)

    def conv_bn(self, x, conv_key, bn_key, stride, fold):
        weight = self.state[f"{conv_key}.weight"].astype(np.float64)
        k = weight.shape[-1]
        pad = (k - 1) // 2
        attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4,
                     dilations=[1, 1], group=1)
        if not fold:
            out = self.node("Conv", [x, self.tensor(weight.astype(np.float32))], **attrs)
            return self.bn(out, bn_key)
        s = self.state
        factor = s[f"{bn_key}.weight"] / np.sqrt(s[f"{bn_key}.running_var"].astype(np.float64)
                                                  + EPS)
        folded = (weight * factor[:, None, None, None]).astype(np.float32)
        bias = (s[f"{bn_key}.bias"] - s[f"{bn_key}.running_mean"] * factor).astype(np.float32)
        return self.node("Conv", [x, self.tensor(folded), self.tensor(bias)], **attrs)

    def prelu(self, x, key, layout):
        slope = self.state[f"{key}.weight"]
        slope = slope.reshape((-1, 1, 1) if layout == "c11" else (1, -1, 1, 1))
        return self.node("PRelu", [x, self.tensor(slope)])


def onnx_from_state_dict(state, stages, *, fold_bn, prelu_layout="c11", fc_as_matmul=False,
                         dropout=False, seed=0):
    """ONNX ModelProto of arcface_torch IResNet(stages) holding `state`'s weights.

    Input 'input.1' (N, 3, 112, 112), output the (N, embedding) features. Initializers get
    numeric names and are stored in shuffled order (nothing may depend on either).
    """
    import onnx
    from onnx import helper

    b = _Builder(state, seed)
    x = b.conv_bn("input.1", "conv1", "bn1", 1, fold_bn)
    x = b.prelu(x, "prelu", prelu_layout)
    for key, first in block_keys(stages):
        identity = x
        out = b.bn(x, f"{key}.bn1")
        out = b.conv_bn(out, f"{key}.conv1", f"{key}.bn2", 1, fold_bn)
        out = b.prelu(out, f"{key}.prelu", prelu_layout)
        out = b.conv_bn(out, f"{key}.conv2", f"{key}.bn3", 2 if first else 1, fold_bn)
        if first:  # torch runs the downsample after the main branch
            identity = b.conv_bn(x, f"{key}.downsample.0", f"{key}.downsample.1", 2, fold_bn)
        x = b.node("Add", [out, identity])
    x = b.bn(x, "bn2")
    x = b.node("Flatten", [x], axis=1)
    if dropout:
        x = b.node("Identity", [x])
    if fc_as_matmul:
        x = b.node("MatMul", [x, b.tensor(state["fc.weight"].T.copy())])
        x = b.node("Add", [x, b.tensor(state["fc.bias"])])
    else:
        x = b.node("Gemm", [x, b.tensor(state["fc.weight"]), b.tensor(state["fc.bias"])],
                   alpha=1.0, beta=1.0, transB=1)
    x = b.bn(x, "features")
    order = b.rng.permutation(len(b.initializers))
    initializers = [b.initializers[i] for i in order]
    embedding = state["fc.weight"].shape[0]
    graph = helper.make_graph(
        b.nodes, "iresnet",
        [helper.make_tensor_value_info("input.1", onnx.TensorProto.FLOAT, ["N", 3, 112, 112])],
        [helper.make_tensor_value_info(x, onnx.TensorProto.FLOAT, ["N", embedding])],
        initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


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
