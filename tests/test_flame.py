"""flame_jax.forward against an independent numpy/scipy implementation of FLAME (float64).

The reference below is written from the FLAME / smplx equations and uses scipy's rotations; it
calls nothing from the package. Tolerance: 1e-5 m on float32 output.
"""

import pickle

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

import flame_jax
from flame_jax.landmarks import contour_bin
from flame_jax.rotation import rodrigues

NUM_SHAPE, NUM_EXPRESSION = 300, 100
PARENTS = (-1, 0, 1, 1, 1)
TOLERANCE_M = 1e-5
forward = jax.jit(flame_jax.forward)  # eager op-by-op dispatch would dominate the test time


# ----------------------------------------------------------------------------- numpy reference
def reference_forward(official, shape, expression, full_pose, translation):
    """One head. `official` holds arrays in the official FLAME layout (posedirs (V, 3, 36))."""
    betas = np.concatenate([shape, expression])
    v_shaped = official["v_template"] + np.einsum("vcn,n->vc", official["shapedirs"], betas)
    joints = official["J_regressor"] @ v_shaped
    rotations = Rotation.from_rotvec(full_pose.reshape(-1, 3)).as_matrix()
    pose_feature = (rotations[1:] - np.eye(3)).ravel()
    v_posed = v_shaped + np.einsum("vcp,p->vc", official["posedirs"], pose_feature)
    world = []
    for j, parent in enumerate(PARENTS):
        local = np.eye(4)
        local[:3, :3] = rotations[j]
        local[:3, 3] = joints[j] - (joints[parent] if parent >= 0 else 0.0)
        world.append(local if parent < 0 else world[parent] @ local)
    world = np.stack(world)
    posed_joints = world[:, :3, 3].copy()
    relative = world.copy()
    relative[:, :3, 3] -= np.einsum("jik,jk->ji", world[:, :3, :3], joints)
    per_vertex = np.einsum("vj,jab->vab", official["weights"], relative)
    homogeneous = np.concatenate([v_posed, np.ones((len(v_posed), 1))], axis=1)
    vertices = np.einsum("vab,vb->va", per_vertex, homogeneous)[:, :3] + translation
    posed_joints = posed_joints + translation

    # Landmarks: contour bin from the yaw of root @ neck (DECA convention), scipy's Euler angles.
    neck_world = rotations[0] @ rotations[1]
    yaw = np.degrees(Rotation.from_matrix(neck_world).as_euler("ZYX")[1])
    yaw = int(np.clip(np.round(yaw), -39, 39))
    bin_index = yaw if yaw >= 0 else 39 - yaw
    faces = official["f"]

    def on_surface(face_idx, bary):
        return np.einsum("lk,lkc->lc", bary, vertices[faces[face_idx]])

    landmarks = np.concatenate([
        on_surface(official["dyn_faces"][bin_index], official["dyn_bary"][bin_index]),
        on_surface(official["static_faces"], official["static_bary"]),
    ])
    return vertices, posed_joints, landmarks


@pytest.fixture(scope="module")
def official_random(flame_topology, landmark_embedding):
    """A FLAME model in the official layout on the real topology, with random bases."""
    rng = np.random.default_rng(7)
    topology, embedding = flame_topology, landmark_embedding
    num_vertices = topology["v_template"].shape[0]
    weights = rng.random((num_vertices, 5)) ** 4
    weights /= weights.sum(1, keepdims=True)
    regressor = rng.random((5, num_vertices)) ** 8
    regressor /= regressor.sum(1, keepdims=True)
    return {
        "v_template": topology["v_template"].astype(np.float64),
        "shapedirs": rng.normal(0, 1e-3, (num_vertices, 3, NUM_SHAPE + NUM_EXPRESSION)),
        "posedirs": rng.normal(0, 1e-3, (num_vertices, 3, 36)),
        "weights": weights,
        "J_regressor": regressor,
        "f": topology["faces"],
        "static_faces": embedding["static_lmk_faces"], "static_bary": embedding["static_lmk_bary"],
        "dyn_faces": embedding["dynamic_lmk_faces"], "dyn_bary": embedding["dynamic_lmk_bary"],
    }


