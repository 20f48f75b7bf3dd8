"""IResNet (arcface_torch's `backbones/iresnet.py`) in Flax linen, NHWC.

Layout (names mirror arcface_torch so imported weights map one to one):

  stem:    conv (3x3, stride 1, no bias) -> bn -> prelu                    (torch conv1, bn1, prelu)
  stageK:  blockJ = bn1 -> conv1 (3x3) -> bn2 -> prelu -> conv2 (3x3, stride) -> bn3, plus a
           shortcut, which for the first block of every stage (stride 2) is
           downsample_conv (1x1, stride 2) -> downsample_bn                (torch layerK.J.*)
  output:  bn -> flatten in torch's (C, H, W) order -> fc -> features (BatchNorm1d)
                                                                           (torch bn2, fc, features)

Parameter paths are nested: `params['stage4']['block0']['conv1']['kernel']`, batch statistics
live in the `batch_stats` collection under the same paths. Every BatchNorm uses eps 1e-5 and
momentum 0.9 (torch's 0.1). Every conv pads 1 pixel on each side like torch (Flax's 'SAME' pads
stride-2 convs asymmetrically, which would not match imported weights).

Freezing (paper / MICA: only the last stage, 3 blocks for IResNet-100, and the output train):
`TRAINABLE_PREFIXES` and `backbone_trainable_labels`. arcface_torch fixes the feature BN's weight
to 1 (`requires_grad = False`), so `output/features/scale` stays frozen as well.
BatchNorm statistics: by default every BatchNorm normalises with its running averages even when
`train=True` (eval-mode BN), so frozen statistics can never change; `batch_norm_train_parts`
names the top-level parts whose BatchNorms use and update batch statistics when `train=True`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9  # torch's momentum 0.1 = weight of the new batch
INPUT_SIZE = 112  # the FC expects a 7 x 7 map after four stride-2 stages
STAGE_NAMES = ("stage1", "stage2", "stage3", "stage4")
PART_NAMES = ("stem",) + STAGE_NAMES + ("output",)

# Top-level parts that train when only the last stage trains (the paper, MICA), and the part
# after which the frozen trunk ends (its output is what `model.trunk_cache` caches).
TRAINABLE_PREFIXES = ("stage4", "output")
TRUNK_END = "stage3"
# Parameters arcface_torch never trains (features.weight.requires_grad = False).
ALWAYS_FROZEN_PATHS = (("output", "features", "scale"),)

_conv_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class PReLU(nn.Module):
    """Per-channel PReLU (torch.nn.PReLU(C)): x if x >= 0 else alpha[c] * x; alpha (C,) init 0.25."""

    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        alpha = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],),
                           self.param_dtype)
        return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


def _batch_norm(name: str, use_running_average: bool, dtype, param_dtype=jnp.float32
                ) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=use_running_average, momentum=BN_MOMENTUM,
                        epsilon=BN_EPSILON, dtype=dtype, param_dtype=param_dtype, name=name)


def _conv(name: str, features: int, kernel: int, stride: int, dtype, precision,
          param_dtype=jnp.float32) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=_conv_init,
                   dtype=dtype, param_dtype=param_dtype, precision=precision, name=name)


class Stem(nn.Module):
    width: int
    dtype: Any = jnp.float32
    precision: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        x = _conv("conv", self.width, 3, 1, self.dtype, self.precision, self.param_dtype)(x)
        x = _batch_norm("bn", use_running_average, self.dtype, self.param_dtype)(x)
        return PReLU(param_dtype=self.param_dtype, name="prelu")(x)


class IBasicBlock(nn.Module):
    """arcface_torch IBasicBlock: BN-Conv-BN-PReLU-Conv(stride)-BN + shortcut."""

    features: int
    stride: int
    downsample: bool
    dtype: Any = jnp.float32
    precision: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        out = _batch_norm("bn1", use_running_average, self.dtype, self.param_dtype)(x)
        out = _conv("conv1", self.features, 3, 1, self.dtype, self.precision, self.param_dtype)(out)
        out = _batch_norm("bn2", use_running_average, self.dtype, self.param_dtype)(out)
        out = PReLU(param_dtype=self.param_dtype, name="prelu")(out)
        out = _conv("conv2", self.features, 3, self.stride, self.dtype, self.precision, self.param_dtype)(out)
        out = _batch_norm("bn3", use_running_average, self.dtype, self.param_dtype)(out)
        shortcut = x
        if self.downsample:
            shortcut = _conv("downsample_conv", self.features, 1, self.stride, self.dtype,
                             self.precision, self.param_dtype)(x)
            shortcut = _batch_norm("downsample_bn", use_running_average, self.dtype, self.param_dtype)(shortcut)
        return out + shortcut


class Stage(nn.Module):
    """`num_blocks` IBasicBlocks named block0.., the first with stride 2 and a downsample."""

    features: int
    num_blocks: int
    dtype: Any = jnp.float32
    precision: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        for index in range(self.num_blocks):
            first = index == 0
            x = IBasicBlock(self.features, stride=2 if first else 1, downsample=first,
                            dtype=self.dtype, precision=self.precision,
                            param_dtype=self.param_dtype, name=f"block{index}")(x, use_running_average)
        return x


class Output(nn.Module):
    """bn -> flatten (C, H, W) -> fc -> features BN (arcface_torch bn2, fc, features)."""

    embedding_size: int
    dtype: Any = jnp.float32
    precision: Any = None
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        x = _batch_norm("bn", use_running_average, self.dtype, self.param_dtype)(x)
        # torch.flatten of an NCHW map: channel-major, so imported fc weights apply unchanged.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = nn.Dense(self.embedding_size, dtype=self.dtype, param_dtype=self.param_dtype,
                     precision=self.precision,
                     name="fc")(x)
        return _batch_norm("features", use_running_average, self.dtype, self.param_dtype)(x)


class IResNet(nn.Module):
    """arcface_torch IResNet on (B, 112, 112, 3) NHWC images -> (B, embedding_size) embeddings.

    Attributes:
      stages: blocks per stage (IResNet-18/34/50/100: (2,2,2,2), (3,4,6,3), (3,4,14,3),
        (3,13,30,3)).
      width: channels of the stem and stage 1; stages have width * (1, 2, 4, 8) (arcface: 64).
      embedding_size: output features (arcface: 512).
      dtype: computation dtype; param_dtype: the parameters' dtype (float32 by default).
      precision: `jax.lax.Precision` (or its name) of convs and the FC; None = backend default
        (TF32 on recent GPUs, ~1e-3 relative error on deep nets); "highest" for exact float32.
      batch_norm_train_parts: top-level parts (names from `PART_NAMES`) whose BatchNorms use
        batch statistics and update their running averages when `train=True`. Default none:
        eval-mode BatchNorm everywhere, so frozen statistics never change.
    Input: images (B, 112, 112, 3) float32, RGB, (pixel - 127.5) / 127.5.
    """

    stages: Sequence[int] = (3, 13, 30, 3)
    width: int = 64
    embedding_size: int = 512
    dtype: Any = jnp.float32
    precision: Any = None
    param_dtype: Any = jnp.float32
    batch_norm_train_parts: Sequence[str] = ()

    def setup(self):
        if len(self.stages) != 4 or min(self.stages) < 1:
            raise ValueError(f"IResNet needs 4 stages of >= 1 block, got {tuple(self.stages)}")
        unknown = sorted(set(self.batch_norm_train_parts) - set(PART_NAMES))
        if unknown:
            raise ValueError(f"batch_norm_train_parts {unknown} not in {PART_NAMES}")
        common = dict(dtype=self.dtype, precision=self.precision, param_dtype=self.param_dtype)
        self.stem = Stem(self.width, **common)
        self.stage1 = Stage(self.width, self.stages[0], **common)
        self.stage2 = Stage(self.width * 2, self.stages[1], **common)
        self.stage3 = Stage(self.width * 4, self.stages[2], **common)
        self.stage4 = Stage(self.width * 8, self.stages[3], **common)
        self.output = Output(self.embedding_size, **common)

    def _run(self, x: jax.Array, parts: Sequence[str], train: bool) -> jax.Array:
        for part in parts:
            running = not (train and part in self.batch_norm_train_parts)
            x = getattr(self, part)(x, running)
        return x

    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if images.ndim != 4 or images.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
            raise ValueError(f"IResNet expects (B, {INPUT_SIZE}, {INPUT_SIZE}, 3) images, got "
                             f"{images.shape}")
        return self._run(images.astype(self.dtype), PART_NAMES, train)

    def features(self, images: jax.Array, until: str) -> jax.Array:
        """The activation after part `until` (a name of `PART_NAMES`), BatchNorms in eval mode:
        the frozen trunk's output that a run may cache (`from_features` finishes the network)."""
        parts = PART_NAMES[:PART_NAMES.index(until) + 1]
        return self._run(images.astype(self.dtype), parts, train=False)

    def from_features(self, features: jax.Array, after: str, train: bool = False) -> jax.Array:
        """The parts after `after` applied to `features(images, until=after)`: equals
        `__call__(images, train)` when the parts up to `after` are frozen."""
        return self._run(features.astype(self.dtype), PART_NAMES[PART_NAMES.index(after) + 1:],
                         train)

    @classmethod
    def small(cls, **overrides) -> "IResNet":
        """A tiny IResNet for tests: one block per stage, width 8 (output still 512-d)."""
        options = dict(stages=(1, 1, 1, 1), width=8, embedding_size=512)
        options.update(overrides)
        return cls(**options)


