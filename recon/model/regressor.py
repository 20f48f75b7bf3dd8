"""Face crop -> 486-d code: a (partly frozen) backbone and a MICA-style mapping head.

    model = Regressor(backbone=IResNet.small(), initial_camera=camera)
    variables = model.init(rng, backbone_inputs)            # {"params", "batch_stats"}
    code = split_code(model.apply(variables, backbone_inputs))

Backbones (`recon.model.iresnet.IResNet`, `recon.model.dlib_resnet.DlibResNet`) offer
`__call__(images, train)`, `features(images, until=part)` (the frozen trunk) and
`from_features(x, after=part, train)` (the rest). `Regressor(input_kind="features",
trunk_end=part)` reads cached trunk features instead of images: the same parameters, the same
code, for runs that cache their frozen trunk with the training pool (`model.trunk_cache`).

Freezing (the paper's and MICA's: only the backbone's last stage, its output layers and the head
train) is the optimizer's: `trainable_labels` names every parameter "trainable" or "frozen" by its
path (`recon.training.regressor.step.make_optimizer` gives the frozen ones `optax.set_to_zero()`).
BatchNorm statistics are the backbone's business (IResNet's `batch_norm_train_parts`).

The head starts at a sensible code: its output layer has a small random kernel and its bias is
`initial_code_offset(camera)`: zero shape/pose/expression/texture, the camera of the FLAME
template in the run's crop (`recon.model.build.initial_camera`), and ambient grey light
(`AMBIENT_LIGHT_BAND0`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from recon.render import shading
from recon.types import CODE_SIZE, code_slices

Array = jax.Array

# SH band 0 whose shading is 1 (SH_CONSTANTS[0] * L0 = 1) on every normal: the rendered colour
# equals the albedo, mid-grey for albedo 0.5. Other bands start at 0 (ambient light).
AMBIENT_LIGHT_BAND0 = float(1.0 / shading.SH_CONSTANTS[0])
HEAD_NAME = "head"
BACKBONE_NAME = "backbone"
INPUT_KINDS = ("pixels", "features")
FEATURE_NORMS = ("l2", "batch", "data")


def initial_code_offset(camera: Sequence[float],
                        light_band0: float = AMBIENT_LIGHT_BAND0) -> np.ndarray:
    """(486,) float32 code the head outputs at initialisation (its output bias)."""
    offset = np.zeros((CODE_SIZE,), np.float32)
    slices = code_slices()
    offset[slices["camera"]] = np.asarray(camera, np.float32)
    light = np.zeros((9, 3), np.float32)
    light[0] = light_band0
    offset[slices["light"]] = light.reshape(-1)  # band-major, as Code.sh_light reads it
    return offset


def _kaiming_leaky(negative_slope: float) -> Callable:
    # MICA's kaiming_leaky_init: kaiming_normal(a=0.2, mode="fan_in", nonlinearity="leaky_relu").
    return nn.initializers.variance_scaling(2.0 / (1.0 + negative_slope ** 2), "fan_in", "normal")


def _small_uniform(scale: float) -> Callable:
    # torch.nn.Linear's default kernel init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), times `scale`
    # (MICA multiplies its output layer by 0.25).
    def init(key, shape, dtype=jnp.float32):
        bound = scale / math.sqrt(shape[0])
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class MappingHead(nn.Module):
    """MICA's mapping network: (B, F) features -> (B, 486) code.

    Linear F->hidden + LeakyReLU(0.2), `num_hidden` x (Linear hidden->hidden + LeakyReLU(0.2)),
    `CodeOutput` hidden->486 with a small kernel (`output_init_scale`), bias `output_offset`
    and the camera's kernel term scaled by `camera_output_scale` (see `CodeOutput`).
    input_norm: "none", "batch" (a BatchNorm on the features first: batch statistics in
    training, their running averages at evaluation) or "data" (the same layer, always with its
    stored statistics: those of the training data's features at initialisation, set by
    `recon.model.build.set_feature_statistics`, never updated). Statistics live in
    `batch_stats["head"]["input_norm"]`, the learnt scale and bias in the head's params.
    """

    output_offset: tuple
    hidden_size: int = 300
    num_hidden: int = 3
    negative_slope: float = 0.2
    output_init_scale: float = 0.25
    camera_output_scale: tuple = (0.1, 0.01, 0.01)
    input_norm: str = "none"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, features: Array, train: bool = False) -> Array:
        if len(self.output_offset) != CODE_SIZE:
            raise ValueError(f"output_offset must have {CODE_SIZE} values, "
                             f"got {len(self.output_offset)}")
        x = features
        if self.input_norm != "none":
            frozen = self.input_norm == "data" or not train
            x = nn.BatchNorm(use_running_average=frozen, momentum=0.9, epsilon=1e-5,
                             dtype=jnp.float32, name="input_norm")(x.astype(jnp.float32))
            x = x.astype(self.dtype)
        for index in range(self.num_hidden + 1):
            x = nn.Dense(self.hidden_size, kernel_init=_kaiming_leaky(self.negative_slope),
                         dtype=self.dtype, name=f"hidden_{index}")(x)
            x = nn.leaky_relu(x, self.negative_slope)
        offset = np.asarray(self.output_offset, np.float32)
        # The code leaves the head in float32 whatever the compute dtype (FLAME, the renderer
        # and the losses run in float32).
        return CodeOutput(offset=tuple(offset.tolist()), init_scale=self.output_init_scale,
                          camera_scale=self.camera_output_scale, name="output")(
                              x.astype(jnp.float32))


def code_output_scale(camera_scale: Sequence[float]) -> np.ndarray:
    """(486,) per-entry factor of the output layer's kernel term: 1, camera (s, tx, ty) scaled."""
    scale = np.ones((CODE_SIZE,), np.float32)
    scale[code_slices()["camera"]] = np.asarray(camera_scale, np.float32)
    return scale


