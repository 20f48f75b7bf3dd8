"""FLAME forward pass: forward(model, params) -> FlameOutput. Pure, jit/vmap/grad safe."""

import chex
import jax
import jax.numpy as jnp

from flame_jax.landmarks import barycentric_points, landmarks_68
from flame_jax.lbs import blend_shapes, pose_feature, rigid_transform, skin
from flame_jax.model import FlameModel, FlameOutput, FlameParams
from flame_jax.rotation import rodrigues

NECK_JOINT = 1
# Batches above this size run as a sequential map over chunks: each chunk's intermediates then
# stay in cache (measured on a 2-core CPU at batch 256: 9,400 meshes/s chunked vs 5,900 whole).
DEFAULT_CHUNK_SIZE = 128


def pad_coefficients(coefficients, size: int, name: str):
    """Zero-pad (B, n) coefficients to (B, size) as smplx does; more than `size` is an error."""
    count = coefficients.shape[-1]
    if count > size:
        raise ValueError(f"FlameParams.{name} has {count} components but the model has {size}")
    if count == size:
        return coefficients
    return jnp.pad(coefficients, ((0, 0), (0, size - count)))


def _check_params(params: FlameParams):
    batch_size = params.global_pose.shape[0]
    for name, width in (("global_pose", 3), ("neck_pose", 3), ("jaw_pose", 3), ("eye_pose", 6),
                        ("translation", 3)):
        chex.assert_shape(getattr(params, name), (batch_size, width),
                          custom_message=f"FlameParams.{name}")
    chex.assert_rank([params.shape, params.expression], 2)
    chex.assert_equal_shape_prefix([params.shape, params.expression, params.global_pose], 1)


def forward(model: FlameModel, params: FlameParams, *,
            chunk_size: int | None = DEFAULT_CHUNK_SIZE) -> FlameOutput:
    """Posed FLAME vertices, joints and 68 landmarks (metres) for a batch.

    Semantics of the reference FLAME (smplx / FLAME_PyTorch): shape and expression blend shapes,
    joints regressed from the shaped mesh, rotations of [global, neck, jaw, left eye, right eye],
    pose correctives on (R - I) of the non-root joints, linear blend skinning, then translation.
    Batches larger than `chunk_size` are evaluated chunk by chunk (zero-padded to whole chunks;
    None evaluates the whole batch at once); the result does not depend on it.
    """
    _check_params(params)
    batch_size = params.global_pose.shape[0]
    if chunk_size is None or batch_size <= chunk_size:
        return _forward_batch(model, params)
    num_chunks = -(-batch_size // chunk_size)
    padding = num_chunks * chunk_size - batch_size
    chunks = jax.tree_util.tree_map(
        lambda x: jnp.pad(x, ((0, padding), (0, 0))).reshape(num_chunks, chunk_size, -1), params)
    outputs = jax.lax.map(lambda chunk: _forward_batch(model, chunk), chunks)
    return jax.tree_util.tree_map(
        lambda x: x.reshape(num_chunks * chunk_size, *x.shape[2:])[:batch_size], outputs)


def _forward_batch(model: FlameModel, params: FlameParams) -> FlameOutput:
    dtype = model.blend_basis.dtype
    shape = pad_coefficients(params.shape.astype(dtype), model.num_shape, "shape")
    expression = pad_coefficients(params.expression.astype(dtype), model.num_expression,
                                  "expression")
    batch_size = shape.shape[0]

    full_pose = params.full_pose().astype(dtype).reshape(batch_size, model.num_joints, 3)
    rotations = rodrigues(full_pose)  # (B, J, 3, 3)
    # One product gives the posed rest mesh: coefficients [1 (template), shape, expression,
    # pose feature] against the stacked basis; the joints come from the same coefficients
    # against the regressed basis, without a pass over the mesh.
    coefficients = jnp.concatenate([jnp.ones((batch_size, 1), dtype), shape, expression], axis=1)
    v_posed = blend_shapes(jnp.concatenate([coefficients, pose_feature(rotations)], axis=1),
                           model.blend_basis)
    rest_joints = (coefficients @ model.joint_basis).reshape(batch_size, model.num_joints, 3)
    posed_joints, skinning = rigid_transform(rotations, rest_joints, model.parents)
    vertices = skin(model.lbs_weights, skinning, v_posed)

    translation = params.translation.astype(dtype)[:, None]
    vertices = vertices + translation
    joints = posed_joints + translation

    neck_chain_rotation = skinning[:, NECK_JOINT, :, :3]  # root @ neck, world rotation of the neck
    landmarks = landmarks_68(vertices, model.faces, model.static_lmk_faces, model.static_lmk_bary,
                             model.dynamic_lmk_faces, model.dynamic_lmk_bary, neck_chain_rotation)
    mediapipe = None
    if model.mediapipe_lmk_faces is not None:
        mediapipe = barycentric_points(vertices, model.faces, model.mediapipe_lmk_faces,
                                       model.mediapipe_lmk_bary)
    return FlameOutput(vertices=vertices, joints=joints, landmarks=landmarks,
                       mediapipe_landmarks=mediapipe)
