"""dlib's face-recognition ResNet (`dlib_face_recognition_resnet_model_v1.dat`) as a Flax module.

The network is Davis King's public-domain metric-learning ResNet (99.38 % on LFW) that ships in
the PyPI package `face_recognition_models`. `import_dlib_resnet()` reads dlib's serialised
`anet_type` with our own parser (no dlib needed) and returns `(module, variables)`:

    module, variables = import_dlib_resnet()      # the file from face_recognition_models
    descriptors = module.apply(variables, chips)  # (B, 150, 150, 3) RGB 0..255 -> (B, 128)

`chips` are dlib face chips (see `recon.image.dlib_align`), float RGB pixel values in [0, 255];
the module does dlib's input normalisation itself: (pixel - mean_rgb) / 256 with the per-channel
means stored in the file (122.782, 117.001, 104.298). The output is dlib's descriptor as
`dlib.face_recognition_model_v1(path).compute_face_descriptor(chip)` returns it (not
normalised), to float32 rounding: max abs difference 3.8e-7 on noise, gradient and face chips
(tests/test_dlib_resnet.py), eager and under jit.

Architecture (dlib `examples/dnn_face_recognition_ex.cpp`), NHWC here, every size checked
against the file:

  stem    con 7x7/2 (32, no padding) -> affine -> relu -> max_pool 3x3/2 (no padding)  150->72->35
  level4  3 x ares<32>                                                                  35
  level3  ares_down<64>  + 3 x ares<64>                                                 17
  level2  ares_down<128> + 2 x ares<128>                                                8
  level1  ares_down<256> + 2 x ares<256>                                                4 (!)
  level0  ares_down<256> (dlib's last level: its 3x3/2 convs give a 1x1 map)            2 (!)
  pool    avg_pool_everything (mean over the spatial map)                               256
  fc      fc_no_bias<128>                                                               128

  ares<N>      = relu(block(x, stride 1) + x)
  ares_down<N> = relu(block(x, stride 2) (+) avg_pool 2x2/2(x))
  block        = affine(con 3x3/1 (pad 1)(relu(affine(con 3x3/s(x)))))
                 with dlib's default padding: 1 for stride 1, 0 (none) for stride 2.

dlib's `add_prev` adds two tensors of different shapes by zero-padding both to the larger size
(top-left aligned: extra channels, rows and columns are at the end). It matters three times:
every ares_down doubles the channels (the shortcut's missing channels are zeros), and at level1
the stride-2 block gives a 3x3 map while the 2x2/2 average pool of the 8x8 input gives 4x4, so
the sum is 4x4 with the block present only in the top-left 3x3; level0 likewise sums a 1x1
block with a 2x2 shortcut. `(+)` above is that padded add; it is reproduced exactly here.
`affine` is dlib's inference-time batch norm: x * gamma[c] + beta[c].

Parameters (`variables["params"]`), grouped so a trainer can freeze or train parts by their
top-level name (`LEVEL_NAMES`):

  stem/conv/{kernel (7,7,3,32), bias (32,)}, stem/affine/{scale, bias}
  level4..level0/block{j}/{conv1, affine1, conv2, affine2}     (block0 of level3..0 is ares_down)
  fc/kernel (256, 128)

Partial evaluation for feature caching: `FEATURE_POINTS` names the activations
("input" = normalised chips, "stem", "level4" ... "level0", "pool" = the 256-d average);

    f = module.apply(variables, chips, method=DlibResNet.features, until="level2")
    d = module.apply(variables, f, method=DlibResNet.from_features, after="level2")

gives exactly `module.apply(variables, chips)` for the same batch (the full call is literally
this composition; XLA's conv results can differ in the last bit between batch sizes).

Reader: the `.dat` file is dlib's `serialize(net)` stream (dlib/serialize.h, dlib/dnn/core.h,
layers.h, input.h, loss.h, cuda/tensor.h). Every layer's version string, hyper-parameters
(filter counts, kernel sizes, strides, paddings, modes), tensor shapes and the file's end are
checked; anything unexpected raises `DlibModelError` naming the layer, the problem and the byte
offset. The shipped file holds con_4, affine_ (batch norm already folded), relu_, add_prev_,
max_pool_2 / avg_pool_2, fc_2 and loss_metric_2 layers, every tensor as raw float32 (tensor
version 2) with empty gradient / output tensors; 5,614,592 parameters. The converted arrays are
cached once as
`$FACERECON_CACHE_DIR/dlib/<sha256 of the .dat>.npz` (default `~/.cache/facerecon_jax`), written
atomically; a cache hit does not parse the file again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import pathlib
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

INPUT_SIZE = 150
DESCRIPTOR_SIZE = 128
STEM_WIDTH = 32
# (name, width, blocks, first block downsamples), in forward order. level0 is dlib's last level
# (`alevel0` = one ares_down<256>: its block's map is 1x1, the padded sum 2x2).
LEVELS: Tuple[Tuple[str, int, int, bool], ...] = (
    ("level4", 32, 3, False),
    ("level3", 64, 4, True),
    ("level2", 128, 3, True),
    ("level1", 256, 3, True),
    ("level0", 256, 1, True),
)
# Top-level parameter groups, in forward order.
LEVEL_NAMES: Tuple[str, ...] = ("stem",) + tuple(level[0] for level in LEVELS) + ("fc",)
# What the regressor treats as parts (`recon.model.build.BACKBONES`): the parameter groups; the
# ones that train with `trainable="last_stage"` (the 256-channel levels and the fc: dlib's last
# stage, as the paper trains ArcFace's), and the frozen trunk's end (what `trunk_cache` caches).
PART_NAMES = LEVEL_NAMES
LAST_STAGE_PARTS: Tuple[str, ...] = ("level1", "level0", "fc")
TRUNK_END = "level2"
# The levels whose flattened map can be the module's output instead of the descriptor.
MAP_OUTPUTS: Tuple[str, ...] = ("level3", "level2", "level1", "level0")
# Activations `DlibResNet.features` can stop at (and `from_features` can start after).
FEATURE_POINTS: Tuple[str, ...] = (("input", "stem") + tuple(level[0] for level in LEVELS)
                                   + ("pool",))
# dlib's input_rgb_image_sized defaults; the file's own values are used when importing.
DEFAULT_MEAN_RGB: Tuple[float, float, float] = (float(np.float32(122.782)),
                                                float(np.float32(117.001)),
                                                float(np.float32(104.298)))
INPUT_SCALE = 256.0  # dlib divides (pixel - mean) by 256, not 255

MODEL_FILENAME = "dlib_face_recognition_resnet_model_v1.dat"
CACHE_ENV = "FACERECON_CACHE_DIR"
CACHE_FORMAT = 1  # bump when the cached array layout changes

PathLike = Union[str, os.PathLike]


class DlibModelError(ValueError):
    """A file that is not dlib's face-recognition ResNet as expected (the message says why)."""


