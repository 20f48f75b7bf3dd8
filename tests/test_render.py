"""render(): shaded image against a numpy recomputation from the face-index map, gradients
with respect to light and camera against finite differences, jit/vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon import render

from recon.render import camera, rasterizer, shading

SETTINGS = rasterizer.RasterSettings(height=64, width=64)


@pytest.fixture(scope="module")
def scene(flame_topology):
    data = flame_topology
    vertices = np.stack([data["v_template"], data["v_template"] * 0.95]).astype(np.float32)
    faces = data["faces"].astype(np.int32)
    rng = np.random.default_rng(0)
    albedo = (0.4 + 0.3 * rng.random((2, vertices.shape[1], 3))).astype(np.float32)
    light = np.zeros((2, 9, 3), np.float32)
    light[:, 0] = [2.0, 1.8, 1.6]
    light[:, 3] = 0.6
    light[1, 1] = 0.4
    cams = np.asarray([[6.5, 0.0, 0.02], [7.5, 0.01, 0.0]], np.float32)
    return vertices, faces, albedo, light, cams


@pytest.fixture(scope="module")
def render_fn():
    return jax.jit(lambda v, f, c, l, a, s: render.render(v, f, c, l, a, settings=SETTINGS,
                                                          sigma=s))


def test_image_matches_numpy_shading(scene, render_fn):
    vertices, faces, albedo, light, cams = scene
    out = render_fn(vertices, faces, cams, light, albedo, 0.5)
    assert out.image.shape == (2, 64, 64, 3) and out.alpha.shape == (2, 64, 64)
    np.testing.assert_equal(np.asarray(out.overflow), 0)
    normals = np.asarray(shading.vertex_normals(jnp.asarray(vertices), jnp.asarray(faces)))
    screen = np.asarray(camera.project_to_pixels(jnp.asarray(vertices), jnp.asarray(cams),
                                                 (64, 64)), np.float64)
    for b in range(2):
        face_index = np.asarray(out.face_index[b])
        rows, cols = np.nonzero(face_index >= 0)
        tri = faces[face_index[rows, cols]]
        a, bb, c = (screen[b, tri[:, k]] for k in range(3))
        px, py = cols + 0.5, rows + 0.5
        det = ((bb[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1])
               - (c[:, 0] - a[:, 0]) * (bb[:, 1] - a[:, 1]))
        w1 = ((px - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (py - a[:, 1])) / det
        w2 = ((bb[:, 0] - a[:, 0]) * (py - a[:, 1]) - (px - a[:, 0]) * (bb[:, 1] - a[:, 1])) / det
        weights = np.stack([1 - w1 - w2, w1, w2], -1)
        assert weights.min() > -1e-3
        n = np.einsum("pk,pkc->pc", weights, normals[b][tri])
        alb = np.einsum("pk,pkc->pc", weights, albedo[b][tri])
        x, y, z = n[:, 0], n[:, 1], n[:, 2]
        basis = np.stack([np.ones_like(x), x, y, z, x * y, x * z, y * z, x * x - y * y,
                          3 * z * z - 1], -1) * shading.SH_CONSTANTS
        expected = alb * (basis @ light[b])
        np.testing.assert_allclose(np.asarray(out.image[b])[rows, cols], expected, atol=2e-3)
        depth = np.einsum("pk,pk->p", weights, screen[b][tri][..., 2])
        np.testing.assert_allclose(np.asarray(out.depth[b])[rows, cols], depth, atol=1e-4)
        assert np.all(np.asarray(out.alpha[b])[rows, cols] > 0.5)


def test_light_and_camera_gradients_match_finite_differences(scene):
    vertices, faces, albedo, light, cams = scene
    target = np.random.default_rng(3).random((2, 64, 64, 3)).astype(np.float32)
    with jax.enable_x64(True):
        def loss(light_code, cam):
            out = render.render(jnp.asarray(vertices, jnp.float64), jnp.asarray(faces), cam,
                                light_code, jnp.asarray(albedo, jnp.float64), settings=SETTINGS,
                                sigma=0.7)
            return jnp.mean(jnp.abs(render.composite(out, 0.0) - target))

        l0, c0 = jnp.asarray(light, jnp.float64), jnp.asarray(cams, jnp.float64)
        grad_light, grad_cam = jax.jit(jax.grad(loss, argnums=(0, 1)))(l0, c0)
        rng = np.random.default_rng(4)
        direction = rng.normal(size=light.shape)
        eps = 1e-6
        numeric = (loss(l0 + eps * direction, c0) - loss(l0 - eps * direction, c0)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.sum(grad_light * direction)), float(numeric),
                                   rtol=1e-4)
        direction = np.asarray([[0.0, 1e-3, -2e-3], [0.0, -1e-3, 1e-3]])  # translations
        numeric = (loss(l0, c0 + eps * direction) - loss(l0, c0 - eps * direction)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.sum(grad_cam * direction)), float(numeric),
                                   rtol=2e-2)


def test_vmap_matches_batch_and_composite(scene, render_fn):
    vertices, faces, albedo, light, cams = scene
    batched = render_fn(vertices, faces, cams, light, albedo, 0.5)
    split = jax.vmap(lambda v, c, l, a: render.render(v[None], jnp.asarray(faces), c[None],
                                                      l[None], a[None], settings=SETTINGS,
                                                      sigma=0.5).image[0])(
        jnp.asarray(vertices), jnp.asarray(cams), jnp.asarray(light), jnp.asarray(albedo))
    np.testing.assert_allclose(np.asarray(split), np.asarray(batched.image), atol=1e-5)
    background = jnp.full((2, 64, 64, 3), 0.25)
    composite = np.asarray(render.composite(batched, background))
    alpha = np.asarray(batched.alpha)[..., None]
    expected = alpha * np.asarray(batched.image) + (1 - alpha) * 0.25
    np.testing.assert_allclose(composite, expected, atol=1e-6)
    empty = alpha[..., 0] == 0
    full = alpha[..., 0] == 1
    assert empty.any() and full.any()
    np.testing.assert_allclose(composite[empty], 0.25)
    np.testing.assert_allclose(composite[full], np.asarray(batched.image)[full], atol=1e-6)


def test_light_must_be_sh_coefficients(scene):
    vertices, faces, albedo, light, cams = scene
    with pytest.raises(ValueError, match=r"light must be \(B, 9, 3\)"):
        render.render(vertices, faces, cams, light.reshape(2, 27), albedo, settings=SETTINGS)


def test_bad_albedo_shape_raises(scene):
    vertices, faces, albedo, light, cams = scene
    with pytest.raises(ValueError, match="albedo"):
        render.render(vertices, faces, cams, light, albedo[:, :10], settings=SETTINGS)
