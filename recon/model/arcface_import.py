"""Import pretrained ArcFace weights (insightface ONNX, arcface_torch `.pth`) into `IResNet`.

Both sources go through one intermediate: an arcface_torch state dict ({torch key: numpy array},
keys `conv1.weight`, `layer4.2.bn3.running_var`, `fc.bias`, ...), which
`variables_from_state_dict` maps onto the Flax variables (conv kernels OIHW -> HWIO, fc weight
transposed; the Flax output flattens in torch's (C, H, W) order so nothing else moves).

ONNX (`glintr100.onnx`, `w600k_r50.onnx`): torch.onnx.export folded each BatchNorm that follows
a Conv into the Conv (the conv gains a bias, the BN node is gone) and named initializers with
numbers, so names are never trusted: the graph is walked from its input along the data flow,
matching the IResNet pattern (Conv/BatchNormalization/PRelu/Add/Flatten/Gemm) and placing every
tensor by the op that consumes it, with its shape checked. Folded and unfolded layouts are both
read: a folded conv's bias becomes the following BN's shift (scale 1, mean 0, var 1 - eps:
exact), so one module definition serves every source. Any op not on the pattern, any tensor of
the wrong shape and any initializer left unused raises `ArcFaceImportError` naming it.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from recon.model.iresnet import BN_EPSILON, INPUT_SIZE, IResNet, STAGE_NAMES
from recon.model.torch_zip import TorchCheckpointError, load_torch_state_dict


class ArcFaceImportError(ValueError):
    """A weight file that does not describe an arcface_torch IResNet (names what is wrong)."""


# ---------------------------------------------------------------------------------------------
# arcface_torch state dict -> Flax variables
# ---------------------------------------------------------------------------------------------

_BN_FIELDS = (("weight", "params", "scale"), ("bias", "params", "bias"),
              ("running_mean", "batch_stats", "mean"), ("running_var", "batch_stats", "var"))


def _layout(stages: Sequence[int]) -> List[Tuple[str, str, Tuple[str, ...], str]]:
    """[(torch key, collection, flax path, kind)] for every tensor of an arcface_torch IResNet.

    kind: 'conv' (OIHW -> HWIO), 'dense' (out,in -> in,out), 'vector' (copied, flattened).
    """
    rows = []

    def conv(key, path):
        rows.append((f"{key}.weight", "params", path + ("kernel",), "conv"))

    def bn(key, path):
        for torch_name, collection, flax_name in _BN_FIELDS:
            rows.append((f"{key}.{torch_name}", collection, path + (flax_name,), "vector"))

    def prelu(key, path):
        rows.append((f"{key}.weight", "params", path + ("alpha",), "vector"))

    conv("conv1", ("stem", "conv"))
    bn("bn1", ("stem", "bn"))
    prelu("prelu", ("stem", "prelu"))
    for stage_index, (stage, blocks) in enumerate(zip(STAGE_NAMES, stages)):
        for block in range(blocks):
            key, path = f"layer{stage_index + 1}.{block}", (stage, f"block{block}")
            bn(f"{key}.bn1", path + ("bn1",))
            conv(f"{key}.conv1", path + ("conv1",))
            bn(f"{key}.bn2", path + ("bn2",))
            prelu(f"{key}.prelu", path + ("prelu",))
            conv(f"{key}.conv2", path + ("conv2",))
            bn(f"{key}.bn3", path + ("bn3",))
            if block == 0:
                conv(f"{key}.downsample.0", path + ("downsample_conv",))
                bn(f"{key}.downsample.1", path + ("downsample_bn",))
    bn("bn2", ("output", "bn"))
    rows.append(("fc.weight", "params", ("output", "fc", "kernel"), "dense"))
    rows.append(("fc.bias", "params", ("output", "fc", "bias"), "vector"))
    bn("features", ("output", "features"))
    return rows


def architecture_from_state_dict(state_dict: Mapping[str, np.ndarray],
                                 source: str = "<state dict>") -> Dict[str, Any]:
    """{'stages', 'width', 'embedding_size'} read from an arcface_torch state dict's keys/shapes."""
    for key in ("conv1.weight", "fc.weight"):
        if key not in state_dict:
            raise ArcFaceImportError(f"{source}: missing {key}; not an arcface_torch IResNet "
                                     f"state dict (keys start {sorted(state_dict)[:5]})")
    stages = []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state_dict
                  for m in [re.match(rf"layer{stage}\.(\d+)\.", k)] if m}
        if not blocks or blocks != set(range(len(blocks))):
            raise ArcFaceImportError(f"{source}: layer{stage} blocks {sorted(blocks)} are not "
                                     f"0..n-1 with n >= 1")
        stages.append(len(blocks))
    conv1 = np.shape(state_dict["conv1.weight"])
    fc = np.shape(state_dict["fc.weight"])
    if len(conv1) != 4 or len(fc) != 2:
        raise ArcFaceImportError(f"{source}: conv1.weight {conv1} / fc.weight {fc} have the "
                                 f"wrong rank")
    return {"stages": tuple(stages), "width": int(conv1[0]), "embedding_size": int(fc[0])}