def to_model(official):
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return flame_jax.FlameModel.create(
        v_template=f32(official["v_template"]),
        shapedirs=f32(official["shapedirs"][..., :NUM_SHAPE]),
        exprdirs=f32(official["shapedirs"][..., NUM_SHAPE:]),
        posedirs=f32(official["posedirs"].reshape(-1, 36).T),  # smplx's layout conversion
        j_regressor=f32(official["J_regressor"]), lbs_weights=f32(official["weights"]),
        faces=jnp.asarray(official["f"], jnp.int32),
        static_lmk_faces=jnp.asarray(official["static_faces"], jnp.int32),
        static_lmk_bary=f32(official["static_bary"]),
        dynamic_lmk_faces=jnp.asarray(official["dyn_faces"], jnp.int32),
        dynamic_lmk_bary=f32(official["dyn_bary"]))


@pytest.fixture(scope="module")
def model(official_random):
    return to_model(official_random)


def random_params(rng, batch_size, pose_scale=0.4):
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return flame_jax.FlameParams(
        shape=f32(rng.normal(0, 1, (batch_size, NUM_SHAPE))),
        expression=f32(rng.normal(0, 1, (batch_size, NUM_EXPRESSION))),
        global_pose=f32(rng.normal(0, pose_scale, (batch_size, 3))),
        neck_pose=f32(rng.normal(0, pose_scale, (batch_size, 3))),
        jaw_pose=f32(rng.normal(0, pose_scale, (batch_size, 3))),
        eye_pose=f32(rng.normal(0, pose_scale, (batch_size, 6))),
        translation=f32(rng.normal(0, 0.1, (batch_size, 3))))


def assert_matches_reference(official, params, out):
    for b in range(params.batch_size):
        vertices, joints, landmarks = reference_forward(
            official, np.asarray(params.shape[b], np.float64),
            np.asarray(params.expression[b], np.float64),
            np.asarray(params.full_pose()[b], np.float64),
            np.asarray(params.translation[b], np.float64))
        np.testing.assert_allclose(out.vertices[b], vertices, atol=TOLERANCE_M, rtol=0)
        np.testing.assert_allclose(out.joints[b], joints, atol=TOLERANCE_M, rtol=0)
        np.testing.assert_allclose(out.landmarks[b], landmarks, atol=TOLERANCE_M, rtol=0)


# ----------------------------------------------------------------------------- forward
def test_forward_matches_numpy_reference_under_jit(official_random, model):
    params = random_params(np.random.default_rng(0), batch_size=4)
    traced_once = jax.jit(chex.assert_max_traces(flame_jax.forward, n=1))
    out = traced_once(model, params)
    chex.assert_shape(out.vertices, (4, 5023, 3))
    chex.assert_shape(out.joints, (4, 5, 3))
    chex.assert_shape(out.landmarks, (4, 68, 3))
    assert out.vertices.dtype == jnp.float32
    assert_matches_reference(official_random, params, out)
    # Same shapes, new values: no retrace.
    assert_matches_reference(official_random, random_params(np.random.default_rng(1), 4),
                             traced_once(model, random_params(np.random.default_rng(1), 4)))


def test_synthetic_model_matches_numpy_reference(synthetic_model):
    synthetic = synthetic_model
    num_vertices = synthetic.num_vertices
    official = {
        "v_template": np.asarray(synthetic.v_template, np.float64),
        "shapedirs": np.concatenate([synthetic.shapedirs, synthetic.exprdirs], axis=2),
        "posedirs": np.asarray(synthetic.posedirs).T.reshape(num_vertices, 3, 36),
        "weights": np.asarray(synthetic.lbs_weights, np.float64),
        "J_regressor": np.asarray(synthetic.j_regressor, np.float64),
        "f": np.asarray(synthetic.faces),
        "static_faces": np.asarray(synthetic.static_lmk_faces),
        "static_bary": np.asarray(synthetic.static_lmk_bary),
        "dyn_faces": np.asarray(synthetic.dynamic_lmk_faces),
        "dyn_bary": np.asarray(synthetic.dynamic_lmk_bary),
    }
    params = random_params(np.random.default_rng(8), batch_size=2)
    assert_matches_reference(official, params, forward(synthetic, params))