# =============================================================================================
# Flax module
# =============================================================================================

_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class Affine(nn.Module):
    """dlib's `affine_` in CONV_MODE (batch norm folded for inference): x * scale[c] + bias[c]."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        return x * scale.astype(self.dtype) + bias.astype(self.dtype)


def _conv(name: str, features: int, kernel: int, stride: int, dtype, param_dtype,
          precision) -> nn.Conv:
    # dlib's default padding (con_ template defaults): kernel // 2 when the stride is 1, none
    # otherwise; always symmetric, zeros.
    pad = kernel // 2 if stride == 1 else 0
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=True, kernel_init=_conv_init,
                   dtype=dtype, param_dtype=param_dtype, precision=precision, name=name)


def _add_zero_padded(a: jax.Array, b: jax.Array) -> jax.Array:
    """dlib's add_prev: a + b over the larger shape, each zero-padded at the end (NHWC)."""
    if a.shape == b.shape:
        return a + b
    shape = tuple(max(sa, sb) for sa, sb in zip(a.shape, b.shape))

    def pad(t):
        return jnp.pad(t, [(0, s - ts) for s, ts in zip(shape, t.shape)])

    return pad(a) + pad(b)


class Block(nn.Module):
    """dlib `ares<N>` (stride 1, identity shortcut) or `ares_down<N>` (stride 2, 2x2 avg-pool
    shortcut, zero-padded add)."""

    features: int
    stride: int = 1
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        y = _conv("conv1", self.features, 3, self.stride, **common)(x)
        y = Affine(dtype=self.dtype, param_dtype=self.param_dtype, name="affine1")(y)
        y = nn.relu(y)
        y = _conv("conv2", self.features, 3, 1, **common)(y)
        y = Affine(dtype=self.dtype, param_dtype=self.param_dtype, name="affine2")(y)
        if self.stride == 1:
            shortcut = x
        else:
            shortcut = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        return nn.relu(_add_zero_padded(y, shortcut.astype(y.dtype)))


class Stem(nn.Module):
    """con<32,7,7,2,2> (no padding) -> affine -> relu -> max_pool<3,3,2,2> (no padding)."""

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _conv("conv", STEM_WIDTH, 7, 2, self.dtype, self.param_dtype, self.precision)(x)
        x = Affine(dtype=self.dtype, param_dtype=self.param_dtype, name="affine")(x)
        x = nn.relu(x)
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class Level(nn.Module):
    features: int
    blocks: int
    downsample: bool
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.blocks):
            stride = 2 if (j == 0 and self.downsample) else 1
            x = Block(self.features, stride, dtype=self.dtype, param_dtype=self.param_dtype,
                      precision=self.precision, name=f"block{j}")(x)
        return x