def _strip_prefix(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
    for prefix in ("module.", "backbone."):  # DDP / wrapper prefixes
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray], *,
                              source: str = "<state dict>",
                              precision: Any = "highest") -> Tuple[IResNet, dict]:
    """(module, {'params', 'batch_stats'}) from an arcface_torch IResNet state dict.

    Every key must be used (`num_batches_tracked` aside) and every tensor must have the shape
    the module expects; otherwise `ArcFaceImportError` names the keys.
    """
    state_dict = _strip_prefix(state_dict)
    arch = architecture_from_state_dict(state_dict, source)
    module = IResNet(**arch, precision=precision)
    images = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), images)
    layout = _layout(arch["stages"])
    known = {row[0] for row in layout}
    ignored = {k for k in state_dict if k.endswith(".num_batches_tracked")}
    missing = sorted(known - set(state_dict))
    unexpected = sorted(set(state_dict) - known - ignored)
    if missing or unexpected:
        raise ArcFaceImportError(f"{source}: state dict does not match arcface_torch IResNet "
                                 f"{arch}: missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
                                 f", unexpected {unexpected[:8]}"
                                 f"{'...' if len(unexpected) > 8 else ''}")
    variables: Dict[str, Any] = {}
    for key, collection, path, kind in layout:
        value = np.asarray(state_dict[key], dtype=np.float32)
        if kind == "conv" and value.ndim == 4:
            value = value.transpose(2, 3, 1, 0)
        elif kind == "dense" and value.ndim == 2:
            value = value.T
        elif kind == "vector":
            value = value.reshape(-1)
        expected = shapes[collection]
        for name in path:
            expected = expected[name]
        if value.shape != expected.shape:
            raise ArcFaceImportError(f"{source}: {key} has shape {np.shape(state_dict[key])}, "
                                     f"which does not fit {'/'.join(path)} {expected.shape} "
                                     f"(flax layout) of IResNet {arch}")
        if not np.all(np.isfinite(value)):
            raise ArcFaceImportError(f"{source}: {key} holds non-finite values")
        node = variables.setdefault(collection, {})
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(value)
    return module, variables


# ---------------------------------------------------------------------------------------------
# ONNX graph -> arcface_torch state dict
# ---------------------------------------------------------------------------------------------

_PASS_THROUGH = ("Identity", "Dropout")


