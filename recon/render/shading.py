"""Per-vertex normals, 9-band spherical-harmonics lighting and albedo from the texture basis.

The SH basis and its constant factors are DECA's (`Renderer.add_SHlight`): on a unit normal
n = (x, y, z) in the model frame (+y up, +z toward the camera) the basis is
[1, x, y, z, xy, xz, yz, x^2 - y^2, 3 z^2 - 1] times `SH_CONSTANTS`, and the shading of colour
channel c is sum_k basis_k * light[k, c]. The 27-d light code is read as (9, 3): band-major,
RGB-minor (DECA's `light.reshape(-1, 9, 3)`); `recon.types.Code.sh_light` is the one place that
reshape happens, and every function here takes the (B, 9, 3) form only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

_PI = math.pi
SH_CONSTANTS = np.asarray([
    1.0 / math.sqrt(4 * _PI),
    (2 * _PI / 3) * math.sqrt(3 / (4 * _PI)),
    (2 * _PI / 3) * math.sqrt(3 / (4 * _PI)),
    (2 * _PI / 3) * math.sqrt(3 / (4 * _PI)),
    (_PI / 4) * 3 * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * 3 * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * 3 * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * (3 / 2) * math.sqrt(5 / (12 * _PI)),
    (_PI / 4) * (1 / 2) * math.sqrt(5 / (4 * _PI)),
], np.float32)


def _check_light(light: Array) -> None:
    if light.ndim != 3 or light.shape[1:] != (9, 3):
        raise ValueError(f"light must be (B, 9, 3) SH coefficients (a (B, 27) code becomes that "
                         f"through recon.types.Code.sh_light), got shape {light.shape}")


def face_normals(vertices: Array, faces: Array) -> Array:
    """(B, V, 3), (F, 3) -> (B, F, 3) un-normalised normals (length = twice the area)."""
    tri = vertices[:, faces]
    return jnp.cross(tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0])


def _safe_normalize(vectors: Array, eps: float = 1e-30) -> Array:
    squared = jnp.sum(vectors * vectors, axis=-1, keepdims=True)
    safe = jnp.where(squared > eps, squared, 1.0)
    return jnp.where(squared > eps, vectors * jax.lax.rsqrt(safe), 0.0)


def vertex_normals(vertices: Array, faces: Array) -> Array:
    """Area-weighted unit vertex normals (as DECA/PyTorch3D): (B, V, 3), (F, 3) -> (B, V, 3).

    Counter-clockwise faces seen from outside give outward normals. Vertices in no face (or
    only in degenerate faces) get a zero normal instead of NaN.
    """
    if vertices.ndim != 3 or vertices.shape[-1] != 3:
        raise ValueError(f"vertices must be (B, V, 3), got shape {vertices.shape}")
    normals_f = face_normals(vertices, faces)
    summed = jnp.zeros_like(vertices)
    for corner in range(3):
        summed = summed.at[:, faces[:, corner]].add(normals_f)
    return _safe_normalize(summed)


def sh_basis(normals: Array) -> Array:
    """(..., 3) normals -> (..., 9) SH basis values including DECA's constant factors."""
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    basis = jnp.stack([jnp.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y,
                       3.0 * z * z - 1.0], axis=-1)
    return basis * jnp.asarray(SH_CONSTANTS, normals.dtype)


def sh_shading(normals: Array, light: Array) -> Array:
    """Irradiance per colour channel.

    Args:
      normals: (B, ..., 3) model-frame normals (DECA does not re-normalise interpolated ones).
      light: (B, 9, 3) SH coefficients, band-major (`recon.types.Code.sh_light`).
    Returns:
      (B, ..., 3) shading; multiply by albedo for the shaded colour.
    """
    _check_light(light)
    if light.shape[0] != normals.shape[0]:
        raise ValueError(f"batch mismatch: normals {normals.shape}, light {light.shape}")
    basis = sh_basis(normals)
    flat = basis.reshape(basis.shape[0], -1, 9)
    shading = jnp.einsum("bpk,bkc->bpc", flat, light)
    return shading.reshape(*normals.shape[:-1], 3)


def albedo_from_texture(albedo_mean: Array, albedo_basis: Array, texture: Array) -> Array:
    """Per-vertex albedo = mean + basis @ texture.

    Args:
      albedo_mean: (V, 3) in [0, 1].
      albedo_basis: (V, 3, n_texture).
      texture: (B, n) coefficients, n <= n_texture (the first n components are used).
    Returns:
      (B, V, 3) albedo (not clipped).
    """
    if albedo_mean.ndim != 2 or albedo_mean.shape[-1] != 3:
        raise ValueError(f"albedo_mean must be (V, 3), got {albedo_mean.shape}")
    if albedo_basis.shape[:2] != albedo_mean.shape or albedo_basis.ndim != 3:
        raise ValueError(f"albedo_basis must be (V, 3, n_texture) with V = {albedo_mean.shape[0]},"
                         f" got {albedo_basis.shape}")
    if texture.ndim != 2 or texture.shape[1] > albedo_basis.shape[2]:
        raise ValueError(f"texture must be (B, n) with n <= {albedo_basis.shape[2]}, "
                         f"got {texture.shape}")
    basis = albedo_basis[:, :, : texture.shape[1]]
    return albedo_mean[None] + jnp.einsum("vcn,bn->bvc", basis, texture)