def test_forward_under_vmap_equals_batched(model):
    params = random_params(np.random.default_rng(2), batch_size=6)
    batched = forward(model, params)
    # vmap over 3 groups of 2 heads each.
    grouped = jax.tree_util.tree_map(lambda x: x.reshape(3, 2, *x.shape[1:]), params)
    mapped = jax.jit(jax.vmap(flame_jax.forward, in_axes=(None, 0)))(model, grouped)
    np.testing.assert_allclose(mapped.vertices.reshape(6, -1, 3), batched.vertices, atol=1e-6)
    np.testing.assert_allclose(mapped.landmarks.reshape(6, -1, 3), batched.landmarks, atol=1e-6)


def test_chunked_batches_equal_the_whole_batch(official_random, model):
    params = random_params(np.random.default_rng(9), batch_size=10)
    chunked = jax.jit(lambda m, p: flame_jax.forward(m, p, chunk_size=4))  # 3 chunks, 2 padded
    whole = jax.jit(lambda m, p: flame_jax.forward(m, p, chunk_size=None))
    out = chunked(model, params)
    chex.assert_shape(out.vertices, (10, 5023, 3))
    for field in ("vertices", "joints", "landmarks"):
        np.testing.assert_allclose(getattr(out, field), getattr(whole(model, params), field),
                                   atol=1e-6)
    assert_matches_reference(official_random, params, out)
    loss = lambda fn: lambda shape: jnp.sum(fn(model, params.replace(shape=shape)).vertices ** 2)
    np.testing.assert_allclose(jax.grad(loss(chunked))(params.shape),
                               jax.grad(loss(whole))(params.shape), rtol=1e-4, atol=1e-6)


def test_zero_params_give_the_template(model):
    out = forward(model, flame_jax.FlameParams.zeros(2, model))
    np.testing.assert_allclose(out.vertices[1], model.v_template, atol=1e-7)
    np.testing.assert_allclose(out.joints[0], model.j_regressor @ model.v_template, atol=1e-6)


def test_pi_rotation_about_x_is_a_half_turn_around_the_root(official_random, model):
    params = flame_jax.FlameParams.zeros(1, model).replace(
        global_pose=jnp.array([[np.pi, 0.0, 0.0]], jnp.float32))
    out = forward(model, params)
    root = official_random["J_regressor"][0] @ official_random["v_template"]
    # Only the root turns, so no pose corrective applies.
    expected = (official_random["v_template"] - root) * np.array([1.0, -1.0, -1.0]) + root
    np.testing.assert_allclose(out.vertices[0], expected, atol=TOLERANCE_M)


def test_fewer_components_are_zero_padded_and_more_is_an_error(model):
    rng = np.random.default_rng(3)
    params = random_params(rng, 2)
    short = params.replace(shape=params.shape[:, :20], expression=params.expression[:, :10])
    padded = params.replace(
        shape=jnp.pad(params.shape[:, :20], ((0, 0), (0, NUM_SHAPE - 20))),
        expression=jnp.pad(params.expression[:, :10], ((0, 0), (0, NUM_EXPRESSION - 10))))
    np.testing.assert_allclose(forward(model, short).vertices,
                               forward(model, padded).vertices, atol=1e-7)
    with pytest.raises(ValueError, match="shape has 301 components but the model has 300"):
        forward(model, params.replace(shape=jnp.zeros((2, 301))))


def test_wrong_pose_width_is_rejected(model):
    params = flame_jax.FlameParams.zeros(2, model)
    with pytest.raises(AssertionError, match="eye_pose"):
        forward(model, params.replace(eye_pose=jnp.zeros((2, 3))))


