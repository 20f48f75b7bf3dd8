"""SH lighting (DECA's basis and constants), vertex normals and albedo from the texture basis."""

import math
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon.render import shading



def test_sh_constants_are_decas():
    pi = math.pi
    expected = [1 / math.sqrt(4 * pi)] + [(2 * pi / 3) * math.sqrt(3 / (4 * pi))] * 3 + \
        [(pi / 4) * 3 * math.sqrt(5 / (12 * pi))] * 3 + \
        [(pi / 4) * 1.5 * math.sqrt(5 / (12 * pi)), (pi / 4) * 0.5 * math.sqrt(5 / (4 * pi))]
    np.testing.assert_allclose(shading.SH_CONSTANTS, expected, rtol=1e-6)


def test_sh_shading_matches_numpy():
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=-1, keepdims=True)
    light = rng.normal(size=(2, 27)).astype(np.float32)
    x, y, z = normals[..., 0], normals[..., 1], normals[..., 2]
    basis = np.stack([np.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y,
                      3 * z * z - 1], -1) * shading.SH_CONSTANTS
    expected = np.einsum("bhwk,bkc->bhwc", basis, light.reshape(2, 9, 3))
    got = shading.sh_shading(jnp.asarray(normals), jnp.asarray(light.reshape(2, 9, 3)))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)


def test_light_code_layout_and_errors():
    from recon import types
    code = types.split_code(jnp.arange(float(types.CODE_SIZE))[None])
    light = code.sh_light  # the one reshape of the 27-d light code
    assert light.shape == (1, 9, 3)
    start = types.code_slices()["light"].start
    assert float(light[0, 1, 2]) == start + 5.0  # band-major, RGB-minor
    normals = jnp.zeros((1, 4, 3)).at[..., 2].set(1.0)
    for bad in (jnp.zeros((1, 27)), jnp.zeros((1, 3, 9)), jnp.zeros((9, 3))):
        with pytest.raises(ValueError, match=r"light must be \(B, 9, 3\)"):
            shading.sh_shading(normals, bad)


def test_vertex_normals_match_numpy_and_point_outward(flame_topology):
    data = flame_topology
    vertices, faces = data["v_template"].astype(np.float64), data["faces"]
    tri = vertices[faces]
    face_n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    summed = np.zeros_like(vertices)
    for corner in range(3):
        np.add.at(summed, faces[:, corner], face_n)
    expected = summed / np.linalg.norm(summed, axis=-1, keepdims=True)
    got = np.asarray(shading.vertex_normals(jnp.asarray(vertices[None], jnp.float32),
                                            jnp.asarray(faces)))[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)
    nose_tip = np.argmax(vertices[:, 2])
    assert got[nose_tip, 2] > 0.8  # the face looks toward +z


def test_vertex_normals_degenerate_are_finite():
    vertices = jnp.zeros((1, 4, 3))
    faces = jnp.asarray([[0, 1, 2], [1, 2, 3]], jnp.int32)
    normals, grad = jax.value_and_grad(
        lambda v: jnp.sum(shading.vertex_normals(v, faces)))(vertices)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert float(normals) == 0.0


def test_albedo_from_texture():
    rng = np.random.default_rng(0)
    mean = rng.random((6, 3)).astype(np.float32)
    basis = rng.normal(size=(6, 3, 5)).astype(np.float32)
    texture = rng.normal(size=(2, 3)).astype(np.float32)
    got = shading.albedo_from_texture(jnp.asarray(mean), jnp.asarray(basis), jnp.asarray(texture))
    expected = mean[None] + np.einsum("vcn,bn->bvc", basis[..., :3], texture)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="texture"):
        shading.albedo_from_texture(jnp.asarray(mean), jnp.asarray(basis), jnp.zeros((2, 6)))
