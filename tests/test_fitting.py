"""recon.photo.fitting: losses against numpy, the camera closed form, stage masks and a landmark
fit that recovers a known synthetic face."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flame_jax
from recon.render import camera as camera_lib
from recon.photo import fitting
from recon.types import Code

# Shorter than the CLI defaults; the loss-relevant fields stay the defaults so that the compiled
# step is shared with tests/test_predict.py when both run in one process.
OPTIONS = fitting.FitOptions(rigid_steps=60, landmark_steps=120, appearance_steps=0,
                             photometric_steps=0)


@pytest.fixture(scope="module")
def model():
    return flame_jax.synthetic()


@pytest.fixture(scope="module")
def assets(model):
    return fitting.make_assets(model)


def _code(batch, *, shape=None, expression=None, pose=None, camera=(8.5, 0.004, -0.01)):
    zeros = lambda n: jnp.zeros((batch, n), jnp.float32)  # noqa: E731
    return Code(shape=zeros(300) if shape is None else jnp.asarray(shape, jnp.float32),
                pose=zeros(6) if pose is None else jnp.asarray(pose, jnp.float32),
                expression=zeros(100) if expression is None else jnp.asarray(expression,
                                                                             jnp.float32),
                texture=zeros(50), camera=jnp.tile(jnp.asarray([camera], jnp.float32), (batch, 1)),
                light=jnp.asarray(fitting.default_light(batch)))


def _project(model, code, size=224):
    landmarks = fitting.flame_forward(model, code.flame_params()).landmarks
    return np.asarray(camera_lib.project_to_pixels(landmarks, code.camera, (size, size))[..., :2])


def test_landmark_error_px_matches_numpy():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(100, 20, (2, 3, 68, 2)).astype(np.float32)
    np.testing.assert_allclose(fitting.landmark_error_px(pred, target),
                               np.linalg.norm(pred - target, axis=-1).mean(-1), rtol=1e-5)


def test_skin_colour_mask():
    colours = np.asarray([[[0.87, 0.67, 0.55], [0.55, 0.38, 0.28], [0.2, 0.3, 0.8],
                           [0.1, 0.6, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]], np.float32)
    np.testing.assert_array_equal(fitting.skin_colour_mask(colours), [[1, 1, 0, 0, 0, 0]])


def test_code_variables_round_trip():
    rng = np.random.default_rng(2)
    code = Code(shape=rng.normal(size=(2, 300)), pose=rng.normal(size=(2, 6)) * 0.1,
                expression=rng.normal(size=(2, 100)), texture=rng.normal(size=(2, 50)),
                camera=np.asarray([[8.0, 0.01, -0.02], [9.0, 0.0, 0.03]]),
                light=rng.normal(size=(2, 27)))
    code = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), code)
    variables = fitting.variables_from_code(code, fitting.FitOptions())
    back = fitting.to_code(variables, code.camera)
    for name in ("shape", "pose", "expression", "texture", "camera", "light"):
        np.testing.assert_allclose(getattr(back, name), getattr(code, name), rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    # The camera variables are an NDC offset: +1 in offset x moves every projection by W / 2 px.
    moved = fitting.to_code(variables.replace(offset=variables.offset.at[:, 0].add(1.0)),
                            code.camera)
    points = jnp.asarray(rng.normal(size=(2, 5, 3)) * 0.05, jnp.float32)
    shift = (camera_lib.project_to_pixels(points, moved.camera, (224, 224))
             - camera_lib.project_to_pixels(points, back.camera, (224, 224)))
    np.testing.assert_allclose(shift[..., 0], 112.0, rtol=1e-4)
    np.testing.assert_allclose(shift[..., 1], 0.0, atol=1e-3)


def test_initial_camera_recovers_a_known_camera(model):
    truth = _code(1, camera=(8.7, 0.012, -0.021))
    landmarks = _project(model, truth)
    weights = np.ones((1, 68), np.float32)
    for size in (224, 150):  # the camera is in NDC: the same at every crop size
        camera = fitting.initial_camera(model, _code(1, camera=(5.0, 0.0, 0.0)),
                                        landmarks * (size / 224), weights, image_size=size)
        np.testing.assert_allclose(camera, np.asarray(truth.camera), rtol=1e-4, atol=1e-5)


def test_make_assets_needs_an_albedo_space(model):
    bare = model.replace(albedo_mean=None, albedo_basis=None, masks=None)
    with pytest.raises(ValueError, match="albedo"):
        fitting.make_assets(bare)
    borrowed = fitting.make_assets(bare, albedo_source=model)
    assert borrowed.albedo_basis.shape == (5023, 3, 50)
    assert 0 < float(borrowed.face_region.sum()) < len(model.faces)


def test_options_validate():
    with pytest.raises(ValueError, match="rigid_steps"):
        fitting.FitOptions(rigid_steps=-1)
    with pytest.raises(ValueError, match="learning rates"):
        fitting.FitOptions(learning_rate=0.0)


def test_landmark_fit_recovers_a_synthetic_face(model, assets):
    """Targets projected from a known posed, expressive, non-mean face: the two landmark stages
    bring the mean-face start to well below a pixel-scale error, and frozen fields stay put."""
    rng = np.random.default_rng(3)
    truth = _code(1, shape=np.c_[rng.normal(0, 1.0, (1, 20)), np.zeros((1, 280))],
                  expression=np.c_[rng.normal(0, 1.0, (1, 10)), np.zeros((1, 90))],
                  pose=[[0.1, -0.25, 0.05, 0.08, 0.0, 0.0]], camera=(8.2, 0.01, -0.015))
    landmarks = _project(model, truth)
    weights = np.ones((1, 68), np.float32)
    image = np.full((1, 224, 224, 3), 0.5, np.float32)
    init = fitting.initial_code(model, landmarks, weights, OPTIONS, image_size=224)
    target = fitting.make_target(image, landmarks, weights, np.asarray(init.camera))
    assert target.size == 224

    rigid_only = dataclasses.replace(OPTIONS, landmark_steps=0)
    rigid = fitting.fit(assets, target, init, rigid_only)
    np.testing.assert_array_equal(rigid.code.shape, init.shape)  # frozen in the rigid stage
    np.testing.assert_array_equal(rigid.code.expression, init.expression)
    assert rigid.final_error_px[0] < rigid.initial_error_px[0]

    result = fitting.fit(assets, target, init, OPTIONS)
    assert set(result.history) == set(fitting.STAGES)
    assert len(result.history["rigid"]) == 60 and len(result.history["landmarks"]) == 120
    assert np.isfinite(result.history["landmarks"]).all()
    assert result.history["landmarks"][-1] < result.history["landmarks"][0]
    initial, final = result.initial_error_px[0], result.final_error_px[0]
    # Measured: initial about 9 px, final about 0.6 px (the shape / expression priors and the
    # 180 steps keep it from reaching zero); the face is ~130 px wide in the crop.
    assert initial > 4.0, initial
    assert final < 1.5 and final < 0.2 * initial, (initial, final)
    np.testing.assert_allclose(result.landmarks_2d, _project(model, result.code), atol=1e-3)
    # Yaw and roll recovered to within 3.5 degrees (pitch trades off against shape and expression
    # under a weak-perspective camera, so it is not checked).
    np.testing.assert_allclose(result.code.pose[0, 1:3], truth.pose[0, 1:3], atol=0.06)


def test_appearance_stage_fits_texture_and_light_with_geometry_frozen(model, assets):
    """On a uniformly skin-coloured photo the appearance stage lowers the photometric loss and
    changes only texture and light."""
    start = _code(1, camera=(8.5, 0.0, 0.0))
    image = np.broadcast_to(np.asarray([0.8, 0.55, 0.45], np.float32), (1, 224, 224, 3))
    landmarks = np.asarray(fitting.landmarks_2d(start, model, image_size=224))
    target = fitting.make_target(image, landmarks, np.ones((1, 68)), np.asarray(start.camera))
    assert float(target.skin.min()) == 1.0  # that colour is skin for the YCbCr box
    options = dataclasses.replace(OPTIONS, rigid_steps=0, landmark_steps=0, appearance_steps=15,
                                  photometric_steps=0)
    result = fitting.fit(assets, target, start, options)
    history = result.history["appearance"]
    assert history[-1] < 0.7 * history[0], history
    np.testing.assert_array_equal(result.code.shape, start.shape)
    np.testing.assert_array_equal(result.code.pose, start.pose)
    np.testing.assert_allclose(result.code.camera, start.camera, rtol=1e-6)
    assert float(jnp.abs(result.code.texture).max()) > 0.0


def test_fit_works_at_the_size_of_its_images(model, assets):
    """No crop size is built in: the landmark loss is in NDC, so fitting the same targets drawn
    at 112 px follows the 224 px trajectory (errors in pixels halve), and the target carries
    its size."""
    rng = np.random.default_rng(4)
    truth = _code(1, shape=np.c_[rng.normal(0, 1.0, (1, 10)), np.zeros((1, 290))],
                  pose=[[0.05, 0.2, -0.04, 0.05, 0.0, 0.0]], camera=(8.4, -0.01, 0.02))
    weights = np.ones((1, 68), np.float32)
    options = dataclasses.replace(OPTIONS, rigid_steps=15, landmark_steps=15)
    results = {}
    for size in (224, 112):
        landmarks = _project(model, truth, size)
        np.testing.assert_allclose(landmarks, _project(model, truth) * size / 224, rtol=1e-5,
                                   atol=1e-3)
        init = fitting.initial_code(model, landmarks, weights, options, image_size=size)
        target = fitting.make_target(np.full((1, size, size, 3), 0.5, np.float32), landmarks,
                                     weights, np.asarray(init.camera))
        assert target.size == size and target.skin.shape == (1, size, size)
        results[size] = fitting.fit(assets, target, init, options)
    big, small = results[224], results[112]
    np.testing.assert_allclose(small.code.camera, big.code.camera, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(small.code.pose, big.code.pose, atol=1e-3)
    np.testing.assert_allclose(small.final_error_px, big.final_error_px / 2, rtol=1e-2)
    np.testing.assert_allclose(small.landmarks_2d, np.asarray(big.landmarks_2d) / 2, atol=0.05)
    assert small.final_error_px[0] < small.initial_error_px[0]


def test_make_target_needs_square_crops():
    with pytest.raises(ValueError, match="square"):
        fitting.make_target(np.zeros((1, 100, 120, 3)), np.zeros((1, 68, 2)), np.ones((1, 68)),
                            np.ones((1, 3)))


def test_raster_settings_grow_with_the_crop():
    from recon.render import RasterSettings

    assert fitting.raster_settings(224) == RasterSettings(height=224, width=224)
    assert fitting.raster_settings(150) == RasterSettings(height=150, width=150)
    big = fitting.raster_settings(448)
    assert (big.height, big.window_sizes, big.tile_capacity) == (448, (2, 4, 8), 24576)
    assert fitting.raster_settings(896).tile_capacity == 4 * 24576
