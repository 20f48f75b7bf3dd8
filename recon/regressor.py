"""Face image -> 486-d code: a (partly frozen) IResNet backbone and a MICA-style mapping head.

    model = Regressor(backbone=recon.backbone.IResNet.small())
    variables = model.init(rng, backbone_images)          # {"params", "batch_stats"}
    code = predict_code(model, variables, backbone_images) # recon.types.Code
    optimizer = make_optimizer(variables["params"], learning_rate=1e-5, weight_decay=2e-4)

Freezing (the paper's and MICA's): only the backbone's last stage, its output BN/FC/feature BN
and the mapping head train. It is done by the optimizer: `trainable_labels` names every
parameter "trainable" or "frozen" by its path and `make_optimizer` gives the frozen ones
`optax.set_to_zero()` (arcface_torch's fixed feature-BN scale stays frozen too, see
`recon.backbone.backbone_trainable_labels`). BatchNorm statistics are the backbone's business:
`IResNet` normalises with its running averages even when `train=True` unless a part is listed in
its `batch_norm_train_parts` (default none), so frozen statistics never update; list only
trainable parts there (e.g. ("stage4", "output")) to let those use batch statistics.

The head starts at a sensible code: its output layer has a small random kernel and its bias is
`initial_code_offset()`: zero for shape/pose/expression/texture, the camera of a FLAME face
filling the crop as a detector's 1.6x box crop would (`DEFAULT_CAMERA`) and ambient grey light
(`AMBIENT_LIGHT_BAND0`).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from recon import backbone as backbone_lib
from recon import shading
from recon.types import CODE_SIZE, Code, code_slices, split_code

Array = jax.Array

# Camera (s, tx, ty) of `recon.camera` that puts the FLAME template's 68-landmark box, enlarged
# 1.6x (the NoW/MICA crop of a detector box), over the whole crop: the template's landmark box is
# 0.144 m x 0.138 m centred at y = -0.022 m, so s = 2 / (1.6 * 0.1413 m) and ty = +0.022 m.
# `camera_for_landmarks` computes it; tests check these numbers against the template.
DEFAULT_CAMERA = (8.85, 0.0, 0.022)
DEFAULT_CROP_SCALE = 1.6
# SH band 0 whose shading is 1 (SH_CONSTANTS[0] * L0 = 1) on every normal: the rendered colour
# equals the albedo, mid-grey for albedo 0.5. Other bands start at 0 (ambient light).
AMBIENT_LIGHT_BAND0 = float(1.0 / shading.SH_CONSTANTS[0])
HEAD_NAME = "head"
BACKBONE_NAME = "backbone"


def camera_for_landmarks(landmarks: np.ndarray, crop_scale: float = DEFAULT_CROP_SCALE
                         ) -> tuple[float, float, float]:
    """(s, tx, ty) whose square crop is `crop_scale` x the mean side of the landmarks' box.

    landmarks: (N, 3) or (N, 2) model-frame points in metres (x right, y up). The crop is
    centred on the box centre, like the NoW/DECA crop of a detector box (PAPER.md).
    """
    points = np.asarray(landmarks, np.float64)[:, :2]
    low, high = points.min(0), points.max(0)
    side = crop_scale * float(np.mean(high - low))
    centre = (low + high) / 2.0
    # x_ndc = s (x + tx) = 0 and y_ndc = -s (y + ty) = 0 at the centre; NDC spans 2 units.
    return 2.0 / side, float(-centre[0]), float(-centre[1])


def initial_code_offset(camera: Sequence[float] = DEFAULT_CAMERA,
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
    Linear hidden->486 with a small kernel (`output_init_scale`) and bias `output_offset`.
    """

    hidden_size: int = 300
    num_hidden: int = 3
    negative_slope: float = 0.2
    output_init_scale: float = 0.25
    output_offset: tuple = tuple(initial_code_offset().tolist())

    @nn.compact
    def __call__(self, features: Array) -> Array:
        if len(self.output_offset) != CODE_SIZE:
            raise ValueError(f"output_offset must have {CODE_SIZE} values, "
                             f"got {len(self.output_offset)}")
        x = features
        for index in range(self.num_hidden + 1):
            x = nn.Dense(self.hidden_size, kernel_init=_kaiming_leaky(self.negative_slope),
                         name=f"hidden_{index}")(x)
            x = nn.leaky_relu(x, self.negative_slope)
        offset = np.asarray(self.output_offset, np.float32)
        return nn.Dense(CODE_SIZE, kernel_init=_small_uniform(self.output_init_scale),
                        bias_init=lambda *_: jnp.asarray(offset), name="output")(x)