# ----------------------------------------------------------------------------- model storage
def test_blend_basis_layout_views_and_replace(official_random, model):
    """One (1 + n_shape + n_expression + 36, V * 3) basis; the official arrays are exact views;
    joint_basis is the regressor applied to its template/shape/expression rows."""
    v = official_random["v_template"].shape[0]
    rows = 1 + NUM_SHAPE + NUM_EXPRESSION
    basis = np.asarray(model.blend_basis)
    assert basis.shape == (rows + 36, v * 3) and model.num_shape == NUM_SHAPE
    directions = official_random["shapedirs"].astype(np.float32)  # (V, 3, 400)
    np.testing.assert_array_equal(basis[0], official_random["v_template"].astype(np.float32)
                                  .reshape(-1))
    np.testing.assert_array_equal(basis[1 + 7], directions[..., 7].reshape(-1))  # row 1 + k
    np.testing.assert_array_equal(basis[1 + NUM_SHAPE + 3], directions[..., NUM_SHAPE + 3]
                                  .reshape(-1))
    pose = official_random["posedirs"].astype(np.float32)  # (V, 3, 36)
    np.testing.assert_array_equal(basis[rows + 5], pose[..., 5].reshape(-1))
    np.testing.assert_array_equal(model.shapedirs, directions[..., :NUM_SHAPE])
    np.testing.assert_array_equal(model.exprdirs, directions[..., NUM_SHAPE:])
    np.testing.assert_array_equal(model.posedirs, pose.reshape(-1, 36).T)
    assert model.num_expression == NUM_EXPRESSION and model.num_vertices == v
    # joint_basis against float64 numpy: J (5, V) applied to each (V, 3) row.
    expected = np.einsum("jv,kvc->kjc", official_random["J_regressor"],
                         basis[:rows].astype(np.float64).reshape(rows, v, 3))
    np.testing.assert_allclose(np.asarray(model.joint_basis).reshape(rows, 5, 3), expected,
                               rtol=1e-5, atol=1e-7)
    # replace() takes the official arrays and rebuilds the bases (and the static count).
    fewer = model.replace(shapedirs=model.shapedirs[..., :5], v_template=model.v_template + 1.0,
                          j_regressor=model.j_regressor[::-1])
    assert fewer.num_shape == 5 and fewer.blend_basis.shape == (1 + 5 + NUM_EXPRESSION + 36,
                                                                v * 3)
    np.testing.assert_array_equal(fewer.exprdirs, model.exprdirs)
    np.testing.assert_array_equal(fewer.posedirs, model.posedirs)
    np.testing.assert_allclose(fewer.v_template, np.asarray(model.v_template) + 1.0)
    out = forward(fewer, flame_jax.FlameParams.zeros(1, fewer))
    np.testing.assert_allclose(out.vertices[0], np.asarray(model.v_template) + 1.0, atol=1e-6)
    template_joints = official_random["J_regressor"][::-1] @ (official_random["v_template"] + 1.0)
    np.testing.assert_allclose(out.joints[0], template_joints, atol=1e-6)
    arrays = {key: getattr(model, key) for key in (
        "v_template", "exprdirs", "posedirs", "j_regressor", "lbs_weights", "faces",
        "static_lmk_faces", "static_lmk_bary", "dynamic_lmk_faces", "dynamic_lmk_bary")}
    with pytest.raises(ValueError, match=r"shapedirs \(V, 3, n\)"):
        flame_jax.FlameModel.create(shapedirs=model.shapedirs[0], **arrays)
    with pytest.raises(ValueError, match=r"j_regressor has shape \(5, 10\)"):
        flame_jax.FlameModel.create(**dict(arrays, j_regressor=np.zeros((5, 10))),
                                    shapedirs=model.shapedirs)