class CodeOutput(nn.Module):
    """The head's output layer: `bias + (x @ kernel) * code_output_scale(camera_scale)`.

    Parameters "kernel" (F, 486) and "bias" (486,) as `nn.Dense`'s. The camera's translation is
    in metres (a face is ~0.15 m, one unit of the kernel term would move it off the crop) and
    its scale is ~9: unscaled, the small random kernel alone puts starting faces 0.1 m off
    centre and an Adam step on the kernel can move them by centimetres, after which the
    landmark loss shrinks faces instead of placing them. The factor makes one unit of the
    kernel term 1 cm of translation and 0.1 of scale; the bias (the starting code) is exact.
    """

    offset: tuple
    init_scale: float = 0.25
    camera_scale: tuple = (0.1, 0.01, 0.01)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kernel = self.param("kernel", _small_uniform(self.init_scale), (x.shape[-1], CODE_SIZE),
                            jnp.float32)
        bias = self.param("bias", lambda *_: jnp.asarray(self.offset, jnp.float32), (CODE_SIZE,),
                          jnp.float32)
        scale = jnp.asarray(code_output_scale(self.camera_scale))
        return bias + jnp.dot(x, kernel) * scale


class Regressor(nn.Module):
    """Backbone -> (optionally L2-normalised) features -> mapping head -> (B, 486) code.

    Attributes:
      backbone: a backbone module (see the module docstring); its variables live under
        "backbone".
      initial_camera: (s, tx, ty) the head starts at (`recon.model.build.initial_camera`).
      input_kind: "pixels" (backbone input images) or "features" (the output of the backbone's
        frozen trunk up to `trunk_end`).
      trunk_end: the backbone part after which the trunk ends (input_kind "features").
      feature_norm: how the embedding is normalised before the head: "l2" (MICA's, for ArcFace
        embeddings whose norm is ~20-30 and varies with image quality), "batch" (a BatchNorm:
        each feature standardised over the batch, running averages at evaluation) or "data"
        (each feature standardised by the training data's statistics at initialisation, fixed:
        no train/evaluation mismatch while the backbone's last stage still moves). The last
        two are for embeddings whose differences between faces are small next to their mean,
        as dlib's of our renders (0.03 per dimension around a norm of 1.3).
      hidden_size, num_hidden, output_init_scale: the head (`MappingHead`).
      initial_light_band0: the ambient light the head starts at.
      dtype: the head's compute dtype.
    """

    backbone: nn.Module
    initial_camera: tuple
    input_kind: str = "pixels"
    trunk_end: str = ""
    feature_norm: str = "l2"
    hidden_size: int = 300
    num_hidden: int = 3
    output_init_scale: float = 0.25
    initial_light_band0: float = AMBIENT_LIGHT_BAND0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, inputs: Array, train: bool = False, embed_only: bool = False) -> Array:
        """(B, h, w, c) backbone inputs (images or trunk features) -> (B, 486) float32 code.

        train: passed to the backbone and the head's input BatchNorm (their modes).
        embed_only: return the backbone's embedding (B, F) that the head reads, before
          `feature_norm` (for `recon.model.build.set_feature_statistics`).
        """
        if inputs.ndim != 4:
            raise ValueError(f"Regressor inputs must be (B, H, W, C), got {inputs.shape}")
        if self.input_kind == "pixels":
            features = self.backbone(inputs, train=train)
        elif self.input_kind == "features":
            if not self.trunk_end:
                raise ValueError("Regressor(input_kind='features') needs trunk_end")
            features = self.backbone.from_features(inputs, after=self.trunk_end, train=train)
        else:
            raise ValueError(f"input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
        if self.feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {FEATURE_NORMS}, got "
                             f"{self.feature_norm!r}")
        features = features.astype(jnp.float32)
        if embed_only:
            return features
        if self.feature_norm == "l2":
            squared = jnp.sum(features * features, axis=-1, keepdims=True)
            features = features * jax.lax.rsqrt(jnp.maximum(squared, 1e-24))
        offset = initial_code_offset(self.initial_camera, self.initial_light_band0)
        head = MappingHead(output_offset=tuple(offset.tolist()), hidden_size=self.hidden_size,
                           num_hidden=self.num_hidden, output_init_scale=self.output_init_scale,
                           input_norm="none" if self.feature_norm == "l2" else self.feature_norm,
                           dtype=self.dtype,
                           name=HEAD_NAME)
        return head(features.astype(self.dtype), train=train)


