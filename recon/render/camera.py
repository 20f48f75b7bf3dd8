"""Orthographic weak-perspective camera (DECA's `batch_orth_proj`) and image-space conventions.

Conventions (one place for the whole project):
  * Model frame: FLAME metres, +x to the head's left (image right), +y up, +z out of the face
    toward the camera.
  * Camera code (B, 3) = (s, tx, ty). NDC: x_ndc = s * (x + tx), y_ndc = -s * (y + ty),
    z_ndc = s * z. The y flip is DECA's (`trans_verts[:, :, 1:] = -trans_verts[:, :, 1:]`, which
    also flips z; we keep z un-flipped so that LARGER z_ndc IS CLOSER to the camera).
  * NDC [-1, 1] spans the image: pixel u = (x_ndc + 1) * W / 2, v = (y_ndc + 1) * H / 2, in
    continuous pixel coordinates where pixel (row i, column j) covers [j, j+1) x [i, i+1) and its
    centre is (j + 0.5, i + 0.5). This is DECA's landmark mapping (`lmk * 112 + 112` at 224) and
    the rasterizer samples every pixel at its centre, so a projected landmark at (u, v) lies in
    pixel (floor(v), floor(u)). Image arrays are (B, H, W, C), row = v, column = u.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def _check_camera(points: Array, camera: Array) -> None:
    if points.ndim != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must be (B, N, 3), got shape {points.shape}")
    if camera.shape != (points.shape[0], 3):
        raise ValueError(f"camera must be (B, 3) = (scale, tx, ty) with B = {points.shape[0]}, "
                         f"got shape {camera.shape}")


def orthographic_project(points: Array, camera: Array) -> Array:
    """Weak-perspective projection to NDC.

    Args:
      points: (B, N, 3) model-frame points in metres.
      camera: (B, 3) (scale s, tx, ty); tx, ty in metres, s in NDC units per metre.
    Returns:
      (B, N, 3) NDC (x right, y down, z = s * z: larger is closer).
    """
    _check_camera(points, camera)
    scale = camera[:, None, 0:1]
    xy = scale * (points[..., :2] + camera[:, None, 1:3])
    flip = jnp.asarray([1.0, -1.0], points.dtype)
    return jnp.concatenate([xy * flip, scale * points[..., 2:3]], axis=-1)


def ndc_to_pixels(ndc: Array, image_size: tuple[int, int]) -> Array:
    """NDC (..., 2 or 3) -> continuous pixel coordinates (u, v[, z unchanged]).

    image_size: (H, W). u = (x + 1) W / 2, v = (y + 1) H / 2; pixel centres at integer + 0.5.
    """
    height, width = image_size
    if ndc.shape[-1] not in (2, 3):
        raise ValueError(f"ndc must end in 2 or 3 coordinates, got shape {ndc.shape}")
    half = jnp.asarray([width / 2.0, height / 2.0], ndc.dtype)
    uv = (ndc[..., :2] + 1.0) * half
    return jnp.concatenate([uv, ndc[..., 2:]], axis=-1)


def pixels_to_ndc(pixels: Array, image_size: tuple[int, int]) -> Array:
    """Inverse of `ndc_to_pixels` for (..., 2) or (..., 3) arrays."""
    height, width = image_size
    half = jnp.asarray([width / 2.0, height / 2.0], pixels.dtype)
    xy = pixels[..., :2] / half - 1.0
    return jnp.concatenate([xy, pixels[..., 2:]], axis=-1)


def project_to_pixels(points: Array, camera: Array, image_size: tuple[int, int]) -> Array:
    """(B, N, 3) metres -> (B, N, 3): (u, v) pixels and z = s * z (larger is closer).

    Use this for 2D landmarks so that they share the renderer's camera exactly.
    """
    return ndc_to_pixels(orthographic_project(points, camera), image_size)