def test_field_lists_come_from_the_dataclass(model):
    import dataclasses

    from flame_jax.model import array_fields, from_numpy, required_array_fields, to_numpy

    declared = [f.name for f in dataclasses.fields(flame_jax.FlameModel)]
    expected = [name for name in declared
                if name not in ("joint_basis", "num_shape", "masks", "parents")]
    blend = expected.index("blend_basis")
    expected[blend:blend + 1] = ["v_template", "shapedirs", "exprdirs", "posedirs"]
    assert list(array_fields()) == expected
    assert set(required_array_fields()) <= set(array_fields())
    assert "albedo_mean" not in required_array_fields()
    arrays = to_numpy(model)
    assert sorted(arrays) == sorted([k for k in array_fields() if getattr(model, k) is not None]
                                    + ["parents"])
    again = from_numpy(arrays)
    for key, value in to_numpy(again).items():
        np.testing.assert_array_equal(value, arrays[key], err_msg=key)
    with pytest.raises(ValueError, match=r"unknown keys \['shape_dirs'\]"):
        from_numpy(dict(arrays, shape_dirs=arrays["shapedirs"]))
    with pytest.raises(ValueError, match=r"missing keys \['posedirs'\]"):
        from_numpy({k: v for k, v in arrays.items() if k != "posedirs"})


# ----------------------------------------------------------------------------- gradients
def test_gradients_match_finite_differences(model):
    rng = np.random.default_rng(4)
    params = random_params(rng, 1, pose_scale=0.3)
    target = jnp.asarray(rng.normal(0, 0.05, (1, 5023, 3)), jnp.float32)

    def loss(pose):
        out = forward(model, params.replace(global_pose=pose[:, :3], jaw_pose=pose[:, 3:]))
        return jnp.mean((out.vertices - target) ** 2) * 1e4

    pose = jnp.concatenate([params.global_pose, params.jaw_pose], axis=1)
    grad = jax.jit(jax.grad(loss))(pose)
    eps = 1e-3
    for i in range(6):
        step = jnp.zeros_like(pose).at[0, i].set(eps)
        numeric = (loss(pose + step) - loss(pose - step)) / (2 * eps)
        np.testing.assert_allclose(grad[0, i], numeric, rtol=2e-2, atol=2e-3)


def test_gradients_are_finite_and_exact_at_zero_pose(model):
    params = flame_jax.FlameParams.zeros(1, model)

    def total(full_pose):
        out = forward(model, params.replace(
            global_pose=full_pose[:, :3], neck_pose=full_pose[:, 3:6], jaw_pose=full_pose[:, 6:9],
            eye_pose=full_pose[:, 9:]))
        return jnp.sum(out.vertices * jnp.arange(3.0)) + jnp.sum(out.landmarks)

    grad = jax.jit(jax.grad(total))(jnp.zeros((1, 15)))
    assert np.all(np.isfinite(grad))
    # d(R v)/d(axis_angle) at zero is -[v]_x, so d/d(aa) sum(R v . c) = v x c summed.
    jacobian = jax.jacobian(lambda aa: rodrigues(aa) @ jnp.array([0.3, -0.2, 0.5]))(jnp.zeros(3))
    expected = -np.array([[0, -0.5, -0.2], [0.5, 0, -0.3], [0.2, 0.3, 0]])
    np.testing.assert_allclose(jacobian, expected, atol=1e-7)


@pytest.mark.parametrize("angle", [0.0, 1e-9, 1e-6, 1e-4, 1e-2, 0.5, 2.0, np.pi])
def test_rodrigues_matches_scipy(angle):
    axes = np.random.default_rng(5).normal(size=(8, 3))
    axis_angle = (axes / np.linalg.norm(axes, axis=1, keepdims=True) * angle).astype(np.float32)
    got = np.asarray(rodrigues(jnp.asarray(axis_angle)), np.float64)
    expected = Rotation.from_rotvec(axis_angle.astype(np.float64)).as_matrix()
    np.testing.assert_allclose(got, expected, atol=5e-7)  # a few float32 ulps
    np.testing.assert_allclose(got @ np.swapaxes(got, 1, 2), np.broadcast_to(np.eye(3), got.shape),
                               atol=1e-6)


# ----------------------------------------------------------------------------- landmarks
@pytest.mark.parametrize("yaw_degrees, expected_bin", [
    (0.0, 0), (10.2, 10), (20.6, 21), (39.0, 39), (55.0, 39), (-1.0, 40), (-10.0, 49),
    (-39.0, 78), (-39.4, 78), (-70.0, 78)])
