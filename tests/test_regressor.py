"""Regressor: the 486 split, the head's starting code, path labels, and freezing by the optimizer
(frozen parameters and BatchNorm statistics unchanged, trainable ones changed after a step)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flame_jax
from recon import camera, regressor, shading, types


class TinyBackbone(nn.Module):
    """Stand-in with the IResNet's top-level layout (stem, stage1, stage4, output) and BN."""

    @nn.compact
    def __call__(self, images, train: bool = False):
        x = nn.Conv(4, (3, 3), strides=(4, 4), name="stem")(images)
        x = nn.BatchNorm(use_running_average=not train, name="stem_bn")(x)
        x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2), name="stage1")(x))
        x = nn.Conv(8, (3, 3), strides=(2, 2), name="stage4")(x)
        x = nn.BatchNorm(use_running_average=not train, name="stage4_bn")(x)
        return nn.Dense(16, name="output")(jnp.mean(x, axis=(1, 2)))


PREFIXES = ("stage4", "output")


def test_split_code_ranges_are_exact():
    vector = jnp.arange(float(types.CODE_SIZE))[None]
    code = types.split_code(vector)
    expected = {"shape": (0, 300), "pose": (300, 306), "expression": (306, 406),
                "texture": (406, 456), "camera": (456, 459), "light": (459, 486)}
    assert types.CODE_SIZE == 486
    for name, (start, stop) in expected.items():
        np.testing.assert_array_equal(np.asarray(getattr(code, name))[0], np.arange(start, stop))
    np.testing.assert_array_equal(np.asarray(code.to_vector()), np.asarray(vector))
    with pytest.raises(ValueError, match="486"):
        types.split_code(jnp.zeros((1, 485)))


def _init(seed=0):
    model = regressor.Regressor(backbone=TinyBackbone())
    images = jax.random.normal(jax.random.PRNGKey(seed), (4, 112, 112, 3))
    variables = model.init(jax.random.PRNGKey(1), images)
    # Give the BatchNorm statistics non-default values so that "unchanged" is meaningful.
    variables["batch_stats"] = jax.tree.map(lambda x: x + 0.3, variables["batch_stats"])
    return model, variables, images


def test_labels_name_trainable_and_frozen_paths():
    model, variables, _ = _init()
    labels = regressor.trainable_labels(variables["params"], trainable_prefixes=PREFIXES)
    flat = {"/".join(str(k.key) for k in path): label
            for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]}
    for path, label in flat.items():
        top = path.split("/")[1] if path.startswith("backbone/") else None
        if path.startswith("head/"):
            assert label == "trainable", path
        elif top.startswith(("stage4", "output")):
            assert label == "trainable", path
        else:
            assert label == "frozen", path
    assert flat["backbone/stem/kernel"] == "frozen"
    assert flat["backbone/stage4_bn/scale"] == "trainable"
    assert flat["head/output/bias"] == "trainable"
    counts = regressor.count_parameters(variables["params"], labels)
    assert counts["trainable"] > 0 and counts["frozen"] > 0
    with pytest.raises(ValueError, match="trainable prefixes"):
        regressor.trainable_labels(variables["params"], trainable_prefixes=("stage9",))
    with pytest.raises(ValueError, match="backbone"):
        regressor.trainable_labels({"head": {}}, trainable_prefixes=PREFIXES)


def test_optimizer_step_changes_only_trainable_and_never_batch_stats():
    model, variables, images = _init()
    params, stats = variables["params"], variables["batch_stats"]
    optimizer = regressor.make_optimizer(params, learning_rate=1e-2, weight_decay=1e-2,
                                         trainable_prefixes=PREFIXES)
    opt_state = optimizer.init(params)
    target = jax.random.normal(jax.random.PRNGKey(5), (4, types.CODE_SIZE))

    @jax.jit
    def step(params, stats, opt_state):
        def loss_fn(p):
            out, mutated = model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                       mutable=["batch_stats"])
            return jnp.mean((out - target) ** 2), mutated["batch_stats"]
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_stats, opt_state, grads

    new_params, new_stats, _, grads = step(params, stats, opt_state)
    labels = regressor.trainable_labels(params, trainable_prefixes=PREFIXES)
    for old, new, grad, label in zip(jax.tree.leaves(params), jax.tree.leaves(new_params),
                                     jax.tree.leaves(grads), jax.tree.leaves(labels)):
        if label == "frozen":
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
            assert np.any(np.asarray(grad) != 0)  # frozen by the optimizer, not by a zero grad
        else:
            assert np.any(np.asarray(new) != np.asarray(old))
    for old, new in zip(jax.tree.leaves(stats), jax.tree.leaves(new_stats)):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    # Same output in both modes: nothing runs on batch statistics.
    np.testing.assert_array_equal(np.asarray(model.apply(variables, images, train=True)),
                                  np.asarray(model.apply(variables, images)))


def test_head_starts_at_the_mean_camera_and_ambient_light():
    model, variables, images = _init()
    code = regressor.predict_code(model, variables, images)
    assert isinstance(code, types.Code) and code.shape.shape == (4, 300)
    np.testing.assert_allclose(np.asarray(code.camera),
                               np.broadcast_to(regressor.DEFAULT_CAMERA, (4, 3)), atol=0.3)
    light = np.asarray(code.sh_light)
    np.testing.assert_allclose(light[:, 0], regressor.AMBIENT_LIGHT_BAND0, atol=0.3)
    assert np.abs(light[:, 1:]).max() < 0.3
    # Small init: the rest of the code is near zero.
    assert np.abs(np.asarray(code.shape)).max() < 0.5
    offset = regressor.initial_code_offset()
    np.testing.assert_array_equal(np.asarray(variables["params"]["head"]["output"]["bias"]),
                                  offset)
    # Ambient band 0 alone shades every normal by exactly 1 (colour = albedo: 0.5 -> mid-grey).
    normals = jax.random.normal(jax.random.PRNGKey(3), (1, 7, 3))
    normals = normals / jnp.linalg.norm(normals, axis=-1, keepdims=True)
    sh = types.split_code(jnp.asarray(offset)[None]).sh_light
    np.testing.assert_allclose(np.asarray(shading.sh_shading(normals, sh)), 1.0, rtol=1e-6)


def test_default_camera_frames_the_template_like_a_detector_crop(synthetic_model):
    out = flame_jax.forward(synthetic_model, flame_jax.FlameParams.zeros(1, synthetic_model))
    landmarks = np.asarray(out.landmarks[0])
    computed = regressor.camera_for_landmarks(landmarks, crop_scale=1.6)
    np.testing.assert_allclose(computed, regressor.DEFAULT_CAMERA, atol=2e-3, rtol=1e-2)
    pixels = np.asarray(camera.project_to_pixels(
        jnp.asarray(landmarks)[None], jnp.asarray(regressor.DEFAULT_CAMERA)[None], (224, 224)))[0]
    low, high = pixels[:, :2].min(0), pixels[:, :2].max(0)
    # The landmark box is 1/1.6 of the crop (224 / 1.6 = 140 px) and centred.
    np.testing.assert_allclose(np.mean(high - low), 140.0, atol=2.0)
    np.testing.assert_allclose((low + high) / 2, [112.0, 112.0], atol=1.0)


def test_bad_images_raise():
    model, variables, _ = _init()
    with pytest.raises(ValueError, match="backbone_images"):
        model.apply(variables, jnp.zeros((2, 112, 112)))
