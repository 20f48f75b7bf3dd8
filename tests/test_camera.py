"""Camera: DECA's weak-perspective projection, NDC -> pixel mapping, and that projected points
land where the rasterizer draws them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon.render import camera, rasterizer



def test_orthographic_project_matches_deca_formula():
    rng = np.random.default_rng(0)
    points = rng.normal(size=(2, 7, 3)).astype(np.float32)
    cam = np.asarray([[8.0, 0.01, -0.02], [5.0, 0.0, 0.03]], np.float32)
    got = np.asarray(camera.orthographic_project(jnp.asarray(points), jnp.asarray(cam)))
    # DECA: X_trans = X[:, :, :2] + cam[:, None, 1:]; Xn = cam[:, None, 0:1] * X_trans; y flipped.
    expected_xy = cam[:, None, 0:1] * (points[..., :2] + cam[:, None, 1:])
    np.testing.assert_allclose(got[..., 0], expected_xy[..., 0], rtol=1e-6)
    np.testing.assert_allclose(got[..., 1], -expected_xy[..., 1], rtol=1e-6)
    np.testing.assert_allclose(got[..., 2], cam[:, None, 0] * points[..., 2], rtol=1e-6)


def test_ndc_pixel_mapping_and_inverse():
    ndc = jnp.asarray([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0]])
    pixels = camera.ndc_to_pixels(ndc, (100, 200))
    np.testing.assert_allclose(np.asarray(pixels), [[0, 0], [200, 100], [100, 50]])
    np.testing.assert_allclose(np.asarray(camera.pixels_to_ndc(pixels, (100, 200))), ndc,
                               atol=1e-6)


def test_up_in_the_model_is_up_in_the_image():
    points = jnp.asarray([[[0.0, 0.1, 0.0], [0.0, -0.1, 0.0], [0.1, 0.0, 0.0]]])
    uv = np.asarray(camera.project_to_pixels(points, jnp.asarray([[5.0, 0.0, 0.0]]), (64, 64)))
    assert uv[0, 0, 1] < 32 < uv[0, 1, 1]  # +y model -> smaller row
    assert uv[0, 2, 0] > 32  # +x model -> larger column


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="camera"):
        camera.orthographic_project(jnp.zeros((2, 5, 3)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="points"):
        camera.orthographic_project(jnp.zeros((5, 3)), jnp.zeros((1, 3)))


def test_projected_points_land_on_their_rasterized_triangle(flame_topology):
    """A point on a visible triangle, projected like a landmark, falls in a pixel that the
    rasterizer gives to that triangle, and interpolating the screen positions reproduces the
    pixel centres (the rasterizer and `project_to_pixels` share one convention)."""
    data = flame_topology
    vertices = jnp.asarray(data["v_template"])[None]
    faces = jnp.asarray(data["faces"].astype(np.int32))
    size = (96, 96)
    cam = jnp.asarray([[7.0, 0.0, 0.02]])
    screen = camera.project_to_pixels(vertices, cam, size)
    settings = rasterizer.RasterSettings(height=96, width=96)
    fragments = rasterizer.rasterize(screen, faces, screen, settings, sigma=0.5)
    face_index = np.asarray(fragments.face_index[0])
    covered = face_index >= 0
    uv = np.asarray(fragments.attributes[0, ..., :2])
    jj, ii = np.meshgrid(np.arange(96) + 0.5, np.arange(96) + 0.5)
    np.testing.assert_allclose(uv[covered, 0], jj[covered], atol=2e-3)
    np.testing.assert_allclose(uv[covered, 1], ii[covered], atol=2e-3)

    # Landmark-like points: centroids of the visible triangles, projected with the same camera.
    visible = np.unique(face_index[covered])
    rng = np.random.default_rng(1)
    chosen = rng.choice(visible, size=200, replace=False)
    centroids = np.asarray(vertices[0])[np.asarray(faces)[chosen]].mean(axis=1)
    projected = np.asarray(camera.project_to_pixels(jnp.asarray(centroids)[None], cam, size))[0]
    pixel = np.floor(projected[:, :2]).astype(int)
    inside = np.all((pixel >= 0) & (pixel < 96), axis=1)
    assert inside.sum() > 150
    hits = face_index[pixel[inside, 1], pixel[inside, 0]]
    chosen = chosen[inside]
    # The pixel centre may fall on a neighbouring triangle for sub-pixel triangles; most hit.
    assert np.mean(hits == chosen) > 0.9
    np.testing.assert_equal(jax.device_get(fragments.overflow), [0])