class DlibResNet(nn.Module):
    """dlib's face-recognition ResNet: (B, 150, 150, 3) RGB [0, 255] -> (B, 128) descriptor.

    Attributes:
      mean_rgb: per-channel means subtracted before the /256 scaling (the file's values when
        built by `import_dlib_resnet`).
      dtype / param_dtype / precision: passed to every conv, affine and the fc layer. The
        descriptor is returned as float32 whatever `dtype` is.
      output: "descriptor" (dlib's 128-d metric embedding: average pool + fc) or a level name
        (`MAP_OUTPUTS`): that level's activation flattened, e.g. "level2": (B, 8 * 8 * 128).
        A map keeps where on the face the features are, which the deeper levels' strided
        convolutions and the average pool discard (they make the descriptor invariant to
        pose and expression); ArcFace's flatten + FC output keeps it too. The levels after it
        and the fc are then unused and have no parameters.
    """

    mean_rgb: Tuple[float, float, float] = DEFAULT_MEAN_RGB
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    precision: Any = None
    output: str = "descriptor"

    def setup(self):
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
        self.stem = Stem(**common)
        self.level4 = Level(*LEVELS[0][1:], **common)
        self.level3 = Level(*LEVELS[1][1:], **common)
        self.level2 = Level(*LEVELS[2][1:], **common)
        self.level1 = Level(*LEVELS[3][1:], **common)
        self.level0 = Level(*LEVELS[4][1:], **common)
        self.fc = nn.Dense(DESCRIPTOR_SIZE, use_bias=False, dtype=self.dtype,
                           param_dtype=self.param_dtype, precision=self.precision)

    def normalize(self, chips: jax.Array) -> jax.Array:
        """dlib's input_rgb_image_sized: (pixel - mean[c]) / 256, computed in float32."""
        if chips.ndim != 4 or chips.shape[-1] != 3:
            raise ValueError(f"chips must be (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) RGB, got shape "
                             f"{chips.shape}")
        if chips.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"dlib's network takes {INPUT_SIZE}x{INPUT_SIZE} chips, got "
                             f"{chips.shape[1]}x{chips.shape[2]}")
        mean = jnp.asarray(self.mean_rgb, jnp.float32)
        x = (chips.astype(jnp.float32) - mean) / jnp.float32(INPUT_SCALE)
        return x.astype(self.dtype)

    def _stage(self, name: str, x: jax.Array) -> jax.Array:
        if name == "stem":
            return self.stem(x)
        if name == "pool":  # avg_pool_everything
            return jnp.mean(x, axis=(1, 2))
        return getattr(self, name)(x)

    def features(self, chips: jax.Array, until: str = "level0") -> jax.Array:
        """The activation after `until` (one of FEATURE_POINTS) for chips in [0, 255]."""
        stop = _feature_index(until, "until")
        x = self.normalize(chips)
        for name in FEATURE_POINTS[1:stop + 1]:
            x = self._stage(name, x)
        return x

    def from_features(self, features: jax.Array, after: str = "level0",
                      train: bool = False) -> jax.Array:
        """Finish the network from `features(chips, until=after)`: the (B, 128) descriptor, or
        with a map output that level's flattened map. (`train` is accepted for the backbone
        interface; the network has no BatchNorm.)"""
        if self.output not in ("descriptor",) + MAP_OUTPUTS:
            raise ValueError(f"output must be 'descriptor' or one of {MAP_OUTPUTS}, got "
                             f"{self.output!r}")
        start = _feature_index(after, "after")
        x = features
        if self.output != "descriptor":
            stop = FEATURE_POINTS.index(self.output)
            if start > stop:
                raise ValueError(f"after={after!r} lies beyond output {self.output!r}")
            for name in FEATURE_POINTS[start + 1:stop + 1]:
                x = self._stage(name, x)
            return x.reshape(x.shape[0], -1).astype(jnp.float32)
        for name in FEATURE_POINTS[start + 1:]:
            x = self._stage(name, x)
        return self.fc(x).astype(jnp.float32)

    def __call__(self, chips: jax.Array, train: bool = False) -> jax.Array:
        return self.from_features(self.features(chips, until="stem"), after="stem")


def _feature_index(name: str, argument: str) -> int:
    if name not in FEATURE_POINTS:
        raise ValueError(f"{argument}={name!r}: expected one of {FEATURE_POINTS}")
    return FEATURE_POINTS.index(name)


def init_variables(module: Optional[DlibResNet] = None, seed: int = 0) -> Dict[str, Any]:
    """Random variables for `module` (default `DlibResNet()`), for tests and training."""
    module = module if module is not None else DlibResNet()
    chips = jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.jit(module.init)(jax.random.PRNGKey(seed), chips)


