"""recon.losses against hand-computed numpy values (jitted), the 3D-ID loss on a randomly
initialised CoMA encoder over the real FLAME hierarchy, and shape errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import spectral_gcn
from recon import losses, types
from recon.image import preprocess

RNG = np.random.default_rng(0)
SIZE = (64, 48)  # (H, W) of the test crops


def _landmarks(batch=3):
    return (RNG.random((batch, 68, 2)) * [SIZE[1], SIZE[0]]).astype(np.float32)


def _ndc(pixels):
    return pixels / np.asarray([SIZE[1] / 2, SIZE[0] / 2]) - 1.0


def test_region_weights_follow_the_masks_face_last(synthetic_model):
    weights = np.asarray(losses.region_weights(synthetic_model))
    masks = {name: np.asarray(idx) for name, idx in synthetic_model.masks.items()}
    expected = np.ones(synthetic_model.num_vertices)
    for name in ("left_eyeball", "right_eyeball", "left_ear", "right_ear"):
        expected[masks[name]] = 0.01
    expected[masks["face"]] = 150.0
    np.testing.assert_allclose(weights, expected, rtol=1e-6)
    assert weights.dtype == np.float32
    assert set(np.unique(weights)) == {np.float32(0.01), np.float32(1.0), np.float32(150.0)}


def test_vertex_loss_mm_matches_numpy():
    pred = RNG.normal(size=(2, 30, 3)).astype(np.float32) * 0.01
    gt = RNG.normal(size=(2, 30, 3)).astype(np.float32) * 0.01
    weights = RNG.random(30).astype(np.float32) * 10
    got = jax.jit(losses.vertex_loss_mm)(pred, gt, weights)
    expected = [1000.0 * np.mean(np.abs(pred[b] - gt[b]) * weights[:, None]) for b in range(2)]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    # Unit check: a uniform 1 mm offset along x with w = 1 is 1/3 mm (mean over xyz, MICA).
    offset = np.zeros_like(pred)
    offset[..., 0] = 1e-3
    np.testing.assert_allclose(np.asarray(losses.vertex_loss_mm(pred + offset, pred,
                                                                np.ones(30, np.float32))),
                               1.0 / 3.0, rtol=1e-4)
    with pytest.raises(ValueError, match="weights"):
        losses.vertex_loss_mm(pred, gt, weights[:10])
    with pytest.raises(ValueError, match="gt_vertices"):
        losses.vertex_loss_mm(pred, gt[:, :10], weights)


def test_deca_landmark_weights():
    weights = losses.deca_landmark_weights()
    expected = np.ones(68)
    expected[[5, 6, 10, 11]] = 2
    expected[27:36] = 1.5
    expected[[30, 31, 35]] = 3
    expected[48:68] = 1.5
    expected[[48, 54]] = 3
    np.testing.assert_array_equal(weights, expected)


def test_landmark_loss_matches_numpy():
    pred, gt = _landmarks(), _landmarks()
    visibility = (RNG.random((3, 68)) > 0.2).astype(np.float32)
    visibility[2] = 0.0  # an example without landmarks contributes 0, not NaN
    got = jax.jit(losses.landmark_loss_ndc, static_argnames="image_size")(
        pred, gt, visibility, image_size=SIZE)
    weights = losses.deca_landmark_weights()
    expected = []
    for b in range(3):
        w = weights * visibility[b]
        l1 = np.abs(_ndc(pred[b]) - _ndc(gt[b])).sum(-1)
        expected.append((l1 * w).sum() / (2 * w.sum() + 1e-8))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)
    px = losses.landmark_error_px(pred, gt, visibility)
    expected_px = [(np.linalg.norm(pred[b] - gt[b], axis=-1) * visibility[b]).sum()
                   / max(visibility[b].sum(), 1e-8) for b in range(3)]
    np.testing.assert_allclose(np.asarray(px), expected_px, rtol=1e-5)
    with pytest.raises(ValueError, match="pred_landmarks_px"):
        losses.landmark_loss_ndc(pred[:, :51], gt[:, :51], visibility[:, :51], image_size=SIZE)
    with pytest.raises(ValueError, match="visibility"):
        losses.landmark_loss_ndc(pred, gt, visibility[:2], image_size=SIZE)


@pytest.mark.parametrize("name,pairs", [
    ("eye_closure_loss_ndc", [(37, 41), (38, 40), (43, 47), (44, 46)]),
    ("lip_distance_loss_ndc", [(61, 67), (62, 66), (63, 65)])])
def test_pair_distance_losses_match_numpy(name, pairs):
    pred, gt = _landmarks(), _landmarks()
    visibility = np.ones((3, 68), np.float32)
    visibility[1, pairs[0][0]] = 0.0  # drops the first pair of example 1
    fn = getattr(losses, name)
    got = jax.jit(fn, static_argnames="image_size")(pred, gt, visibility, image_size=SIZE)
    expected = []
    for b in range(3):
        values = []
        for upper, lower in pairs:
            if visibility[b, upper] * visibility[b, lower] == 0:
                continue
            d_pred = np.linalg.norm(_ndc(pred[b, upper]) - _ndc(pred[b, lower]))
            d_gt = np.linalg.norm(_ndc(gt[b, upper]) - _ndc(gt[b, lower]))
            values.append(abs(d_pred - d_gt))
        expected.append(np.mean(values))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
    # Same lid/lip openings (one set translated): zero loss.
    np.testing.assert_allclose(np.asarray(fn(gt + 3.0, gt, visibility, image_size=SIZE)), 0.0,
                               atol=1e-5)


def test_photometric_loss_and_mask_match_numpy():
    rendered = RNG.random((2, 8, 6, 3)).astype(np.float32)
    alpha = RNG.random((2, 8, 6)).astype(np.float32)
    images = RNG.random((2, 8, 6, 3)).astype(np.float32)
    skin = (RNG.random((2, 8, 6)) > 0.5).astype(np.float32)
    skin[1] = 0.0  # no mask in the data for example 1: the rendered face region is used
    region = (RNG.random((2, 8, 6)) > 0.3).astype(np.float32)
    mask = np.asarray(losses.photometric_mask(skin, region))
    np.testing.assert_array_equal(mask[0], skin[0])
    np.testing.assert_array_equal(mask[1], region[1])
    got = jax.jit(losses.photometric_loss)(rendered, alpha, images, mask)
    expected = [np.mean(mask[b][..., None] * np.abs(rendered[b] * alpha[b][..., None]
                                                    - images[b])) for b in range(2)]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="alpha"):
        losses.photometric_loss(rendered, alpha[:, :4], images, mask)


class TinyRecognition(nn.Module):
    @nn.compact
    def __call__(self, images, train: bool = False):
        # Pooled before the dense layer, so one set of weights reads 112 (ArcFace) and 150 (dlib).
        x = nn.relu(nn.Conv(8, (3, 3), strides=(4, 4))(images))
        return nn.Dense(16)(x.mean(axis=(1, 2)))


def test_identity_loss_matches_numpy_and_freezes_the_network():
    network = TinyRecognition()
    rendered = RNG.random((2, 112, 112, 3)).astype(np.float32)
    images = RNG.random((2, 112, 112, 3)).astype(np.float32)
    variables = network.init(jax.random.PRNGKey(0), jnp.zeros((1, 112, 112, 3)))
    got = jax.jit(lambda v, r, i: losses.identity_loss(network, v, r, i))(
        variables, rendered, images)
    apply = jax.jit(network.apply)
    a = np.asarray(apply(variables, rendered * 2 - 1))
    b = np.asarray(apply(variables, images * 2 - 1))
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(np.asarray(got), 1 - cos, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(losses.identity_loss(network, variables, images,
                                                               images)), 0.0, atol=1e-5)
    grads = jax.jit(jax.grad(lambda v, r: jnp.sum(losses.identity_loss(network, v, r, images)),
                             argnums=(0, 1)))(variables, rendered)
    assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grads[0]))
    assert np.any(np.asarray(grads[1]) != 0)
    # dlib's network reads 150 px images in 0..255: both sides go through the same
    # recon.image preprocessing (the host resize is checked against OpenCV in test_image.py).
    small = RNG.random((2, 64, 64, 3)).astype(np.float32)
    other = RNG.random((2, 64, 64, 3)).astype(np.float32)
    got = np.asarray(losses.identity_loss(network, variables, small, other, input_kind="dlib"))
    a = np.asarray(apply(variables, preprocess.resize(small, 150) * 255.0))
    b = np.asarray(apply(variables, preprocess.resize(other, 150) * 255.0))
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
    np.testing.assert_allclose(got, 1 - cos, rtol=1e-4, atol=1e-5)


def test_shape_consistency_code_swaps_within_subjects():
    vector = jnp.asarray(RNG.normal(size=(6, types.CODE_SIZE)), jnp.float32)
    code = types.split_code(vector)
    for rng in (None, jax.random.PRNGKey(3)):
        swapped = losses.shape_consistency_code(code, 3, rng)
        shapes, new = np.asarray(code.shape), np.asarray(swapped.shape)
        for row in range(6):
            source = int(np.argmin(np.abs(shapes - new[row]).sum(-1)))
            np.testing.assert_array_equal(new[row], shapes[source])
            assert source // 3 == row // 3 and source != row  # same subject, another image
        np.testing.assert_array_equal(np.sort(new, 0), np.sort(shapes, 0))
        np.testing.assert_array_equal(np.asarray(swapped.expression), np.asarray(code.expression))
    with pytest.raises(ValueError, match="images_per_subject"):
        losses.shape_consistency_code(code, 4)
    with pytest.raises(ValueError, match="images_per_subject"):
        losses.shape_consistency_code(code, 1)


def test_regularisers_match_numpy():
    x = RNG.normal(size=(3, 50)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(losses.squared_norm_regularizer(x)),
                               0.5 * (x ** 2).sum(-1), rtol=1e-5)
    light = RNG.normal(size=(3, 9, 3)).astype(np.float32)
    expected = ((light - light.mean(2, keepdims=True)) ** 2).mean((1, 2))
    np.testing.assert_allclose(np.asarray(losses.light_regularizer(light)), expected, rtol=1e-5)
    grey = np.repeat(light[..., :1], 3, axis=2)
    np.testing.assert_allclose(np.asarray(losses.light_regularizer(grey)), 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="sh_light"):
        losses.light_regularizer(light.reshape(3, 27))


@pytest.fixture(scope="module")
def frozen_encoder(synthetic_model):
    hierarchy = spectral_gcn.flame_hierarchy()  # cached under ~/.cache/facerecon_jax after once
    config = spectral_gcn.CoMAConfig()
    template = jnp.asarray(synthetic_model.v_template)[None]
    variables = jax.jit(spectral_gcn.Encoder(config).init)(jax.random.PRNGKey(0), template,
                                                           hierarchy)
    # Standardise around the template (as trained encoders are), so inputs are O(1).
    variables = {"params": variables["params"],
                 "stats": {"mean": template[0], "std": jnp.full_like(template[0], 0.005)}}
    return spectral_gcn.FrozenEncoder(variables=variables, hierarchy=hierarchy, config=config)


def test_id_3d_loss_zero_for_equal_meshes_and_grows_with_shape(frozen_encoder, synthetic_model):
    shapedirs = np.asarray(synthetic_model.shapedirs)
    # The ground truth is not the template (whose standardised input, and latent, is zero).
    template = np.asarray(synthetic_model.v_template) + shapedirs[..., 5:8] @ [1.5, -1.0, 1.0]
    direction = shapedirs[..., :5] @ np.asarray([2.0, -1, 1, 0.5, 1])
    amounts = np.asarray([0.0, 0.5, 1.0, 2.0], np.float32)
    pred = jnp.asarray(template[None] + amounts[:, None, None] * direction[None], jnp.float32)
    gt = jnp.broadcast_to(jnp.asarray(template, jnp.float32), pred.shape)
    loss_fn = jax.jit(losses.id_3d_loss, static_argnames="kind")
    squared = np.asarray(loss_fn(frozen_encoder, pred, gt))
    assert squared[0] == 0.0
    assert np.all(np.diff(squared) > 0), squared
    latents = np.asarray(jax.jit(spectral_gcn.encode)(frozen_encoder,
                                                      jnp.concatenate([pred, gt[:1]])), np.float64)
    reference = ((latents[:4] - latents[4]) ** 2).sum(-1)
    np.testing.assert_allclose(squared, reference, rtol=1e-4, atol=1e-6)
    cosine = np.asarray(loss_fn(frozen_encoder, pred, gt, kind="cosine"))
    ref_cos = 1 - (latents[:4] @ latents[4]) / (np.linalg.norm(latents[:4], axis=-1)
                                                * np.linalg.norm(latents[4]))
    np.testing.assert_allclose(cosine, ref_cos, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="kind"):
        losses.id_3d_loss(frozen_encoder, pred, gt, kind="l1")