def _key(entry) -> str:
    return str(getattr(entry, "key", getattr(entry, "name", entry)))


def trainable_labels(params: dict, *, trainable_parts: Sequence[str],
                     always_frozen: Sequence[tuple] = ()) -> Any:
    """Same-structure tree of "trainable" / "frozen" labels for the Regressor's `params`.

    params: the "params" collection ({"backbone": {...}, "head": {...}}).
    trainable_parts: top-level backbone parts that train (e.g. IResNet's ("stage4", "output")).
    always_frozen: backbone parameter paths that never train (arcface_torch's fixed feature-BN
      scale). The head always trains.
    Raises ValueError when the tree is not a Regressor's or a part names nothing.
    """
    if set(params) != {BACKBONE_NAME, HEAD_NAME}:
        raise ValueError(f"Regressor params must hold exactly {BACKBONE_NAME!r} and "
                         f"{HEAD_NAME!r}, got top-level keys {sorted(params)}")
    unknown = sorted(set(trainable_parts) - set(params[BACKBONE_NAME]))
    if unknown:
        raise ValueError(f"trainable parts {unknown} are not backbone parts "
                         f"{sorted(params[BACKBONE_NAME])}")
    fixed = [tuple(path) for path in always_frozen]

    def label(path, _leaf):
        keys = tuple(_key(entry) for entry in path)
        if any(keys[:len(frozen)] == frozen for frozen in fixed):
            return "frozen"
        return "trainable" if keys and keys[0] in tuple(trainable_parts) else "frozen"

    return {BACKBONE_NAME: jax.tree_util.tree_map_with_path(label, params[BACKBONE_NAME]),
            HEAD_NAME: jax.tree.map(lambda _: "trainable", params[HEAD_NAME])}


def count_parameters(params: dict, labels: Any) -> dict:
    """{"trainable": n, "frozen": n} parameter counts (for logs and the README)."""
    counts = {"trainable": 0, "frozen": 0}
    for leaf, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
        counts[label] += int(np.prod(leaf.shape))
    return counts