# =============================================================================================
# dlib's serialisation format
# =============================================================================================
#
# Integers (dlib/serialize.h, pack_int/unpack_int): one control byte, then |value| in
# little-endian bytes. Control byte: bit 0x80 = negative (signed types only), low 4 bits = the
# number of bytes that follow (1..sizeof(T); zero is written as 0x01 0x00), bits 0x70 reserved
# and ignored. Negative values are sign-magnitude, not two's complement.
# Strings: the length as an unsigned integer, then the bytes (no terminator). C string literals
# (the layers' version tags) are written the same way.
# bool: the single ASCII byte '1' or '0'.
# float/double (float_details): value = mantissa * 2**exponent with mantissa an int64 and
# exponent an int16, each an integer as above -- the mantissa first (serialize.h's comment says
# "exponent first", the code writes the mantissa first). Exponents 32000 / 32001 / 32002 mean
# +inf / -inf / NaN. A first byte with any of the bits 0x70 set marks dlib's older ASCII
# float format, which this file does not use (rejected).
# tensors (cuda/tensor.h, resizable_tensor): int version 2, then num_samples, k, nr, nc as
# integers, then num_samples*k*nr*nc raw little-endian IEEE float32 values (NCHW order).
# alias_tensor: int version 1 then the four sizes (no data).
#
# A network (dlib/dnn/core.h) is written outside-in: add_loss_layer = version 1, loss details,
# subnetwork; add_layer = version (1 or 2), subnetwork, layer details, 3 bools,
# x_grad, cached_output tensors, (version 2) params_grad; the add_layer directly over the input
# layer = version (2 or 3), input layer, details, 3 bools, x_grad, cached_output, grad_final,
# (version 3) sample_expansion_factor; add_tag_layer / add_skip_layer = version 1, subnetwork
# (their tag ids are not stored). So all the versions come first, top layer to bottom, then
# the input layer, then every layer's details from the bottom up.

_SPECIAL_EXPONENTS = {32000: math.inf, 32001: -math.inf, 32002: math.nan}


class _Stream:
    """Cursor over the file's bytes; every read names what it reads for the error message."""

    def __init__(self, data: bytes, name: str):
        self.data = data
        self.pos = 0
        self.name = name
        self.context = ""

    def fail(self, message: str, at: Optional[int] = None) -> DlibModelError:
        where = f" [{self.context}]" if self.context else ""
        at = self.pos if at is None else at
        return DlibModelError(f"{self.name}: {message}{where} (at byte {at} of {len(self.data)})")

    def take(self, count: int, what: str) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise self.fail(f"the file ends while reading {what} (needs {count} more bytes, "
                            f"{len(self.data) - self.pos} left): truncated file")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def integer(self, what: str, signed: bool = True, max_bytes: int = 8) -> int:
        start = self.pos
        control = self.take(1, what)[0]
        negative = bool(control & 0x80)
        size = control & 0x0F
        if negative and not signed:
            raise self.fail(f"{what}: negative value for an unsigned integer (control byte "
                            f"{control:#04x})", start)
        if size == 0 or size > max_bytes:
            raise self.fail(f"{what}: bad integer control byte {control:#04x} (size {size}, "
                            f"expected 1..{max_bytes})", start)
        value = int.from_bytes(self.take(size, what), "little")
        return -value if negative else value

    def string(self, what: str, max_length: int = 1 << 20) -> str:
        start = self.pos
        length = self.integer(f"{what} length", signed=False)
        if length > max_length:
            raise self.fail(f"{what}: implausible string length {length}", start)
        raw = self.take(length, what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.fail(f"{what}: not an ASCII string: {raw[:40]!r}", start) from None

    def tag(self, what: str, allowed: Sequence[str]) -> str:
        start = self.pos
        found = self.string(what, max_length=256)
        if found not in allowed:
            expected = " or ".join(repr(name) for name in allowed)
            raise self.fail(f"wrong layer tag for {what}: expected {expected}, found {found!r}",
                            start)
        return found

    def boolean(self, what: str) -> bool:
        start = self.pos
        byte = self.take(1, what)
        if byte not in (b"0", b"1"):
            raise self.fail(f"{what}: a bool must be the byte '0' or '1', found {byte!r}", start)
        return byte == b"1"

    def real(self, what: str, finite: bool = True) -> float:
        start = self.pos
        if self.pos < len(self.data) and self.data[self.pos] & 0x70:
            raise self.fail(f"{what}: not dlib's binary float encoding (byte "
                            f"{self.data[self.pos]:#04x}; the old ASCII format is not supported)")
        mantissa = self.integer(f"{what} (mantissa)", max_bytes=8)
        exponent = self.integer(f"{what} (exponent)", max_bytes=2)
        if exponent in _SPECIAL_EXPONENTS:
            value = _SPECIAL_EXPONENTS[exponent]
        elif exponent > 32002:
            raise self.fail(f"{what}: bad float exponent {exponent}", start)
        else:
            value = math.ldexp(float(mantissa), exponent)
        if finite and not math.isfinite(value):
            raise self.fail(f"{what} is not finite ({value})", start)
        return value

    def version(self, what: str, allowed: Sequence[int]) -> int:
        start = self.pos
        value = self.integer(f"{what} version")
        if value not in allowed:
            raise self.fail(f"{what}: unexpected serialisation version {value} (expected "
                            f"{' or '.join(map(str, allowed))})", start)
        return value

    def tensor(self, what: str) -> np.ndarray:
        self.version(f"{what} tensor", (2,))
        start = self.pos
        shape = tuple(self.integer(f"{what} size") for _ in range(4))
        if min(shape) < 0:
            raise self.fail(f"{what}: negative tensor size {shape}", start)
        count = int(np.prod(shape, dtype=np.int64))
        if count * 4 > len(self.data) - self.pos:
            raise self.fail(f"the file ends while reading {what}: tensor {shape} needs "
                            f"{count * 4} bytes, {len(self.data) - self.pos} left: truncated "
                            "file")
        raw = self.take(count * 4, what)
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float32)

    def alias_tensor(self, what: str) -> Tuple[int, ...]:
        self.version(f"{what} alias_tensor", (1,))
        return tuple(self.integer(f"{what} size") for _ in range(4))