class Regressor(nn.Module):
    """Backbone -> (optionally L2-normalised) features -> mapping head -> (B, 486) code.

    Attributes:
      backbone: a Flax module `(images (B, 112, 112, 3), train: bool) -> (B, F)`, e.g.
        `recon.backbone.IResNet`; its variables live under "backbone".
      normalize_features: L2-normalise the embedding before the head, as MICA does with
        ArcFace's (whose norm is otherwise ~20-30 and varies with image quality).
      hidden_size, num_hidden, output_init_scale: the head (`MappingHead`).
      initial_camera, initial_light_band0: the code the head starts at (`initial_code_offset`).
    """

    backbone: nn.Module
    normalize_features: bool = True
    hidden_size: int = 300
    num_hidden: int = 3
    output_init_scale: float = 0.25
    initial_camera: tuple = DEFAULT_CAMERA
    initial_light_band0: float = AMBIENT_LIGHT_BAND0

    @nn.compact
    def __call__(self, backbone_images: Array, train: bool = False) -> Array:
        """(B, 112, 112, 3) ArcFace-normalised images -> (B, 486) code vector.

        train: passed to the backbone (BatchNorm mode, see the module docstring); the head has
        no dropout or BatchNorm.
        """
        if backbone_images.ndim != 4 or backbone_images.shape[-1] != 3:
            raise ValueError(f"backbone_images must be (B, H, W, 3), got {backbone_images.shape}")
        features = self.backbone(backbone_images, train=train)
        if self.normalize_features:
            squared = jnp.sum(features * features, axis=-1, keepdims=True)
            features = features * jax.lax.rsqrt(jnp.maximum(squared, 1e-24))
        offset = initial_code_offset(self.initial_camera, self.initial_light_band0)
        head = MappingHead(hidden_size=self.hidden_size, num_hidden=self.num_hidden,
                           output_init_scale=self.output_init_scale,
                           output_offset=tuple(offset.tolist()), name=HEAD_NAME)
        return head(features).astype(jnp.float32)


def predict_code(model: Regressor, variables: dict, backbone_images: Array) -> Code:
    """`Code` of a batch: the regressor's vector cut by `recon.types.split_code`."""
    return split_code(model.apply(variables, backbone_images))


def trainable_labels(params: dict, *,
                     trainable_prefixes: Sequence[str] = backbone_lib.TRAINABLE_PREFIXES) -> Any:
    """Same-structure tree of "trainable" / "frozen" labels for the Regressor's `params`.

    params: the "params" collection ({"backbone": {...}, "head": {...}}).
    trainable_prefixes: top-level IResNet parts that train (default
      `recon.backbone.TRAINABLE_PREFIXES`: the last stage and the output BN/FC/feature BN, minus
      arcface_torch's fixed feature-BN scale). The head always trains.
    Raises ValueError when the tree is not a Regressor's or a prefix names no IResNet part.
    """
    if set(params) != {BACKBONE_NAME, HEAD_NAME}:
        raise ValueError(f"Regressor params must hold exactly {BACKBONE_NAME!r} and "
                         f"{HEAD_NAME!r}, got top-level keys {sorted(params)}")
    return {BACKBONE_NAME: backbone_lib.backbone_trainable_labels(params[BACKBONE_NAME],
                                                                  tuple(trainable_prefixes)),
            HEAD_NAME: jax.tree.map(lambda _: "trainable", params[HEAD_NAME])}


def make_optimizer(params: dict, *, learning_rate: optax.ScalarOrSchedule, weight_decay: float,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   max_grad_norm: Optional[float] = None,
                   trainable_prefixes: Sequence[str] = backbone_lib.TRAINABLE_PREFIXES
                   ) -> optax.GradientTransformation:
    """AdamW on the trainable parameters, `optax.set_to_zero()` on the frozen ones.

    params: the Regressor's "params" collection (labels come from `trainable_labels`).
    max_grad_norm: optional global-norm clipping of the trainable gradients (None: off).
    Frozen parameters get zero updates, so they stay bit-identical; inside a jitted step their
    gradients are unused and XLA drops their computation.
    """
    trainable = [optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)]
    if max_grad_norm is not None:
        trainable.insert(0, optax.clip_by_global_norm(max_grad_norm))
    labels = trainable_labels(params, trainable_prefixes=trainable_prefixes)
    return optax.multi_transform({"trainable": optax.chain(*trainable),
                                  "frozen": optax.set_to_zero()}, labels)


def count_parameters(params: dict, labels: Any) -> dict:
    """{"trainable": n, "frozen": n} parameter counts (for logs and the README)."""
    counts = {"trainable": 0, "frozen": 0}
    for leaf, label in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
        counts[label] += int(np.prod(leaf.shape))
    return counts
