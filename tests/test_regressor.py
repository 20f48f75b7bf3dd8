"""Regressor: the 486 split, the head's starting code, path labels, and freezing by the optimizer
(frozen parameters and BatchNorm statistics unchanged, trainable ones changed after a step)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import flame_jax
from recon import types
from recon.render import camera, shading
from recon import model as backbone
from recon.model import regressor, build
from recon.training.regressor.step import make_optimizer as make_train_optimizer
from recon.training.regressor.options import OptimOptions


CAMERA = (8.85, 0.0, 0.022)
LAST_STAGE = dict(trainable_parts=backbone.TRAINABLE_PREFIXES,
                  always_frozen=backbone.ALWAYS_FROZEN_PATHS)


def _path(path):
    return "/".join(str(getattr(k, "key", k)) for k in path)


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


@functools.lru_cache(maxsize=None)
def _init(batch_norm_train_parts=()):
    """A Regressor on IResNet.small with random backbone weights and a really initialised head.

    The backbone's weights are drawn with numpy into the shapes of `model.init` (its jitted
    init costs ~18 CPU-s, this ~0.1 s); the head is initialised by Flax, so the starting code is
    the real one.
    """
    model = regressor.Regressor(
        backbone=backbone.IResNet.small(batch_norm_train_parts=batch_norm_train_parts),
        initial_camera=CAMERA)
    images = jax.random.normal(jax.random.PRNGKey(0), (2, 112, 112, 3))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(1), images)
    rng = np.random.default_rng(0)

    def draw(path, shape):
        name = _path(path).rsplit("/", 1)[-1]
        if name in ("scale", "var"):
            return jnp.asarray(1.0 + 0.3 * rng.random(shape.shape), jnp.float32)
        if name in ("kernel",):
            fan_in = int(np.prod(shape.shape[:-1]))
            return jnp.asarray(rng.normal(size=shape.shape) / np.sqrt(fan_in), jnp.float32)
        return jnp.asarray(0.1 * rng.normal(size=shape.shape), jnp.float32)

    filled = jax.tree_util.tree_map_with_path(draw, shapes)
    head_params = jax.jit(regressor.MappingHead(
        output_offset=tuple(regressor.initial_code_offset(CAMERA).tolist())).init)(
            jax.random.PRNGKey(2), jnp.zeros((1, 512)))["params"]
    params = {"backbone": filled["params"]["backbone"], "head": head_params}
    variables = {"params": params, "batch_stats": filled["batch_stats"]}
    return model, variables, images


def test_labels_name_trainable_and_frozen_paths():
    model, variables, _ = _init()
    labels = regressor.trainable_labels(variables["params"], **LAST_STAGE)
    flat = {_path(path): label
            for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]}
    for path, label in flat.items():
        parts = path.split("/")
        if parts[0] == "head":
            expected = "trainable"
        elif path == "backbone/output/features/scale":  # arcface_torch keeps it fixed
            expected = "frozen"
        else:
            expected = "trainable" if parts[1] in ("stage4", "output") else "frozen"
        assert label == expected, path
    assert {"backbone/stem/conv/kernel", "backbone/stage3/block0/conv1/kernel",
            "backbone/stage4/block0/conv1/kernel", "head/output/bias"} <= set(flat), sorted(flat)
    counts = regressor.count_parameters(variables["params"], labels)
    assert counts["trainable"] > 0 and counts["frozen"] > 0
    with pytest.raises(ValueError, match="stage9"):
        regressor.trainable_labels(variables["params"], trainable_parts=("stage9",))
    with pytest.raises(ValueError, match="backbone"):
        regressor.trainable_labels({"head": {}}, trainable_parts=())


def test_default_backbone_never_updates_batch_stats_in_train_mode():
    model, variables, images = _init()
    _, mutated = jax.jit(lambda v: model.apply(v, images, train=True, mutable=["batch_stats"]))(
        variables)
    for old, new in zip(jax.tree.leaves(variables["batch_stats"]),
                        jax.tree.leaves(mutated["batch_stats"])):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


def test_optimizer_step_changes_only_trainable_and_no_frozen_batch_stats():
    # stage4 uses batch statistics in train mode: its statistics move, no frozen part's does.
    batch_norm_train_parts = ("stage4",)
    model, variables, images = _init(batch_norm_train_parts)
    params, stats = variables["params"], variables["batch_stats"]
    labels = regressor.trainable_labels(params, **LAST_STAGE)
    optimizer = make_train_optimizer(labels, OptimOptions(learning_rate=1e-2, weight_decay=1e-2),
                                     10)
    opt_state = optimizer.init(params)
    target = jax.random.normal(jax.random.PRNGKey(5), (2, types.CODE_SIZE))

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
    frozen_with_gradient = 0
    for (path, old), new, grad, label in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                             jax.tree.leaves(new_params), jax.tree.leaves(grads),
                                             jax.tree.leaves(labels)):
        if label == "frozen":
            np.testing.assert_array_equal(np.asarray(new), np.asarray(old), err_msg=_path(path))
            frozen_with_gradient += int(np.any(np.asarray(grad) != 0))
        else:
            assert np.any(np.asarray(new) != np.asarray(old)), _path(path)
    assert frozen_with_gradient > 0  # frozen by the optimizer, not by a zero gradient
    changed = set()
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(stats)[0],
                                jax.tree.leaves(new_stats)):
        if not np.array_equal(np.asarray(new), np.asarray(old)):
            changed.add(_path(path).split("/")[1])
    # Only parts listed in batch_norm_train_parts (trainable ones) may update statistics.
    assert changed == set(batch_norm_train_parts)


def test_head_starts_at_the_mean_camera_and_ambient_light():
    model, variables, images = _init()
    code = types.split_code(jax.jit(model.apply)(variables, images))
    assert isinstance(code, types.Code) and code.shape.shape == (2, 300)
    np.testing.assert_allclose(np.asarray(code.camera), np.broadcast_to(CAMERA, (2, 3)),
                               atol=0.3)
    light = np.asarray(code.sh_light)
    np.testing.assert_allclose(light[:, 0], regressor.AMBIENT_LIGHT_BAND0, atol=0.3)
    assert np.abs(light[:, 1:]).max() < 0.3
    # Small init: the rest of the code is near zero.
    assert np.abs(np.asarray(code.shape)).max() < 0.5
    offset = regressor.initial_code_offset(CAMERA)
    np.testing.assert_array_equal(np.asarray(variables["params"]["head"]["output"]["bias"]),
                                  offset)
    # Ambient band 0 alone shades every normal by exactly 1 (colour = albedo: 0.5 -> mid-grey).
    normals = jax.random.normal(jax.random.PRNGKey(3), (1, 7, 3))
    normals = normals / jnp.linalg.norm(normals, axis=-1, keepdims=True)
    sh = types.split_code(jnp.asarray(offset)[None]).sh_light
    np.testing.assert_allclose(np.asarray(shading.sh_shading(normals, sh)), 1.0, rtol=1e-6)


def test_features_input_equals_the_pixel_regressor():
    """A regressor reading the frozen trunk's features (`model.trunk_cache`) computes the same
    code from the same parameters as the pixel regressor."""
    model, variables, images = _init()
    features = jax.jit(lambda v, x: model.backbone.apply(
        {"params": v["params"]["backbone"], "batch_stats": v["batch_stats"]["backbone"]}, x,
        until="stage3", method=backbone.IResNet.features))(variables, images)
    from_features = model.clone(input_kind="features", trunk_end="stage3")
    np.testing.assert_allclose(np.asarray(jax.jit(from_features.apply)(variables, features)),
                               np.asarray(jax.jit(model.apply)(variables, images)), rtol=1e-5,
                               atol=1e-5)


def test_build_model_options_and_errors():
    options = build.ModelOptions(backbone="dlib", trainable="last_stage", trunk_cache=True)
    assert options.input_kind == "dlib" and options.trainable_parts() == (
        "level1", "level0", "fc")
    with pytest.raises(ValueError, match="trunk_cache"):
        build.ModelOptions(trunk_cache=True)
    with pytest.raises(ValueError, match="batch_norm"):
        build.ModelOptions(backbone="dlib", batch_norm="batch")
    with pytest.raises(ValueError, match="arcface_path"):
        build.ModelOptions(backbone="dlib", arcface_path="x.onnx")
    with pytest.raises(ValueError, match="dtype"):
        build.ModelOptions(dtype="float64")
    assert build.ModelOptions(dtype="auto").compute_dtype("cpu") == jnp.float32
    assert build.ModelOptions(dtype="auto").compute_dtype("gpu") == jnp.bfloat16
    # bf16 compute, f32 parameters: the code stays float32.
    model, _ = build.build_model(build.ModelOptions(width=8, embedding_size=64,
                                                    dtype="bfloat16"), camera=CAMERA)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 112, 112, 3)))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes["params"]))
    out = jax.eval_shape(model.apply, shapes, jnp.zeros((1, 112, 112, 3)))
    assert out.dtype == jnp.float32


def test_bad_images_raise():
    model, variables, _ = _init()
    with pytest.raises(ValueError, match="Regressor inputs"):
        model.apply(variables, jnp.zeros((2, 112, 112)))