@dataclasses.dataclass(frozen=True)
class _Layer:
    """One wrapper of dlib's network, as expected at its position."""

    kind: str      # con, affine, relu, max_pool, avg_pool, add_prev, fc, tag, skip
    path: str      # where its parameters go / a readable name for errors
    filters: int = 0
    in_channels: int = 0
    kernel: int = 0
    stride: int = 1


def _expected_layers() -> List[_Layer]:
    """anet_type's wrappers from the bottom (next to the input) to the top (fc)."""
    layers = [_Layer("con", "stem/conv", STEM_WIDTH, 3, 7, 2),
              _Layer("affine", "stem/affine", STEM_WIDTH),
              _Layer("relu", "stem/relu"),
              _Layer("max_pool", "stem/max_pool", kernel=3, stride=2)]
    channels = STEM_WIDTH
    for name, width, blocks, downsample in LEVELS:
        for j in range(blocks):
            stride = 2 if (j == 0 and downsample) else 1
            path = f"{name}/block{j}"
            layers += [_Layer("tag", f"{path}/tag1 (block input)"),
                       _Layer("con", f"{path}/conv1", width, channels, 3, stride),
                       _Layer("affine", f"{path}/affine1", width),
                       _Layer("relu", f"{path}/relu1"),
                       _Layer("con", f"{path}/conv2", width, width, 3, 1),
                       _Layer("affine", f"{path}/affine2", width)]
            if stride == 2:
                layers += [_Layer("tag", f"{path}/tag2 (block output)"),
                           _Layer("skip", f"{path}/skip1 (back to the block input)"),
                           _Layer("avg_pool", f"{path}/shortcut_avg_pool", kernel=2, stride=2)]
            layers += [_Layer("add_prev", f"{path}/add"), _Layer("relu", f"{path}/relu_out")]
            channels = width
    layers += [_Layer("avg_pool", "pool (avg_pool_everything)", kernel=0, stride=1),
               _Layer("fc", "fc", DESCRIPTOR_SIZE, channels)]
    return layers


def _check(stream: _Stream, condition: bool, message: str):
    if not condition:
        raise stream.fail(message)