class _OnnxGraph:
    """Data-flow view of an ONNX graph with bookkeeping of what the walk consumed."""

    def __init__(self, model, source: str):
        from onnx import numpy_helper

        self.source = source
        graph = model.graph
        self.nodes = list(graph.node)
        self.consts: Dict[str, np.ndarray] = {}
        for tensor in graph.initializer:
            self.consts[tensor.name] = numpy_helper.to_array(tensor)
        self.visited: set = set()
        for index, node in enumerate(self.nodes):
            if node.op_type == "Constant":
                value = [a for a in node.attribute if a.name == "value"]
                if len(value) != 1:
                    raise self.error(f"Constant node {self.node_name(node)} without a tensor value")
                self.consts[node.output[0]] = numpy_helper.to_array(value[0].t)
                self.visited.add(index)
        self.used: set = set()
        self.consumers: Dict[str, List[int]] = {}
        for index, node in enumerate(self.nodes):
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
        inputs = [i.name for i in graph.input if i.name not in self.consts]
        if len(inputs) != 1:
            raise self.error(f"expected one image input, found {inputs}")
        self.input = inputs[0]
        self.outputs = [o.name for o in graph.output]

    def error(self, message: str) -> ArcFaceImportError:
        return ArcFaceImportError(f"{self.source}: {message}")

    def node_name(self, node) -> str:
        return f"{node.op_type} '{node.name or node.output[0]}'"

    def next_nodes(self, tensor: str) -> List[int]:
        """Indices of the nodes consuming `tensor`, looking through Identity/Dropout."""
        out = []
        for index in self.consumers.get(tensor, []):
            node = self.nodes[index]
            if node.op_type in _PASS_THROUGH and node.input[0] == tensor:
                self.visited.add(index)
                out.extend(self.next_nodes(node.output[0]))
            else:
                out.append(index)
        return out

    def single_next(self, tensor: str, ops: Sequence[str], what: str):
        found = self.next_nodes(tensor)
        if len(found) != 1 or self.nodes[found[0]].op_type not in ops:
            names = [self.node_name(self.nodes[i]) for i in found] or ["nothing"]
            raise self.error(f"expected {what} ({'/'.join(ops)}) after tensor '{tensor}', found "
                             f"{', '.join(names)}")
        return found[0], self.nodes[found[0]]

    def const(self, node, position: int, what: str) -> np.ndarray:
        if position >= len(node.input) or not node.input[position]:
            raise self.error(f"{self.node_name(node)} lacks its {what}")
        name = node.input[position]
        if name not in self.consts:
            raise self.error(f"{self.node_name(node)} input {position} ('{name}', {what}) is "
                             f"computed, not a stored tensor")
        self.used.add(name)
        return np.asarray(self.consts[name], dtype=np.float64)

    def attrs(self, node) -> Dict[str, Any]:
        from onnx import helper

        return {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def check_shape(self, node, position: int, value: np.ndarray, expected: tuple, what: str):
        if value.shape != tuple(expected):
            name = node.input[position]
            raise self.error(f"tensor '{name}' ({what} of {self.node_name(node)}) has shape "
                             f"{value.shape}, expected {tuple(expected)}")


def _bn_params(graph: _OnnxGraph, node, channels: int) -> Dict[str, np.ndarray]:
    """torch BN fields of an ONNX BatchNormalization (inputs X, scale, B, mean, var)."""
    out = {}
    for position, field in enumerate(("weight", "bias", "running_mean", "running_var"), start=1):
        value = graph.const(node, position, field)
        graph.check_shape(node, position, value, (channels,), f"BatchNormalization {field}")
        out[field] = value
    epsilon = float(graph.attrs(node).get("epsilon", 1e-5))
    # Our module's eps is fixed; var + eps is all that matters, so move the difference into var.
    out["running_var"] = out["running_var"] + epsilon - BN_EPSILON
    return out


def _identity_bn(channels: int, shift: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
    """A BN that computes x + shift exactly: scale 1, mean 0, var + eps = 1."""
    return {"weight": np.ones(channels), "bias": np.zeros(channels) if shift is None else shift,
            "running_mean": np.zeros(channels), "running_var": np.full(channels, 1.0 - BN_EPSILON)}


def _bn_after_bias(bn: Dict[str, np.ndarray], bias: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
    """BN(x + bias) == BN'(x) with mean' = mean - bias (a conv bias before an unfolded BN)."""
    if bias is None:
        return bn
    return {**bn, "running_mean": bn["running_mean"] - bias}


def _conv(graph: _OnnxGraph, node, *, in_channels: Optional[int], kernel: int, stride: int,
          what: str) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    weight = graph.const(node, 1, f"{what} weight")
    if weight.ndim != 4 or weight.shape[2:] != (kernel, kernel) or (
            in_channels is not None and weight.shape[1] != in_channels):
        raise graph.error(f"tensor '{node.input[1]}' ({what} weight of {graph.node_name(node)}) "
                          f"has shape {weight.shape}, expected (out, {in_channels}, {kernel}, "
                          f"{kernel})")
    attrs = graph.attrs(node)
    pad = (kernel - 1) // 2
    expected = {"strides": [stride, stride], "pads": [pad] * 4, "dilations": [1, 1],
                "group": 1, "kernel_shape": [kernel, kernel]}
    defaults = {"strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1], "group": 1,
                "kernel_shape": [kernel, kernel]}
    for name, value in expected.items():
        got = attrs.get(name, defaults[name])
        got = list(got) if isinstance(got, (list, tuple)) else got
        if got != value:
            raise graph.error(f"{graph.node_name(node)} ({what}) has {name}={got}, expected "
                              f"{value}")
    if attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        raise graph.error(f"{graph.node_name(node)} ({what}) uses auto_pad")
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = graph.const(node, 2, f"{what} bias")
        graph.check_shape(node, 2, bias, (weight.shape[0],), f"{what} bias")
    return weight, bias


def _conv_bn(graph: _OnnxGraph, tensor: str, *, in_channels: Optional[int], kernel: int,
             stride: int, what: str) -> Tuple[np.ndarray, Dict[str, np.ndarray], str]:
    """A Conv on `tensor` and its (unfolded or folded) BatchNorm -> (weight, bn, output)."""
    index, _ = graph.single_next(tensor, ("Conv",), what)
    return _conv_bn_at(graph, index, in_channels=in_channels, kernel=kernel, stride=stride,
                       what=what)


def _conv_bn_at(graph: _OnnxGraph, index: int, *, in_channels: Optional[int], kernel: int,
                stride: int, what: str) -> Tuple[np.ndarray, Dict[str, np.ndarray], str]:
    node = graph.nodes[index]
    graph.visited.add(index)
    weight, bias = _conv(graph, node, in_channels=in_channels, kernel=kernel, stride=stride,
                         what=what)
    out = node.output[0]
    following = graph.next_nodes(out)
    if len(following) == 1 and graph.nodes[following[0]].op_type == "BatchNormalization":
        bn_node = graph.nodes[following[0]]
        graph.visited.add(following[0])
        bn = _bn_after_bias(_bn_params(graph, bn_node, weight.shape[0]), bias)
        out = bn_node.output[0]
    else:
        bn = _identity_bn(weight.shape[0], bias)
    return weight, bn, out


def _prelu(graph: _OnnxGraph, tensor: str, channels: int, what: str) -> Tuple[np.ndarray, str]:
    index, node = graph.single_next(tensor, ("PRelu",), what)
    graph.visited.add(index)
    slope = graph.const(node, 1, "slope")
    if slope.shape not in ((channels, 1, 1), (1, channels, 1, 1)) and not (
            channels == 1 and slope.size == 1):
        raise graph.error(f"tensor '{node.input[1]}' (slope of {graph.node_name(node)}, {what}) "
                          f"has shape {slope.shape}, expected ({channels}, 1, 1)")
    return slope.reshape(-1), node.output[0]


def _pre_bn(graph: _OnnxGraph, index: int, channels: int) -> Tuple[Dict[str, np.ndarray], str]:
    node = graph.nodes[index]
    graph.visited.add(index)
    return _bn_params(graph, node, channels), node.output[0]


def _put_bn(state: Dict[str, np.ndarray], key: str, bn: Mapping[str, np.ndarray]):
    for field, value in bn.items():
        state[f"{key}.{field}"] = value


def _block(graph: _OnnxGraph, tensor: str, channels: int, key: str,
           state: Dict[str, np.ndarray]) -> Tuple[str, int, bool]:
    """One IBasicBlock starting at `tensor` -> (output tensor, out channels, has downsample)."""
    following = graph.next_nodes(tensor)
    ops = [graph.nodes[i].op_type for i in following]
    bns = [i for i in following if graph.nodes[i].op_type == "BatchNormalization"]
    shortcut_convs = [i for i in following if graph.nodes[i].op_type == "Conv"]
    adds = [i for i in following if graph.nodes[i].op_type == "Add"]
    if len(bns) != 1 or len(following) != 2 or len(shortcut_convs) + len(adds) != 1:
        names = ", ".join(graph.node_name(graph.nodes[i]) for i in following) or "nothing"
        raise graph.error(f"block {key}: tensor '{tensor}' should feed a BatchNormalization and "
                          f"an Add or a 1x1 Conv (the shortcut), found {names} ({ops})")
    bn1, out = _pre_bn(graph, bns[0], channels)
    _put_bn(state, f"{key}.bn1", bn1)
    weight1, bn2, out = _conv_bn(graph, out, in_channels=channels, kernel=3, stride=1,
                                 what=f"{key}.conv1")
    planes = weight1.shape[0]
    state[f"{key}.conv1.weight"] = weight1
    _put_bn(state, f"{key}.bn2", bn2)
    state[f"{key}.prelu.weight"], out = _prelu(graph, out, planes, f"{key}.prelu")
    downsample = bool(shortcut_convs)
    stride = 2 if downsample else 1
    weight2, bn3, out = _conv_bn(graph, out, in_channels=planes, kernel=3, stride=stride,
                                 what=f"{key}.conv2")
    state[f"{key}.conv2.weight"] = weight2
    _put_bn(state, f"{key}.bn3", bn3)
    if downsample:
        weight_d, bn_d, shortcut = _conv_bn_at(graph, shortcut_convs[0], in_channels=channels,
                                               kernel=1, stride=2, what=f"{key}.downsample")
        state[f"{key}.downsample.0.weight"] = weight_d
        _put_bn(state, f"{key}.downsample.1", bn_d)
    else:
        if planes != channels:
            raise graph.error(f"block {key}: identity shortcut but {channels} -> {planes} "
                              f"channels")
        shortcut = tensor
    add_index, add = graph.single_next(out, ("Add",), f"{key} residual Add")
    if sorted(add.input) != sorted([out, shortcut]):
        raise graph.error(f"block {key}: {graph.node_name(add)} adds {list(add.input)}, expected "
                          f"the block output '{out}' and the shortcut '{shortcut}'")
    graph.visited.add(add_index)
    return add.output[0], planes, downsample


def state_dict_from_onnx(model_or_path: Any) -> Dict[str, np.ndarray]:
    """arcface_torch state dict (float64 numpy) of an insightface/arcface_torch ONNX IResNet."""
    import onnx

    if isinstance(model_or_path, (str, os.PathLike)):
        source = os.fspath(model_or_path)
        if not os.path.exists(source):
            raise FileNotFoundError(f"{source}: no such ONNX file")
        try:
            model = onnx.load(source)
        except Exception as exc:  # protobuf raises assorted errors on garbage
            raise ArcFaceImportError(f"{source}: not a readable ONNX model "
                                     f"({type(exc).__name__}: {exc})") from exc
    else:
        model, source = model_or_path, "<onnx model>"
    graph = _OnnxGraph(model, source)
    state: Dict[str, np.ndarray] = {}

    weight, bn, out = _conv_bn(graph, graph.input, in_channels=3, kernel=3, stride=1,
                               what="stem conv1")
    channels = weight.shape[0]
    state["conv1.weight"] = weight
    _put_bn(state, "bn1", bn)
    state["prelu.weight"], out = _prelu(graph, out, channels, "stem prelu")

    stage, block = 0, 0
    while True:
        following = graph.next_nodes(out)
        if len(following) == 1 and graph.nodes[following[0]].op_type == "BatchNormalization":
            break  # the output bn2
        probe = [graph.nodes[i].op_type for i in following]
        starts_stage = "Conv" in probe
        if starts_stage:
            stage, block = stage + 1, 0
        if stage == 0:
            names = ", ".join(graph.node_name(graph.nodes[i]) for i in following) or "nothing"
            raise graph.error(f"expected the first residual block (BatchNormalization and a "
                              f"downsample Conv) after the stem's '{out}', found {names}")
        if stage > 4:
            raise graph.error("more than 4 downsampling stages; not an IResNet")
        out, channels, _ = _block(graph, out, channels, f"layer{stage}.{block}", state)
        block += 1
    if stage != 4:
        raise graph.error(f"found {stage} stages, an IResNet has 4")

    bn2, out = _pre_bn(graph, graph.next_nodes(out)[0], channels)
    _put_bn(state, "bn2", bn2)
    index, node = graph.single_next(out, ("Flatten", "Reshape"), "the flatten before fc")
    graph.visited.add(index)
    if node.op_type == "Flatten" and int(graph.attrs(node).get("axis", 1)) != 1:
        raise graph.error(f"{graph.node_name(node)} flattens from axis "
                          f"{graph.attrs(node).get('axis')}, expected 1")
    if node.op_type == "Reshape":
        shape = graph.const(node, 1, "target shape")
        if shape.shape != (2,) or shape[1] not in (-1, channels * 49):
            raise graph.error(f"{graph.node_name(node)} reshapes to {shape.tolist()}, expected "
                              f"(N, {channels * 49})")
    out = node.output[0]
    features_in = channels * (INPUT_SIZE // 16) ** 2
    index, node = graph.single_next(out, ("Gemm", "MatMul"), "fc")
    graph.visited.add(index)
    if node.op_type == "Gemm":
        attrs = graph.attrs(node)
        if attrs.get("transA", 0) or float(attrs.get("alpha", 1.0)) != 1.0 or float(
                attrs.get("beta", 1.0)) != 1.0:
            raise graph.error(f"{graph.node_name(node)} has transA/alpha/beta {attrs}")
        fc = graph.const(node, 1, "fc weight")
        if not attrs.get("transB", 0):
            fc = fc.T
        if fc.ndim != 2 or fc.shape[1] != features_in:
            raise graph.error(f"tensor '{node.input[1]}' (fc weight of {graph.node_name(node)}) "
                              f"has shape {fc.shape}, expected (embedding, {features_in}) "
                              f"(transB={attrs.get('transB', 0)})")
        bias = graph.const(node, 2, "fc bias") if len(node.input) > 2 and node.input[2] else None
        if bias is not None:
            graph.check_shape(node, 2, bias.reshape(-1), (fc.shape[0],), "fc bias")
            bias = bias.reshape(-1)
        out = node.output[0]
    else:
        fc = graph.const(node, 1, "fc weight").T
        if fc.ndim != 2 or fc.shape[1] != features_in:
            raise graph.error(f"tensor '{node.input[1]}' (fc weight of {graph.node_name(node)}) "
                              f"has shape {fc.T.shape}, expected ({features_in}, embedding)")
        out = node.output[0]
        bias = None
        following = graph.next_nodes(out)
        if len(following) == 1 and graph.nodes[following[0]].op_type == "Add":
            add = graph.nodes[following[0]]
            other = [name for name in add.input if name != out]
            if len(other) != 1 or other[0] not in graph.consts:
                raise graph.error(f"{graph.node_name(add)} after the fc MatMul is not a bias add")
            bias = graph.const(add, list(add.input).index(other[0]), "fc bias").reshape(-1)
            if bias.shape != (fc.shape[0],):
                raise graph.error(f"tensor '{other[0]}' (fc bias) has {bias.size} values, "
                                  f"expected {fc.shape[0]}")
            graph.visited.add(following[0])
            out = add.output[0]
    embedding = fc.shape[0]
    state["fc.weight"] = fc
    state["fc.bias"] = np.zeros(embedding) if bias is None else bias
    following = graph.next_nodes(out)
    if len(following) == 1 and graph.nodes[following[0]].op_type == "BatchNormalization":
        features, out = _pre_bn(graph, following[0], embedding)
    else:
        features = _identity_bn(embedding, None)  # BN1d folded into the fc (or absent)
    _put_bn(state, "features", features)

    if out not in graph.outputs:
        extra = [graph.node_name(graph.nodes[i]) for i in graph.next_nodes(out)]
        raise graph.error(f"the embedding '{out}' is not the graph output {graph.outputs}; "
                          f"unexpected ops after it: {extra}")
    unvisited = [graph.node_name(n) for i, n in enumerate(graph.nodes) if i not in graph.visited]
    if unvisited:
        raise graph.error(f"ops not part of an arcface IResNet (cannot place them): "
                          f"{unvisited[:8]}{'...' if len(unvisited) > 8 else ''}")
    unused = sorted(set(graph.consts) - graph.used)
    if unused:
        shapes = [f"'{name}' {graph.consts[name].shape}" for name in unused[:8]]
        raise graph.error(f"tensors left unused (cannot place them): {', '.join(shapes)}"
                          f"{'...' if len(unused) > 8 else ''}")
    return state


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------


def import_arcface(path: str | os.PathLike, *, precision: Any = "highest"
                   ) -> Tuple[IResNet, dict]:
    """Load pretrained ArcFace weights: `module, variables = import_arcface(path)`.

    `module.apply(variables, images)` with images (B, 112, 112, 3) float32 RGB,
    (pixel - 127.5) / 127.5, returns (B, 512) embeddings equal to the source model's (relative
    error <= 1e-4; NCHW input of the source becomes NHWC here).

    path: an insightface / arcface_torch ONNX export (`*.onnx`, folded or unfolded BatchNorm) or
      an arcface_torch state dict (`backbone.pth`, torch >= 1.6 zip format; read without torch
      through the restricted unpickler). The depth and widths come from the file.
    precision: of the convs and fc; "highest" keeps float32 exactness on GPUs (TF32 would not);
      pass None for the backend's fast default.
    Raises FileNotFoundError for a missing path, `ArcFaceImportError` naming the tensor / op /
    key that does not fit (a `TorchCheckpointError` for unreadable .pth files).
    """
    source = os.fspath(path)
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such ArcFace weight file")
    with open(source, "rb") as handle:
        magic = handle.read(4)
    if magic.startswith(b"PK"):
        state = load_torch_state_dict(source)
    elif source.endswith((".pth", ".pt")):
        raise TorchCheckpointError(f"{source}: not a zip-format torch checkpoint (legacy torch "
                                   f"< 1.6 files are not supported)")
    else:
        state = state_dict_from_onnx(source)
    return variables_from_state_dict(state, source=source, precision=precision)
