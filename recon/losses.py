"""The paper's losses, one function each, returning per-example values (B,); the caller reduces.

3D (supervised by registered meshes):
  `vertex_loss_mm`      MICA's region-weighted L1 on the neutral mesh, millimetres.
  `id_3d_loss`          distance between frozen CoMA latents (`spectral_gcn.encode`).
2D (DECA's, on the 224 crop):
  `landmark_loss_ndc`   68 landmarks, DECA's per-landmark weights, L1 in NDC units ([-1, 1]).
  `eye_closure_loss_ndc`, `lip_distance_loss_ndc`   DECA's eyed/lipd.
  `photometric_loss`    L1 inside a skin mask.
  `identity_loss`       1 - cos of a frozen recognition network's embeddings.
  `shape_consistency_code`   swaps shape codes between images of one subject.
Regularisers: `squared_norm_regularizer` (shape/expression/texture), `light_regularizer`.

DECA's 2D losses work in NDC (landmarks / (size / 2) - 1) and its weights (landmark 1.0, eye
1.0, lip 0.5) are for those units; we keep them by converting pixel landmarks with
`recon.render.camera.pixels_to_ndc` (1 NDC unit = 112 px at 224). Every function checks its shapes and
raises ValueError naming the argument.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import flame_jax
import spectral_gcn
from recon.image import preprocess
from recon.render import camera as camera_lib
from recon.types import Code

Array = jax.Array

NUM_LANDMARKS = 68
# MICA's region weights of the vertex loss; applied in this order, so the face wins overlaps.
MICA_REGION_WEIGHTS = (("left_eyeball", 0.01), ("right_eyeball", 0.01), ("left_ear", 0.01),
                       ("right_ear", 0.01), ("face", 150.0))
# DECA's landmark pairs (0-based iBUG-68): upper / lower eyelid and inner upper / lower lip.
EYE_PAIRS = ((37, 41), (38, 40), (43, 47), (44, 46))
LIP_PAIRS = ((61, 67), (62, 66), (63, 65))
ID_3D_KINDS = ("squared_l2", "cosine")


def deca_landmark_weights() -> np.ndarray:
    """(68,) DECA's `weighted_landmark_loss` weights: jaw points 5-6 and 10-11 x2, nose x1.5
    (30, 31, 35: x3), mouth x1.5 (corners 48, 54: x3), all others 1."""
    weights = np.ones((NUM_LANDMARKS,), np.float32)
    weights[5:7] = 2.0
    weights[10:12] = 2.0
    weights[27:36] = 1.5
    weights[[30, 31, 35]] = 3.0
    weights[48:68] = 1.5
    weights[[48, 54]] = 3.0
    return weights


def _check(name: str, array: Array, shape: tuple) -> None:
    """Raise ValueError unless `array` has `shape` (None matches any size)."""
    if array.ndim != len(shape) or any(s is not None and a != s
                                       for a, s in zip(array.shape, shape)):
        expected = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{name} must have shape {expected}, got {tuple(array.shape)}")


def _check_same(name_a: str, a: Array, name_b: str, b: Array) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_a} {tuple(a.shape)} and {name_b} {tuple(b.shape)} must have the "
                         f"same shape")


# ----------------------------------------------------------------------------------- 3D losses

def region_weights(model: flame_jax.FlameModel, *, face: float = 150.0, eyeballs: float = 0.01,
                   ears: float = 0.01, other: float = 1.0) -> Array:
    """(V,) float32 per-vertex weights of `vertex_loss_mm` from `model.vertex_mask` (MICA's).

    Every vertex starts at `other`; eyeballs, then ears, then the face region are assigned in
    that order (the face last, so it wins where regions overlap). KeyError names a missing mask.
    """
    values = {"left_eyeball": eyeballs, "right_eyeball": eyeballs, "left_ear": ears,
              "right_ear": ears, "face": face}
    weights = jnp.full((model.num_vertices,), other, jnp.float32)
    for name, _ in MICA_REGION_WEIGHTS:
        weights = jnp.where(model.vertex_mask(name), jnp.float32(values[name]), weights)
    return weights


def vertex_loss_mm(pred_vertices: Array, gt_vertices: Array, weights: Array) -> Array:
    """MICA's vertex loss: mean over vertices AND coordinates of |pred - gt| * w, in mm.

    MICA computes `(|pred - gt| * mask).mean() * 1000` over all elements; per example that is
    1000 * sum_{v, c} |pred - gt|_{v c} w_v / (3 V). (With w = 1 it is the mean per-coordinate
    absolute error in millimetres; MICA's face weight 150 scales the face's share.)

    Args:
      pred_vertices, gt_vertices: (B, V, 3) metres.
      weights: (V,) per-vertex weights (`region_weights`).
    Returns:
      (B,) weighted mm.
    """
    _check("pred_vertices", pred_vertices, (None, None, 3))
    _check_same("pred_vertices", pred_vertices, "gt_vertices", gt_vertices)
    _check("weights", weights, (pred_vertices.shape[1],))
    difference = jnp.abs(pred_vertices - gt_vertices) * weights[None, :, None]
    return 1000.0 * jnp.mean(difference, axis=(1, 2))


def id_3d_loss(encoder: spectral_gcn.FrozenEncoder, pred_vertices: Array, gt_vertices: Array, *,
               kind: str = "squared_l2") -> Array:
    """The paper's 3D-ID loss: distance between frozen CoMA latents of the two meshes.

    Args:
      encoder: the frozen CoMA encoder (its weights get no gradient).
      pred_vertices, gt_vertices: (B, V, 3) metres, neutral pose (what CoMA was trained on).
      kind: "squared_l2" (default): sum_i (z_pred - z_gt)_i^2; "cosine": 1 - cos(z_pred, z_gt).
    Returns:
      (B,) (latent units squared for squared_l2; dimensionless in [0, 2] for cosine).
    """
    if kind not in ID_3D_KINDS:
        raise ValueError(f"id_3d kind must be one of {ID_3D_KINDS}, got {kind!r}")
    _check("pred_vertices", pred_vertices, (None, None, 3))
    _check_same("pred_vertices", pred_vertices, "gt_vertices", gt_vertices)
    latents = spectral_gcn.encode(encoder, jnp.concatenate([pred_vertices, gt_vertices], 0))
    pred_latent, gt_latent = jnp.split(latents, 2, axis=0)
    gt_latent = jax.lax.stop_gradient(gt_latent)
    if kind == "squared_l2":
        return jnp.sum(jnp.square(pred_latent - gt_latent), axis=-1)
    return 1.0 - _cosine(pred_latent, gt_latent)


def _cosine(a: Array, b: Array) -> Array:
    # optax's cosine similarity; each norm floored at 1e-8 (a zero vector gives 0, not NaN).
    return optax.losses.cosine_similarity(a, b, epsilon=1e-8)


# ----------------------------------------------------------------------------------- 2D losses

def _landmarks_to_ndc(name: str, landmarks_px: Array, image_size: tuple[int, int]) -> Array:
    _check(name, landmarks_px, (None, NUM_LANDMARKS, 2))
    return camera_lib.pixels_to_ndc(landmarks_px, image_size)


def landmark_loss_ndc(pred_landmarks_px: Array, gt_landmarks_px: Array, visibility: Array, *,
                      image_size: tuple[int, int],
                      landmark_weights: Optional[Array] = None) -> Array:
    """DECA's weighted 68-landmark L1 (`weighted_landmark_loss` / `batch_kp_2d_l1_loss`).

    Per example: sum_k w_k v_k (|dx_k| + |dy_k|) / (2 sum_k w_k v_k + 1e-8), with dx, dy in
    NDC units (DECA normalises over the whole batch; we normalise per example, which is the
    same when every landmark is visible).

    Args:
      pred_landmarks_px, gt_landmarks_px: (B, 68, 2) pixels of the crop (`recon.render.camera`).
      visibility: (B, 68) in [0, 1], 0 for missing landmarks (`Batch.landmark_weights`).
      image_size: (H, W) of the crop.
      landmark_weights: (68,), default `deca_landmark_weights()`.
    Returns:
      (B,) NDC units (multiply by W / 2 for pixels).
    """
    pred = _landmarks_to_ndc("pred_landmarks_px", pred_landmarks_px, image_size)
    gt = _landmarks_to_ndc("gt_landmarks_px", gt_landmarks_px, image_size)
    _check_same("pred_landmarks_px", pred, "gt_landmarks_px", gt)
    _check("visibility", visibility, (pred.shape[0], NUM_LANDMARKS))
    if landmark_weights is None:
        landmark_weights = jnp.asarray(deca_landmark_weights())
    _check("landmark_weights", landmark_weights, (NUM_LANDMARKS,))
    weights = visibility * landmark_weights[None]
    absolute = jnp.sum(jnp.abs(pred - gt), axis=-1)
    return jnp.sum(absolute * weights, -1) / (2.0 * jnp.sum(weights, -1) + 1e-8)


def landmark_error_px(pred_landmarks_px: Array, gt_landmarks_px: Array,
                      visibility: Array) -> Array:
    """(B,) mean Euclidean landmark error in pixels over the visible landmarks (a metric)."""
    _check("pred_landmarks_px", pred_landmarks_px, (None, NUM_LANDMARKS, 2))
    _check_same("pred_landmarks_px", pred_landmarks_px, "gt_landmarks_px", gt_landmarks_px)
    _check("visibility", visibility, pred_landmarks_px.shape[:2])
    distance = jnp.linalg.norm(pred_landmarks_px - gt_landmarks_px, axis=-1)
    return jnp.sum(distance * visibility, -1) / jnp.maximum(jnp.sum(visibility, -1), 1e-8)


def _pair_distance_loss(pairs, pred_px, gt_px, visibility, image_size, names) -> Array:
    pred = _landmarks_to_ndc(names[0], pred_px, image_size)
    gt = _landmarks_to_ndc(names[1], gt_px, image_size)
    _check_same(names[0], pred, names[1], gt)
    _check("visibility", visibility, (pred.shape[0], NUM_LANDMARKS))
    upper, lower = (np.asarray(index) for index in zip(*pairs))

    def distances(points):
        return jnp.sqrt(jnp.sum(jnp.square(points[:, upper] - points[:, lower]), -1) + 1e-12)

    valid = visibility[:, upper] * visibility[:, lower]
    absolute = jnp.abs(distances(pred) - distances(gt))
    return jnp.sum(absolute * valid, -1) / jnp.maximum(jnp.sum(valid, -1), 1e-8)


def eye_closure_loss_ndc(pred_landmarks_px: Array, gt_landmarks_px: Array, visibility: Array, *,
                         image_size: tuple[int, int]) -> Array:
    """DECA's `eyed_loss`: |d_pred - d_gt| of the upper-lower eyelid distances.

    Pairs (0-based iBUG-68) 37-41, 38-40 (one eye), 43-47, 44-46 (the other); distances in NDC
    units; mean over the pairs whose two landmarks are visible. Returns (B,).
    """
    return _pair_distance_loss(EYE_PAIRS, pred_landmarks_px, gt_landmarks_px, visibility,
                               image_size, ("pred_landmarks_px", "gt_landmarks_px"))


def lip_distance_loss_ndc(pred_landmarks_px: Array, gt_landmarks_px: Array, visibility: Array, *,
                          image_size: tuple[int, int]) -> Array:
    """DECA's `lipd_loss`: |d_pred - d_gt| of the inner upper-lower lip distances.

    Pairs 61-67, 62-66, 63-65 (0-based iBUG-68), NDC units, mean over visible pairs. (B,).
    """
    return _pair_distance_loss(LIP_PAIRS, pred_landmarks_px, gt_landmarks_px, visibility,
                               image_size, ("pred_landmarks_px", "gt_landmarks_px"))


def photometric_mask(skin_masks: Array, face_region_mask: Array) -> Array:
    """(B, H, W) the data's skin mask, or, for an example whose mask is empty, the rendered
    face region (no gradient flows through either)."""
    _check("skin_masks", skin_masks, (None, None, None))
    _check_same("skin_masks", skin_masks, "face_region_mask", face_region_mask)
    has_mask = jnp.sum(skin_masks, axis=(1, 2), keepdims=True) > 0
    return jax.lax.stop_gradient(jnp.where(has_mask, skin_masks, face_region_mask))


def photometric_loss(rendered_images: Array, alpha: Array, images: Array, mask: Array) -> Array:
    """DECA's photometric term: mean over pixels and channels of mask * |alpha * rendered - image|.

    As in DECA the mean is over all H x W x 3 values (not the mask area) and the rendered
    colour is multiplied by its coverage, so a skin pixel the mesh does not cover costs its
    whole colour (the mesh cannot lower the loss by shrinking).

    Args:
      rendered_images: (B, H, W, 3) shaded colour (`RenderOutput.image`).
      alpha: (B, H, W) coverage (`RenderOutput.alpha`).
      images: (B, H, W, 3) input crop in [0, 1].
      mask: (B, H, W) where the loss applies (`photometric_mask`).
    Returns:
      (B,) mean absolute colour difference (image units).
    """
    _check("images", images, (None, None, None, 3))
    _check_same("rendered_images", rendered_images, "images", images)
    _check("alpha", alpha, images.shape[:3])
    _check("mask", mask, images.shape[:3])
    predicted = rendered_images * alpha[..., None]
    return jnp.mean(mask[..., None] * jnp.abs(predicted - images), axis=(1, 2, 3))


def identity_loss(network: nn.Module, variables: dict, rendered_images: Array, images: Array, *,
                  input_kind: str = "arcface") -> Array:
    """1 - cos between a frozen recognition network's embeddings of the rendering and the image.

    Args:
      network: Flax module `(inputs (B, n, n, 3), train=False) -> (B, D)`, e.g. the frozen
        IResNet of `recon.model.import_arcface` or dlib's `recon.model.import_dlib_resnet`.
      variables: its variables (no gradient reaches them).
      rendered_images: (B, H, W, 3) in [0, 1], e.g. the rendered face composited over the image.
      images: (B, H, W, 3) in [0, 1].
      input_kind: how the network reads an image (`recon.image.backbone_input_jax`: "arcface"
        112 px normalised, "dlib" 150 px 0..255), both inputs resized the same way.
    Returns:
      (B,) in [0, 2].
    """
    _check("images", images, (None, None, None, 3))
    _check_same("rendered_images", rendered_images, "images", images)
    variables = jax.lax.stop_gradient(variables)
    both = preprocess.backbone_input_jax(jnp.concatenate([rendered_images, images], 0),
                                         input_kind)
    embeddings = network.apply(variables, both, train=False)
    rendered, target = jnp.split(embeddings.astype(jnp.float32), 2, axis=0)
    return 1.0 - _cosine(rendered, jax.lax.stop_gradient(target))


def shape_consistency_code(code: Code, images_per_subject: int,
                           rng: Optional[Array] = None) -> Code:
    """The code with shape coefficients exchanged between images of the same subject.

    The batch is subject-major (rows s*K .. s*K+K-1 are subject s, `recon.types.Batch`). Each
    subject's K shape codes are rotated by a shift in 1..K-1 (always another image's shape, as
    DECA's shape consistency intends): shift 1 without `rng`, else a random shift per subject.
    Everything but `shape` is unchanged. Evaluate all losses again on the result.
    """
    size = code.shape.shape[0]
    k = int(images_per_subject)
    if k < 2 or size % k:
        raise ValueError(f"shape consistency needs images_per_subject >= 2 dividing the batch "
                         f"size {size}, got {images_per_subject}")
    subjects = size // k
    if rng is None:
        shifts = jnp.ones((subjects,), jnp.int32)
    else:
        shifts = jax.random.randint(rng, (subjects,), 1, k)
    within = (jnp.arange(k)[None, :] + shifts[:, None]) % k
    order = (jnp.arange(subjects)[:, None] * k + within).reshape(-1)
    return code.replace(shape=code.shape[order])


# --------------------------------------------------------------------------------- regularisers

def squared_norm_regularizer(coefficients: Array) -> Array:
    """(B, n) -> (B,) sum(x^2) / 2 (DECA's shape/expression/texture regulariser, per example)."""
    _check("coefficients", coefficients, (None, None))
    return 0.5 * jnp.sum(jnp.square(coefficients), axis=-1)


def light_regularizer(sh_light: Array) -> Array:
    """DECA's light regulariser: mean over the 27 values of (light - its RGB mean per band)^2.

    sh_light: (B, 9, 3) (`Code.sh_light`). Penalises coloured light, not its intensity. (B,).
    """
    _check("sh_light", sh_light, (None, 9, 3))
    grey = jnp.mean(sh_light, axis=2, keepdims=True)
    return jnp.mean(jnp.square(sh_light - grey), axis=(1, 2))