def _read_con(s: _Stream, layer: _Layer, out: Dict[str, np.ndarray]):
    version = s.tag("con_ layer", ("con_4", "con_5", "con_6"))
    params = s.tensor("params")
    num_filters = s.integer("num_filters")
    nr, nc = s.integer("nr"), s.integer("nc")
    stride_y, stride_x = s.integer("stride_y"), s.integer("stride_x")
    pad_y, pad_x = s.integer("padding_y"), s.integer("padding_x")
    filters = s.alias_tensor("filters")
    biases = s.alias_tensor("biases")
    for what in ("learning_rate_multiplier", "weight_decay_multiplier",
                 "bias_learning_rate_multiplier", "bias_weight_decay_multiplier"):
        s.real(what)
    use_bias = s.boolean("use_bias") if version in ("con_5", "con_6") else True
    use_relu = s.boolean("use_relu") if version == "con_6" else False
    k, n, c = layer.kernel, layer.filters, layer.in_channels
    pad = k // 2 if layer.stride == 1 else 0  # dlib's default padding
    _check(s, num_filters == n, f"num_filters {num_filters}, expected {n}")
    _check(s, (nr, nc) == (k, k), f"kernel {nr}x{nc}, expected {k}x{k}")
    _check(s, (stride_y, stride_x) == (layer.stride,) * 2,
           f"stride {stride_y}x{stride_x}, expected {layer.stride}x{layer.stride}")
    _check(s, (pad_y, pad_x) == (pad, pad), f"padding {pad_y}x{pad_x}, expected {pad}x{pad}")
    _check(s, filters == (n, c, k, k),
           f"wrong tensor shape: filters {filters}, expected {(n, c, k, k)}")
    _check(s, not use_relu, "con_ with a fused relu (use_relu) is not expected here")
    n_weights = n * c * k * k
    if use_bias:
        _check(s, biases == (1, n, 1, 1),
               f"wrong tensor shape: biases {biases}, expected {(1, n, 1, 1)}")
    total = n_weights + (n if use_bias else 0)
    _check(s, params.shape == (total, 1, 1, 1),
           f"wrong tensor shape: params {params.shape}, expected {(total, 1, 1, 1)}")
    flat = params.reshape(-1)
    # filters are (num_filters, k, nr, nc) = OIHW at offset 0, then the biases.
    out[f"{layer.path}/kernel"] = flat[:n_weights].reshape(n, c, k, k).transpose(2, 3, 1, 0)
    out[f"{layer.path}/bias"] = (flat[n_weights:] if use_bias
                                 else np.zeros((n,), np.float32)).copy()


def _read_affine(s: _Stream, layer: _Layer, out: Dict[str, np.ndarray]):
    version = s.tag("affine_ layer", ("affine_", "affine_2"))
    params = s.tensor("params")
    gamma = s.alias_tensor("gamma")
    beta = s.alias_tensor("beta")
    mode = s.integer("mode")
    disabled = s.boolean("disabled") if version == "affine_2" else False
    n = layer.filters
    _check(s, mode == 0, f"affine_ mode {mode}, expected 0 (CONV_MODE, per channel)")
    _check(s, not disabled, "a disabled affine_ layer is not expected here")
    _check(s, gamma == (1, n, 1, 1) and beta == (1, n, 1, 1),
           f"wrong tensor shape: gamma {gamma} / beta {beta}, expected {(1, n, 1, 1)}")
    _check(s, params.size == 2 * n and params.shape[1:] == (1, 1, 1),
           f"wrong tensor shape: params {params.shape}, expected {(2 * n, 1, 1, 1)}")
    flat = params.reshape(-1)
    out[f"{layer.path}/scale"] = flat[:n].copy()  # gamma at offset 0, beta after it
    out[f"{layer.path}/bias"] = flat[n:].copy()


def _read_relu(s: _Stream, layer: _Layer, out):
    version = s.tag("relu_ layer", ("relu_", "relu_2"))
    if version == "relu_2":
        _check(s, not s.boolean("disabled"), "a disabled relu_ layer is not expected here")


def _read_pool(s: _Stream, layer: _Layer, out):
    kind = layer.kind
    s.tag(f"{kind}_ layer", (f"{kind}_2",))
    nr, nc = s.integer("nr"), s.integer("nc")
    stride_y, stride_x = s.integer("stride_y"), s.integer("stride_x")
    pad_y, pad_x = s.integer("padding_y"), s.integer("padding_x")
    k, stride = layer.kernel, layer.stride
    pad = k // 2 if stride == 1 else 0
    _check(s, (nr, nc) == (k, k), f"window {nr}x{nc}, expected {k}x{k}")
    _check(s, (stride_y, stride_x) == (stride, stride),
           f"stride {stride_y}x{stride_x}, expected {stride}x{stride}")
    _check(s, (pad_y, pad_x) == (pad, pad), f"padding {pad_y}x{pad_x}, expected {pad}x{pad}")


def _read_add_prev(s: _Stream, layer: _Layer, out):
    s.tag("add_prev_ layer", ("add_prev_",))


