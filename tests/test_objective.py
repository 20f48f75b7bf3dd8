"""recon.objective: predict's landmarks against a numpy projection, the weighted sum, every term
in the metrics with a finite gradient, the ground-truth code scoring ~0, and zero weights that
remove their computation (no render in the jaxpr when the image terms are off)."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flame_jax
import spectral_gcn
from recon import losses, objective, types
from recon.render import camera
from recon.model import regressor
from recon.render.rasterizer import RasterSettings

SIZE = 64
SETTINGS = RasterSettings(height=SIZE, width=SIZE)
SUBJECTS, K = 2, 2


class TinyRecognition(nn.Module):
    @nn.compact
    def __call__(self, images, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=(8, 8))(images)
        return nn.Dense(16)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def assets(synthetic_model):
    hierarchy = spectral_gcn.flame_hierarchy()
    config = spectral_gcn.CoMAConfig()
    template = jnp.asarray(synthetic_model.v_template)
    encoder_variables = jax.jit(spectral_gcn.Encoder(config).init)(
        jax.random.PRNGKey(0), template[None], hierarchy)
    encoder = spectral_gcn.FrozenEncoder(
        variables={"params": encoder_variables["params"],
                   "stats": {"mean": template, "std": jnp.full_like(template, 0.005)}},
        hierarchy=hierarchy, config=config)
    network = TinyRecognition()
    recognition_variables = network.init(jax.random.PRNGKey(1), jnp.zeros((1, 112, 112, 3)))
    return objective.make_assets(synthetic_model, encoder=encoder,
                                 recognition=(network, recognition_variables))


def _gt_code(seed=0):
    rng = np.random.default_rng(seed)
    vector = np.zeros((SUBJECTS * K, types.CODE_SIZE), np.float32)
    vector += regressor.initial_code_offset((8.85, 0.0, 0.022))[None]
    code = types.split_code(jnp.asarray(vector))
    shape = np.repeat(rng.normal(size=(SUBJECTS, 300)) * 0.8, K, axis=0)  # one per subject
    return code.replace(
        shape=jnp.asarray(shape, jnp.float32),
        pose=jnp.asarray(rng.normal(size=(SUBJECTS * K, 6)) * [0.1, 0.2, 0.05, 0.1, 0, 0],
                         jnp.float32),
        expression=jnp.asarray(rng.normal(size=(SUBJECTS * K, 100)) * 0.5, jnp.float32),
        texture=jnp.asarray(rng.normal(size=(SUBJECTS * K, 50)) * 0.5, jnp.float32))


@pytest.fixture(scope="module")
def batch(assets):
    """A batch whose 3D and landmark ground truth is `_gt_code()`; grey noisy images, a central
    skin mask on examples 0 and 2, none on 1 and 3 (the rendered face region is used there)."""
    code = _gt_code()

    @jax.jit
    def make(code, assets):
        posed = flame_jax.forward(assets.flame, code.flame_params())
        neutral = flame_jax.forward(assets.flame, code.neutral_flame_params()).vertices
        landmarks = camera.project_to_pixels(posed.landmarks, code.camera, (SIZE, SIZE))[..., :2]
        return posed.vertices, neutral, landmarks

    posed, neutral, landmarks = make(code, assets)
    rng = np.random.default_rng(7)
    images = 0.6 + 0.05 * rng.normal(size=(SUBJECTS * K, SIZE, SIZE, 3))
    skin = np.zeros((SUBJECTS * K, SIZE, SIZE))
    skin[::2, 20:44, 16:48] = 1.0
    return types.Batch(
        images=jnp.asarray(images, jnp.float32),
        backbone_inputs=jnp.zeros((SUBJECTS * K, 112, 112, 3)), landmarks=landmarks,
        landmark_weights=jnp.ones((SUBJECTS * K, 68)), skin_masks=jnp.asarray(skin, jnp.float32),
        vertices=neutral, has_3d=jnp.ones((SUBJECTS * K,)),
        subject_ids=jnp.repeat(jnp.arange(SUBJECTS, dtype=jnp.int32), K))


@pytest.fixture(scope="module")
def predict_fn():
    return jax.jit(functools.partial(objective.predict, render_settings=None))


@pytest.fixture(scope="module")
def evaluations(assets, batch):
    """Loss, metrics and gradient of the full objective (every term on) at the ground-truth
    and a perturbed code: one compilation shared by the tests."""
    weights = objective.LossWeights()
    step = jax.jit(jax.value_and_grad(_loss_fn(weights), has_aux=True))
    out = {}
    for name, code in (("gt", _gt_code()), ("perturbed", _perturbed_code())):
        (loss, metrics), grad = step(code.to_vector(), batch, assets, jax.random.PRNGKey(0))
        out[name] = (float(loss), {k: float(v) for k, v in metrics.items()}, np.asarray(grad))
    return weights, out


def _perturbed_code(seed=1):
    code, rng = _gt_code(), np.random.default_rng(seed)
    bump = lambda x, s: x + jnp.asarray(rng.normal(size=x.shape) * s, jnp.float32)  # noqa: E731
    return code.replace(shape=bump(code.shape, 0.5), pose=bump(code.pose, 0.05),
                        expression=bump(code.expression, 0.5), texture=bump(code.texture, 0.5),
                        camera=bump(code.camera, 0.02), light=bump(code.light, 0.1))


def _loss_fn(weights, render_settings=SETTINGS):
    def fn(vector, batch, assets, rng):
        return objective.code_objective(types.split_code(vector), batch, assets, weights,
                                        images_per_subject=K, render_settings=render_settings,
                                        rng=rng)
    return fn


def test_predict_landmarks_match_a_numpy_projection(assets, batch, predict_fn):
    code = _perturbed_code()
    prediction = predict_fn(code, assets, batch)
    assert prediction.render is None
    landmarks = np.asarray(prediction.flame.landmarks, np.float64)
    cam = np.asarray(code.camera, np.float64)
    u = (cam[:, None, 0] * (landmarks[..., 0] + cam[:, None, 1]) + 1) * SIZE / 2
    v = (-cam[:, None, 0] * (landmarks[..., 1] + cam[:, None, 2]) + 1) * SIZE / 2
    np.testing.assert_allclose(np.asarray(prediction.landmarks_2d),
                               np.stack([u, v], -1), atol=1e-3)
    neutral_params = code.neutral_flame_params()
    assert float(jnp.abs(neutral_params.global_pose).max()) == 0.0
    with pytest.raises(ValueError, match="render_settings"):
        objective.predict(code, assets, batch, render_settings=RasterSettings(32, 32))


def test_every_term_in_metrics_and_finite_gradient(evaluations):
    weights, out = evaluations
    loss, metrics, grad = out["perturbed"]
    terms = ["vertex_mm", "id_3d", "landmark_ndc", "eye_closure_ndc", "lip_distance_ndc",
             "photometric_l1", "identity_1_minus_cos", "shape_reg", "expression_reg",
             "texture_reg", "light_reg"]
    for name in terms:
        assert name in metrics, name
        assert f"consistency/{name}" in metrics, name
        assert np.isfinite(metrics[name]), name
    for name in ("loss", "loss_3d", "loss_2d", "neutral_vertex_error_mm", "landmark_error_px",
                 "render_overflow", "consistency/loss"):
        assert name in metrics, name
    assert metrics["render_overflow"] == 0.0
    assert np.all(np.isfinite(grad))
    for name, part in types.code_slices().items():
        assert np.any(grad[:, part] != 0), name  # every code field gets a gradient
    # The weighted sum, recomputed from the logged terms; the shape / expression / texture
    # regularisers are DECA's batch sums, counted over both halves of the consistency batch
    # (x (1 + c) = 2 in each half's loss, whose mean is taken below).
    w = weights
    assert w.regulariser_reduction == "sum"
    loss_3d = w.vertex * metrics["vertex_mm"] + w.id_3d * metrics["id_3d"]
    loss_2d = (w.landmark * metrics["landmark_ndc"] + w.eye_closure * metrics["eye_closure_ndc"]
               + w.lip_distance * metrics["lip_distance_ndc"]
               + w.photometric * metrics["photometric_l1"]
               + w.identity * metrics["identity_1_minus_cos"]
               + 2 * w.shape_reg * metrics["shape_reg"]
               + 2 * w.expression_reg * metrics["expression_reg"]
               + 2 * w.texture_reg * metrics["texture_reg"] + w.light_reg * metrics["light_reg"])
    np.testing.assert_allclose(metrics["loss_3d"], loss_3d, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss_2d"], loss_2d, rtol=1e-5)
    plain = w.w3d * loss_3d + w.w2d * loss_2d
    # shape_consistency = 1: DECA's mean over the doubled batch.
    np.testing.assert_allclose(loss, (plain + metrics["consistency/loss"]) / 2, rtol=1e-5)
    # Swapped shapes come from another image of the same subject: the 2D terms change, the
    # batch mean of the neutral-mesh loss does not (a permutation within each subject).
    assert metrics["consistency/landmark_ndc"] != metrics["landmark_ndc"]
    np.testing.assert_allclose(metrics["consistency/vertex_mm"], metrics["vertex_mm"], rtol=1e-5)


def test_ground_truth_code_scores_lower_than_a_perturbed_one(evaluations):
    _, out = evaluations
    loss_gt, metrics_gt, _ = out["gt"]
    loss_bad, metrics_bad, _ = out["perturbed"]
    for name in ("vertex_mm", "id_3d", "landmark_ndc", "eye_closure_ndc", "lip_distance_ndc"):
        assert metrics_gt[name] < 1e-3, (name, metrics_gt[name])
        assert metrics_gt[f"consistency/{name}"] < 1e-3, name  # one shape per subject
        assert metrics_bad[name] > 10 * metrics_gt[name] + 1e-4, name
    assert metrics_gt["landmark_error_px"] < 1e-2
    assert loss_gt < loss_bad


def test_zero_weights_skip_their_computation(assets, batch):
    vector = _perturbed_code().to_vector()
    rng = jax.random.PRNGKey(0)

    def jaxpr_text(weights, settings=SETTINGS):
        fn = lambda v: objective.code_objective(  # noqa: E731
            types.split_code(v), batch, assets, weights, images_per_subject=K,
            render_settings=settings, rng=rng)
        return str(jax.make_jaxpr(fn)(vector))

    with_images = objective.LossWeights(shape_consistency=0.0)
    without_images = dataclasses.replace(with_images, photometric=0.0, identity=0.0)
    assert not objective.needs_render(without_images)
    assert "name=render" in jaxpr_text(with_images)  # the positive control
    assert "name=render" not in jaxpr_text(without_images)
    # Without render settings the image-free objective still runs; with images on it refuses.
    only_3d = objective.LossWeights(w2d=0.0, shape_consistency=0.0)

    def metric_names(weights, assets=assets):
        shapes = jax.eval_shape(lambda v: objective.code_objective(
            types.split_code(v), batch, assets, weights, images_per_subject=K)[1], vector)
        return set(shapes)

    assert metric_names(only_3d) == {"loss", "loss_3d", "loss_2d", "vertex_mm", "id_3d",
                                     "neutral_vertex_error_mm"}
    with pytest.raises(ValueError, match="render_settings"):
        objective.code_objective(types.split_code(vector), batch, assets, with_images,
                                 images_per_subject=K)
    # The 3D-ID term off: no encoder needed; on without one: a clear error before any work.
    no_id = dataclasses.replace(only_3d, id_3d=0.0)
    assert metric_names(no_id, assets.replace(encoder=None)) == {
        "loss", "loss_3d", "loss_2d", "vertex_mm", "neutral_vertex_error_mm"}
    with pytest.raises(ValueError, match="encoder"):
        objective.code_objective(types.split_code(vector), batch, assets.replace(encoder=None),
                                 only_3d, images_per_subject=K)


def test_code_objective_equals_objective_of_predict(assets, batch, predict_fn):
    # code_objective predicts the code and its swap as one 2B batch; objective predicts the
    # swap separately: same values.
    weights = objective.LossWeights(photometric=0.0, identity=0.0, id_3d=0.0)
    code, rng = _perturbed_code(), jax.random.PRNGKey(4)
    fused = jax.jit(lambda c: objective.code_objective(c, batch, assets, weights,
                                                       images_per_subject=K, rng=rng)[1])(code)
    separate = jax.jit(lambda c: objective.objective(predict_fn(c, assets, batch), batch, assets,
                                                     weights, images_per_subject=K,
                                                     rng=rng)[1])(code)
    assert set(fused) == set(separate)
    for name in fused:
        np.testing.assert_allclose(float(fused[name]), float(separate[name]), rtol=1e-5,
                                   atol=1e-7, err_msg=name)


def test_image_subjects_render_a_sub_batch(assets, batch):
    """`image_subjects=1`: the rendered terms are those of the first subject's K images (and
    their swapped copies) alone; every other term sees the whole batch."""
    weights = objective.LossWeights(id_3d=0.0, image_subjects=1)
    code, rng = _perturbed_code(), jax.random.PRNGKey(4)
    run = lambda c, b, w: jax.jit(lambda c: objective.code_objective(  # noqa: E731
        c, b, assets, w, images_per_subject=K, render_settings=SETTINGS, rng=rng)[1])(c)
    sub = run(code, batch, weights)
    first = jax.tree.map(lambda x: x[:K], code)
    alone = run(first, jax.tree.map(lambda x: x[:K], batch),
                dataclasses.replace(weights, image_subjects=0))
    full = run(code, batch, dataclasses.replace(weights, image_subjects=0))
    for name in ("photometric_l1", "identity_1_minus_cos", "consistency/photometric_l1"):
        np.testing.assert_allclose(sub[name], alone[name], rtol=1e-5, err_msg=name)
    for name in ("vertex_mm", "landmark_ndc", "shape_reg"):
        np.testing.assert_allclose(sub[name], full[name], rtol=1e-5, err_msg=name)
    assert abs(float(sub["photometric_l1"]) - float(full["photometric_l1"])) > 1e-6


def test_has_3d_masks_the_3d_terms(assets, batch, predict_fn):
    weights = objective.LossWeights(w2d=0.0, shape_consistency=0.0, id_3d=0.0)
    code = _perturbed_code()
    prediction = predict_fn(code, assets, batch)
    fn = jax.jit(lambda p, b: objective.objective(p, b, assets, weights,
                                                  images_per_subject=K)[1]["vertex_mm"])
    full = float(fn(prediction, batch))
    first_only = float(fn(prediction, batch.replace(has_3d=jnp.asarray([1.0, 0, 0, 0]))))
    per_example = np.asarray(losses.vertex_loss_mm(prediction.neutral_vertices, batch.vertices,
                                                   assets.region_weights))
    np.testing.assert_allclose(full, per_example.mean(), rtol=1e-5)
    np.testing.assert_allclose(first_only, per_example[0], rtol=1e-5)


def test_regularisers_reduce_as_deca_and_identity_sees_only_the_shape(assets, batch):
    code = _perturbed_code()
    half = 0.5 * np.sum(np.asarray(code.shape, np.float64) ** 2, axis=-1)
    for reduction, expected in (("sum", half.sum()), ("mean", half.mean())):
        weights = objective.LossWeights(regulariser_reduction=reduction, photometric=0.0,
                                        identity=0.0, id_3d=0.0, shape_consistency=0.0)
        metrics = jax.jit(lambda v: objective.code_objective(
            types.split_code(v), batch, assets, weights, images_per_subject=K)[1])(
            code.to_vector())
        np.testing.assert_allclose(float(metrics["shape_reg"]), expected, rtol=1e-5)
    # DECA's id_shape_only: the identity term's gradient reaches the shape (through the
    # rendered normals and silhouette) but neither the texture nor the light.
    weights = objective.LossWeights(w3d=0.0, landmark=0.0, eye_closure=0.0, lip_distance=0.0,
                                    photometric=0.0, shape_reg=0.0, expression_reg=0.0,
                                    texture_reg=0.0, light_reg=0.0, shape_consistency=0.0)
    grad = np.asarray(jax.jit(jax.grad(lambda v: objective.code_objective(
        types.split_code(v), batch, assets, weights, images_per_subject=K,
        render_settings=SETTINGS)[0]))(code.to_vector()))
    slices = types.code_slices()
    assert np.any(grad[:, slices["shape"]] != 0)
    assert np.all(grad[:, slices["texture"]] == 0) and np.all(grad[:, slices["light"]] == 0)
    with pytest.raises(ValueError, match="regulariser_reduction"):
        objective.LossWeights(regulariser_reduction="max")


def test_loss_weights_validate():
    with pytest.raises(ValueError, match="landmark"):
        objective.LossWeights(landmark=-1.0)
    with pytest.raises(ValueError, match="id_3d_kind"):
        objective.LossWeights(id_3d_kind="l1")
    weights = objective.LossWeights()
    assert (weights.w3d, weights.w2d, weights.vertex, weights.id_3d) == (0.4, 0.6, 0.5, 0.5)
    assert hash(weights) == hash(objective.LossWeights())  # static under jit
    assert not objective.LossWeights(w3d=0.0).on("vertex")
