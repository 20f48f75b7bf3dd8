"""Held-out 3D error of regressed meshes: rigid (rotation + translation) alignment, then the mean
per-vertex Euclidean distance in millimetres.

Why a rigid alignment and no scale: the regressor predicts the neutral mesh in FLAME's metric
model frame, so its size is part of what it must get right (NoW's "metrical" setting); the
rotation and translation of a neutral mesh are not (its frame is FLAME's, but a head that is
identical up to a small rigid offset should not count as wrong). Kabsch with the best proper
rotation (no reflection), all vertices weighted equally.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def kabsch(source: Array, target: Array, *, with_scale: bool = False):
    """Rotation R (B, 3, 3) and translation t (B, 3) minimising sum |c R s + t - q|^2.

    source, target: (B, N, 3) corresponding points. R is a proper rotation (det +1).
    with_scale: also the scale c (Umeyama 1991) and return (R, t, c (B,)); else c = 1 and
    (R, t) is returned.
    """
    if source.shape != target.shape or source.ndim != 3 or source.shape[-1] != 3:
        raise ValueError(f"source {source.shape} and target {target.shape} must both be (B, N, 3)")
    source_mean = jnp.mean(source, axis=1, keepdims=True)
    target_mean = jnp.mean(target, axis=1, keepdims=True)
    covariance = jnp.einsum("bni,bnj->bij", source - source_mean, target - target_mean)
    u, _, vt = jnp.linalg.svd(covariance)
    # Flip the last axis when the best orthogonal matrix is a reflection.
    sign = jnp.sign(jnp.linalg.det(jnp.einsum("bij,bjk->bik", u, vt)))
    sign = jnp.where(sign == 0, 1.0, sign)
    correction = jnp.ones((source.shape[0], 3), source.dtype).at[:, 2].set(sign)
    rotation = jnp.einsum("bji,bj,bkj->bik", vt, correction, u)
    scale = jnp.ones((source.shape[0],), source.dtype)
    if with_scale:
        singular = jnp.linalg.svd(covariance, compute_uv=False)
        variance = jnp.sum((source - source_mean) ** 2, axis=(1, 2))
        scale = jnp.sum(singular * correction, axis=-1) / jnp.maximum(variance, 1e-30)
    translation = target_mean[:, 0] - scale[:, None] * jnp.einsum(
        "bij,bj->bi", rotation, source_mean[:, 0])
    if with_scale:
        return rotation, translation, scale
    return rotation, translation


def rigid_align(source: Array, target: Array, *, with_scale: bool = False) -> Array:
    """`source` (B, N, 3) moved onto `target` (B, N, 3) by its best rotation + translation
    (and uniform scale when `with_scale`)."""
    if with_scale:
        rotation, translation, scale = kabsch(source, target, with_scale=True)
        return scale[:, None, None] * jnp.einsum("bij,bnj->bni", rotation, source) + translation[
            :, None]
    rotation, translation = kabsch(source, target)
    return jnp.einsum("bij,bnj->bni", rotation, source) + translation[:, None]


def vertex_error_mm(prediction: Array, target: Array, *, align: bool = True,
                    with_scale: bool = False) -> Array:
    """Per-example mean per-vertex Euclidean error in mm after a rigid alignment.

    prediction, target: (B, N, 3) metres, same topology. Returns (B,) millimetres.
    with_scale: a similarity alignment instead (the shape's proportions only, as NoW's
    non-metrical setting).
    """
    if align:
        prediction = rigid_align(prediction, target, with_scale=with_scale)
    return 1000.0 * jnp.mean(jnp.linalg.norm(prediction - target, axis=-1), axis=-1)