def _read_fc(s: _Stream, layer: _Layer, out: Dict[str, np.ndarray]):
    version = s.tag("fc_ layer", ("fc_2", "fc_3"))
    num_outputs = s.integer("num_outputs", signed=False)
    num_inputs = s.integer("num_inputs", signed=False)
    params = s.tensor("params")
    weights = s.alias_tensor("weights")
    s.alias_tensor("biases")
    bias_mode = s.integer("bias_mode")
    for what in ("learning_rate_multiplier", "weight_decay_multiplier",
                 "bias_learning_rate_multiplier", "bias_weight_decay_multiplier"):
        s.real(what)
    if version == "fc_3":
        s.boolean("use_bias")
    n_in, n_out = layer.in_channels, layer.filters
    _check(s, bias_mode == 1, f"fc_ bias_mode {bias_mode}, expected 1 (FC_NO_BIAS)")
    _check(s, (num_outputs, num_inputs) == (n_out, n_in),
           f"fc_ {num_inputs} -> {num_outputs}, expected {n_in} -> {n_out}")
    _check(s, weights == (n_in, n_out, 1, 1),
           f"wrong tensor shape: weights {weights}, expected {(n_in, n_out, 1, 1)}")
    _check(s, params.shape == (n_in, n_out, 1, 1),
           f"wrong tensor shape: params {params.shape}, expected {(n_in, n_out, 1, 1)}")
    # output = input (N, num_inputs) @ weights (num_inputs, num_outputs): already Flax's layout.
    out[f"{layer.path}/kernel"] = params.reshape(n_in, n_out).copy()


_READERS = {"con": _read_con, "affine": _read_affine, "relu": _read_relu,
            "max_pool": _read_pool, "avg_pool": _read_pool, "add_prev": _read_add_prev,
            "fc": _read_fc}


def parse_dlib_resnet(data: bytes, name: str = "<bytes>") -> Dict[str, np.ndarray]:
    """Parse the bytes of `dlib_face_recognition_resnet_model_v1.dat`.

    Returns {"stem/conv/kernel": HWIO float32, ..., "fc/kernel": (256, 128),
    "input/mean_rgb": (3,) float32, "loss/margin_threshold": (2,) float32}. Raises
    `DlibModelError` for anything that is not exactly the expected network.
    """
    s = _Stream(bytes(data), name)
    out: Dict[str, np.ndarray] = {}
    s.context = "loss layer"
    s.version("add_loss_layer", (1,))
    loss_version = s.tag("loss_metric_ layer", ("loss_metric_", "loss_metric_2"))
    if loss_version == "loss_metric_2":
        margin, threshold = s.real("margin"), s.real("distance_threshold")
    else:
        margin, threshold = 0.1, 0.75
    out["loss/margin_threshold"] = np.asarray([margin, threshold], np.float32)

    layers = _expected_layers()
    versions = {}
    # Outside-in: every wrapper's version, from the fc down to the stem's conv.
    for index in range(len(layers) - 1, -1, -1):
        layer = layers[index]
        s.context = layer.path
        if layer.kind in ("tag", "skip"):
            s.version(f"add_{layer.kind}_layer", (1,))
        elif index == 0:
            versions[index] = s.version("add_layer (over the input layer)", (2, 3))
        else:
            versions[index] = s.version("add_layer", (1, 2))

    s.context = "input layer"
    s.tag("input layer", ("input_rgb_image_sized",))
    mean = [s.real(f"avg_{colour}") for colour in ("red", "green", "blue")]
    rows, cols = s.integer("nr", signed=False), s.integer("nc", signed=False)
    _check(s, (rows, cols) == (INPUT_SIZE, INPUT_SIZE),
           f"input size {rows}x{cols}, expected {INPUT_SIZE}x{INPUT_SIZE}")
    out["input/mean_rgb"] = np.asarray(mean, np.float32)

    # Inside-out: each layer's details and add_layer's trailing state.
    for index, layer in enumerate(layers):
        if layer.kind in ("tag", "skip"):
            continue
        s.context = layer.path
        _READERS[layer.kind](s, layer, out)
        for what in ("this_layer_setup_called", "gradient_input_is_stale",
                     "get_output_and_gradient_input_disabled"):
            s.boolean(what)
        s.tensor("x_grad")
        s.tensor("cached_output")
        if index == 0:
            s.tensor("grad_final")
            if versions[index] >= 3:
                s.integer("sample_expansion_factor", signed=False)
        elif versions[index] >= 2:
            s.tensor("params_grad")
    s.context = ""
    if s.pos != len(s.data):
        raise s.fail(f"{len(s.data) - s.pos} trailing bytes after the network")

    for key, value in out.items():
        bad = ~np.isfinite(value)
        if bad.any():
            raise DlibModelError(f"{name}: {key} has {int(bad.sum())} non-finite values")
    return out


# =============================================================================================
# Import with cache
# =============================================================================================

def default_model_path() -> pathlib.Path:
    """The .dat inside the `face_recognition_models` package."""
    try:
        import face_recognition_models
    except ImportError as error:
        raise DlibModelError(
            "dlib's face-recognition network ships in the package face_recognition_models; "
            "install it with `pip install face_recognition_models` or pass the path of "
            f"{MODEL_FILENAME}") from error
    return pathlib.Path(face_recognition_models.face_recognition_model_location())