def test_contour_bin_hand_computed(yaw_degrees, expected_bin):
    rotation = Rotation.from_euler("y", yaw_degrees, degrees=True).as_matrix()
    assert int(contour_bin(jnp.asarray(rotation[None], jnp.float32))[0]) == expected_bin


def test_contour_bin_composes_root_and_neck(model):
    # Root yaw 15 deg, neck yaw 10 deg: the neck chain turns the head by 25 deg -> bin 25.
    params = flame_jax.FlameParams.zeros(1, model).replace(
        global_pose=jnp.array([[0.0, np.radians(15.0), 0.0]], jnp.float32),
        neck_pose=jnp.array([[0.0, np.radians(10.0), 0.0]], jnp.float32))
    out = forward(model, params)
    corners = np.asarray(out.vertices[0])[np.asarray(model.faces)[
        np.asarray(model.dynamic_lmk_faces[25])]]
    expected = np.einsum("lk,lkc->lc", np.asarray(model.dynamic_lmk_bary[25]), corners)
    np.testing.assert_allclose(out.landmarks[0, :17], expected, atol=1e-6)


@pytest.mark.parametrize("yaw_degrees", [-30.0, -15.0, 15.0, 30.0])
def test_contour_lies_on_the_visible_side_of_a_turned_head(model, yaw_degrees):
    """With the camera on +z, each contour triangle must face the camera (normal z > 0); the
    opposite sign convention puts half the contour on the far side (normal z < 0)."""
    params = flame_jax.FlameParams.zeros(1, model).replace(
        global_pose=jnp.array([[0.0, np.radians(yaw_degrees), 0.0]], jnp.float32))
    vertices = np.asarray(forward(model, params).vertices[0])
    faces = np.asarray(model.faces)

    def normal_z(bin_index):
        triangles = vertices[faces[np.asarray(model.dynamic_lmk_faces[bin_index])]]
        normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
        return normals[:, 2] / np.linalg.norm(normals, axis=1)

    rotation = Rotation.from_euler("y", yaw_degrees, degrees=True).as_matrix()
    chosen = int(contour_bin(jnp.asarray(rotation[None], jnp.float32))[0])
    mirrored = int(contour_bin(jnp.asarray(rotation.T[None], jnp.float32))[0])
    assert normal_z(chosen).min() > 0.0
    assert normal_z(mirrored).min() < -0.2


def test_real_template_landmarks_land_on_the_face(shared_dir, synthetic_model):
    """The real FLAME 2023 Open template and the official embeddings from ../shared."""
    basis = np.load(shared_dir / "flame2023_open_derived_id60_basis.npz")
    with open(shared_dir / "flame_static_embedding.pkl", "rb") as handle:
        static = pickle.load(handle, encoding="latin1")
    with open(shared_dir / "FLAME_masks.pkl", "rb") as handle:
        face_vertices = set(pickle.load(handle, encoding="latin1")["face"].tolist())
    template = basis["v_template"]
    model = synthetic_model.replace(
        v_template=jnp.asarray(template),
        static_lmk_faces=jnp.asarray(static["lmk_face_idx"], jnp.int32),
        static_lmk_bary=jnp.asarray(static["lmk_b_coords"], jnp.float32))
    landmarks = np.asarray(forward(model, flame_jax.FlameParams.zeros(1, model))
                           .landmarks[0])
    nearest = np.argmin(((landmarks[:, None] - template[None]) ** 2).sum(-1), axis=1)
    assert all(int(v) in face_vertices for v in nearest[17:]), "a static landmark is off the face"
    assert np.all(np.abs(landmarks[17:, 1]) < 0.055)
    # iBUG order: 37/46 outer eye corners (left/right of the image), 31 nose tip, 9 chin.
    right_eye_outer, left_eye_outer = landmarks[36], landmarks[45]
    assert right_eye_outer[0] < 0 < left_eye_outer[0]
    assert landmarks[30, 2] == pytest.approx(landmarks[:, 2].max(), abs=5e-3)  # nose tip frontmost
    assert landmarks[8, 1] == pytest.approx(landmarks[:, 1].min(), abs=1e-3)  # chin lowest