def iresnet18(**overrides) -> IResNet:
    return IResNet(**{"stages": (2, 2, 2, 2), **overrides})


def iresnet34(**overrides) -> IResNet:
    return IResNet(**{"stages": (3, 4, 6, 3), **overrides})


def iresnet50(**overrides) -> IResNet:
    return IResNet(**{"stages": (3, 4, 14, 3), **overrides})


def iresnet100(**overrides) -> IResNet:
    return IResNet(**{"stages": (3, 13, 30, 3), **overrides})


def is_trainable_path(path: Sequence[str],
                      trainable_prefixes: Sequence[str] = TRAINABLE_PREFIXES) -> bool:
    """Whether the backbone parameter at `path` (keys from the params root) trains."""
    path = tuple(str(key) for key in path)
    if any(path[:len(fixed)] == fixed for fixed in ALWAYS_FROZEN_PATHS):
        return False
    return bool(path) and path[0] in tuple(trainable_prefixes)


def backbone_trainable_labels(params: Any,
                              trainable_prefixes: Sequence[str] = TRAINABLE_PREFIXES) -> Any:
    """Same-structure tree of "trainable" / "frozen" for an IResNet `params` tree.

    For `optax.multi_transform`; `trainable_prefixes` = the top-level parts that train (default
    the last stage and the output, minus the fixed feature-BN scale).
    """
    unknown = sorted(set(trainable_prefixes) - set(PART_NAMES))
    if unknown:
        raise ValueError(f"trainable_prefixes {unknown} not in {PART_NAMES}")

    def label(path, _leaf):
        keys = [getattr(entry, "key", getattr(entry, "name", entry)) for entry in path]
        return "trainable" if is_trainable_path(keys, trainable_prefixes) else "frozen"

    return jax.tree_util.tree_map_with_path(label, params)


def init_variables(module: IResNet, rng: Optional[jax.Array] = None, batch_size: int = 1) -> dict:
    """`module.init` on a zero batch: {'params': ..., 'batch_stats': ...}."""
    rng = jax.random.PRNGKey(0) if rng is None else rng
    images = jnp.zeros((batch_size, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return dict(module.init(rng, images))
