"""Blend shapes, joint regression, rigid kinematic chain and linear blend skinning.

All functions are pure; `parents` is a static tuple so the kinematic chain unrolls at trace time.
"""

import jax.numpy as jnp


def blend_shapes(coefficients, basis):
    """(B, K) coefficients, (K, V * 3) basis rows -> (B, V, 3): sum_k c_bk basis[k].

    One plain (B, K) @ (K, V * 3) product. With the basis stored row-major this way the CPU
    GEMM streams it once; the official (V, 3, K) layout contracted over its last axis made XLA
    transpose the whole basis on every call (measured 2-3x slower, benchmarks/flame_forward.py).
    """
    offsets = coefficients @ basis
    return offsets.reshape(coefficients.shape[0], -1, 3)


def vertices_to_joints(j_regressor, vertices):
    """(J, V) regressor, (B, V, 3) vertices -> (B, J, 3) joints."""
    # (B, 3, V) @ (V, J) keeps the long axis contiguous: several times faster on CPU than
    # contracting the middle axis of (B, V, 3).
    return jnp.swapaxes(jnp.swapaxes(vertices, 1, 2) @ j_regressor.T, 1, 2)


def pose_feature(rotations):
    """(B, J, 3, 3) joint rotations -> (B, (J-1)*9) flattened (R - I) of the non-root joints."""
    eye = jnp.eye(3, dtype=rotations.dtype)
    batch_size = rotations.shape[0]
    return (rotations[:, 1:] - eye).reshape(batch_size, -1)


def rigid_transform(rotations, joints, parents):
    """Forward kinematics.

    Args:
      rotations: (B, J, 3, 3) local joint rotations.
      joints: (B, J, 3) rest-pose joint locations.
      parents: static tuple (J,), -1 for the root; parents precede children.
    Returns:
      posed_joints: (B, J, 3).
      skinning: (B, J, 3, 4) world transforms relative to the rest pose, [R | t] with
        t = posed_joint - R @ rest_joint, so that x_posed = R x_rest + t.
    """
    world_rotations, world_translations = [], []
    for j, parent in enumerate(parents):
        if parent < 0:
            world_rotations.append(rotations[:, j])
            world_translations.append(joints[:, j])
        else:
            offset = joints[:, j] - joints[:, parent]
            world_rotations.append(world_rotations[parent] @ rotations[:, j])
            world_translations.append(world_translations[parent]
                                      + jnp.einsum("bij,bj->bi", world_rotations[parent], offset))
    world_rotations = jnp.stack(world_rotations, axis=1)
    posed_joints = jnp.stack(world_translations, axis=1)
    relative_translations = posed_joints - jnp.einsum("bjik,bjk->bji", world_rotations, joints)
    skinning = jnp.concatenate([world_rotations, relative_translations[..., None]], axis=-1)
    return posed_joints, skinning


def skin(lbs_weights, skinning, vertices):
    """Linear blend skinning: (V, J) weights, (B, J, 3, 4) transforms, (B, V, 3) -> (B, V, 3).

    x_i = sum_j w_vj (R_j x + t_j)_i, written as broadcast multiply-adds so that XLA fuses the
    whole sum into one loop over vertices: materialising the per-vertex blended (B, V, 3, 4)
    matrices costs several times more memory traffic than the arithmetic.
    """
    x, y, z = vertices[..., 0], vertices[..., 1], vertices[..., 2]
    rows = []
    for i in range(3):
        row = 0.0
        for j in range(skinning.shape[1]):
            transform = skinning[:, j, i, :, None]  # (B, 4, 1)
            row = row + lbs_weights[:, j] * (transform[:, 0] * x + transform[:, 1] * y
                                             + transform[:, 2] * z + transform[:, 3])
        rows.append(row)
    return jnp.stack(rows, axis=-1)
