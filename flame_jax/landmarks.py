"""Barycentric landmarks on the FLAME surface: 51 static and 17 dynamic jaw-contour points.

Dynamic contour convention (documented choice): FLAME ships 79 contour embeddings, one per head
yaw in whole degrees. We follow DECA / RingNet: the yaw is the +y Euler angle of the composed
neck-chain rotation R_root @ R_neck, rounded to degrees and clamped to [-39, 39]; bin = yaw for
yaw >= 0 and 39 - yaw (40..78) for yaw < 0. FLAME_PyTorch negates the angle; with the shipped
embedding the DECA sign is the one that keeps the contour on the visible side of the jaw of a
turned head (tests/test_flame.py checks this geometrically).
"""

import jax.numpy as jnp

from flame_jax.rotation import yaw_angle

MAX_YAW_DEGREES = 39


def barycentric_points(vertices, faces, face_index, barycentric):
    """Points on the surface.

    Args:
      vertices: (B, V, 3).
      faces: (F, 3) int.
      face_index: (L,) or (B, L) int triangle of each point.
      barycentric: (L, 3) or (B, L, 3) weights.
    Returns: (B, L, 3).
    """
    corner_ids = faces[face_index]  # (L, 3) or (B, L, 3)
    if corner_ids.ndim == 2:
        corners = vertices[:, corner_ids]  # (B, L, 3, 3)
    else:
        corners = jnp.take_along_axis(
            vertices[:, None], corner_ids[..., None], axis=2)  # (B, L, 3, 3)
    weights = barycentric if barycentric.ndim == 3 else barycentric[None]
    return jnp.einsum("blk,blkc->blc", weights, corners)


def contour_bin(neck_chain_rotation):
    """(B, 3, 3) composed root @ neck rotation -> (B,) int32 dynamic-embedding bin in [0, 78]."""
    yaw = jnp.round(jnp.degrees(yaw_angle(neck_chain_rotation)))
    yaw = jnp.clip(yaw, -MAX_YAW_DEGREES, MAX_YAW_DEGREES).astype(jnp.int32)
    return jnp.where(yaw < 0, MAX_YAW_DEGREES - yaw, yaw)


def landmarks_68(vertices, faces, static_lmk_faces, static_lmk_bary, dynamic_lmk_faces,
                 dynamic_lmk_bary, neck_chain_rotation):
    """(B, 68, 3) iBUG-68 landmarks: 17 contour points for the head's yaw, then 51 static."""
    bins = contour_bin(neck_chain_rotation)
    contour = barycentric_points(vertices, faces, dynamic_lmk_faces[bins], dynamic_lmk_bary[bins])
    inner = barycentric_points(vertices, faces, static_lmk_faces, static_lmk_bary)
    return jnp.concatenate([contour, inner], axis=1)