def default_cache_dir() -> pathlib.Path:
    """$FACERECON_CACHE_DIR, else ~/.cache/facerecon_jax."""
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "facerecon_jax"


def _expected_shapes() -> Dict[str, Tuple[int, ...]]:
    shapes = {"input/mean_rgb": (3,), "loss/margin_threshold": (2,)}
    for layer in _expected_layers():
        if layer.kind == "con":
            k = layer.kernel
            shapes[f"{layer.path}/kernel"] = (k, k, layer.in_channels, layer.filters)
            shapes[f"{layer.path}/bias"] = (layer.filters,)
        elif layer.kind == "affine":
            shapes[f"{layer.path}/scale"] = (layer.filters,)
            shapes[f"{layer.path}/bias"] = (layer.filters,)
        elif layer.kind == "fc":
            shapes[f"{layer.path}/kernel"] = (layer.in_channels, layer.filters)
    return shapes


def _read_cache(path: pathlib.Path) -> Optional[Dict[str, np.ndarray]]:
    """The cached arrays, or None when the cache file is missing or not what we wrote."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except Exception:  # a damaged cache is rebuilt, never trusted
        return None
    if int(arrays.pop("__format__", -1)) != CACHE_FORMAT:
        return None
    expected = _expected_shapes()
    if set(arrays) != set(expected):
        return None
    for key, shape in expected.items():
        if arrays[key].shape != shape or arrays[key].dtype != np.float32:
            return None
    return arrays


def _write_cache(path: pathlib.Path, arrays: Mapping[str, np.ndarray]):
    from flame_jax.fileio import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(arrays)
    payload["__format__"] = np.asarray(CACHE_FORMAT)
    atomic_write(path, lambda handle: np.savez(handle, **payload))


def load_dlib_arrays(path: Optional[PathLike] = None, *, cache_dir: Optional[PathLike] = None,
                     use_cache: bool = True) -> Dict[str, np.ndarray]:
    """{name: float32 array} of the network (see `parse_dlib_resnet`), through the .npz cache."""
    path = pathlib.Path(path) if path is not None else default_model_path()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DlibModelError(f"{path}: no such file") from None
    digest = hashlib.sha256(data).hexdigest()
    cache_path = None
    if use_cache:
        cache_path = pathlib.Path(cache_dir or default_cache_dir()) / "dlib" / f"{digest}.npz"
        cached = _read_cache(cache_path)
        if cached is not None:
            return cached
    arrays = parse_dlib_resnet(data, str(path))
    if cache_path is not None:
        try:
            _write_cache(cache_path, arrays)
        except OSError:
            pass  # a read-only cache folder only costs the parse next time
    return arrays


def variables_from_arrays(arrays: Mapping[str, np.ndarray]) -> Dict[str, Any]:
    """Nest the flat {'level3/block0/conv1/kernel': ...} arrays into Flax variables."""
    params: Dict[str, Any] = {}
    for key, value in arrays.items():
        if key.split("/")[0] not in LEVEL_NAMES:
            continue
        node = params
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = jnp.asarray(value)
    return {"params": params}


def import_dlib_resnet(path: Optional[PathLike] = None, *, cache_dir: Optional[PathLike] = None,
                       dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                       precision: Any = None) -> Tuple[DlibResNet, Dict[str, Any]]:
    """(module, variables) for dlib's face-recognition ResNet.

    Args:
      path: the .dat file; None finds `dlib_face_recognition_resnet_model_v1.dat` through the
        `face_recognition_models` package.
      cache_dir: where `dlib/<sha256>.npz` is kept (default $FACERECON_CACHE_DIR or
        ~/.cache/facerecon_jax).
      dtype, param_dtype, precision: for the module (parameters are cast to `param_dtype`).
    """
    arrays = load_dlib_arrays(path, cache_dir=cache_dir)
    mean = tuple(float(v) for v in arrays["input/mean_rgb"])
    module = DlibResNet(mean_rgb=mean, dtype=dtype, param_dtype=param_dtype,
                        precision=precision)
    variables = variables_from_arrays(arrays)
    if np.dtype(param_dtype) != np.float32:
        variables = jax.tree_util.tree_map(lambda a: a.astype(param_dtype), variables)
    return module, variables


__all__ = [
    "DEFAULT_MEAN_RGB", "DESCRIPTOR_SIZE", "FEATURE_POINTS", "INPUT_SCALE", "INPUT_SIZE",
    "LEVELS", "LEVEL_NAMES", "MODEL_FILENAME", "Affine", "Block", "DlibModelError",
    "DlibResNet", "Level", "Stem", "default_cache_dir", "default_model_path",
    "import_dlib_resnet", "init_variables", "load_dlib_arrays", "parse_dlib_resnet",
    "variables_from_arrays",
]
