"""The regressor's trainer: one step end to end, a single trace, 8 devices = 1 device, exact
resume after a kill, a NaN batch named, the predictor, the rigid alignment, the configs.

Sizes are tiny (64 x 64 crops, a width-8 IResNet with one block per stage); most tests switch
the image terms and the 3D-ID term off so that they compile in seconds; the end-to-end smoke
test runs every loss of the default config.
"""

import importlib.util
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from recon import evaluation, trainer
from recon.training import sharding

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_config(name: str, arg: str = "smoke") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"config_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("facerecon_cache"))


def _cheap_config(cache_dir: str, **overrides) -> ml_collections.ConfigDict:
    """The smoke config without rendered or 3D-ID terms (fast to compile), no PNGs."""
    config = _load_config("default")
    config.cache_dir = cache_dir
    config.loss.photometric = 0.0
    config.loss.id_3d = 0.0
    config.image_every = 0
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def _read_metrics(workdir) -> list:
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _random_batch(flame, rows: int = 8, size: int = 64, seed: int = 0) -> dict:
    """A host batch with the `Batch` fields: random images and landmarks; neutral FLAME heads
    of one shared identity plus a per-subject variation (so a regressor can fit the batch)."""
    import flame_jax

    rng = np.random.default_rng(seed)
    shape = np.zeros((rows, flame.num_shape), np.float32)
    shape[:, :10] = 2.0 * rng.normal(size=(1, 10)) + 0.5 * np.repeat(
        rng.normal(size=(rows // 2, 10)), 2, axis=0)
    params = flame_jax.FlameParams.zeros(rows, flame).replace(shape=jnp.asarray(shape))
    vertices = np.asarray(flame_jax.forward(flame, params).vertices)
    return {"images": rng.random((rows, size, size, 3), np.float32),
            "backbone_images": rng.uniform(-1, 1, (rows, 112, 112, 3)).astype(np.float32),
            "landmarks": rng.uniform(8, size - 8, (rows, 68, 2)).astype(np.float32),
            "landmark_weights": np.ones((rows, 68), np.float32),
            "skin_masks": np.ones((rows, size, size), np.float32),
            "vertices": vertices.astype(np.float32),
            "posed_vertices": vertices.astype(np.float32),
            "has_3d": np.ones((rows,), np.float32),
            "subject_ids": np.repeat(np.arange(rows // 2, dtype=np.int32), 2)}


def _cheap_step_parts(flame, mesh, size: int = 64, learning_rate: float = 1e-3):
    """(jitted step, initial replicated state, replicated assets) of the tiny regressor."""
    from recon import objective, regressor

    model_options = trainer.ModelOptions(stages=(1, 1, 1, 1), width=8, embedding_size=64,
                                         head_hidden_size=32, head_num_hidden=1)
    optim = trainer.OptimOptions(learning_rate=learning_rate)
    model, _ = trainer.build_model(model_options)
    optimizer_fn = lambda params: trainer.make_optimizer(params, model_options, optim, 10)  # noqa
    state = trainer.create_state(model, None, optimizer_fn, seed=0)
    labels = regressor.trainable_labels(state.params,
                                        trainable_prefixes=trainer.trainable_prefixes(
                                            model_options))
    weights = objective.LossWeights(photometric=0.0, identity=0.0, id_3d=0.0)
    options = trainer.StepOptions(weights=weights, images_per_subject=2, image_size=(size, size))
    step = trainer.make_train_step(model, optimizer_fn(state.params), options, labels)
    assets = objective.make_assets(flame)
    return step, state, assets


def test_kabsch_matches_scipy_and_removes_a_rigid_motion():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(3, 50, 3)).astype(np.float32)
    rotations = Rotation.random(3, random_state=1)
    source = np.einsum("bij,bnj->bni", rotations.inv().as_matrix(), target) + rng.normal(
        size=(3, 1, 3))
    source = (source + rng.normal(0, 0.01, source.shape)).astype(np.float32)
    rotation, _ = jax.jit(evaluation.kabsch)(jnp.asarray(source), jnp.asarray(target))
    for b in range(3):
        expected, _ = Rotation.align_vectors(target[b] - target[b].mean(0),
                                             source[b] - source[b].mean(0))
        np.testing.assert_allclose(np.asarray(rotation[b]), expected.as_matrix(), atol=1e-4)
    # An exact rigid copy aligns to zero error; a scaled copy keeps its scale error.
    exact = np.einsum("bij,bnj->bni", rotations.as_matrix(), target) + 0.3
    assert float(jnp.max(evaluation.vertex_error_mm(jnp.asarray(exact, jnp.float32),
                                                    jnp.asarray(target)))) < 1e-2
    similar = 1.3 * exact
    assert float(jnp.max(evaluation.vertex_error_mm(jnp.asarray(similar, jnp.float32),
                                                    jnp.asarray(target), with_scale=True))) < 1e-2
    scaled = evaluation.vertex_error_mm(jnp.asarray(1.1 * target), jnp.asarray(target))
    expected = 1000 * 0.1 * np.linalg.norm(target - target.mean(1, keepdims=True), axis=-1).mean(1)
    np.testing.assert_allclose(np.asarray(scaled), expected, rtol=1e-4)


def test_smoke_run_end_to_end_with_every_loss(tmp_path, cache_dir, capsys):
    """configs/default.py:smoke through train_and_evaluate: CoMA trained and cached, all
    default losses, metrics, PNGs, checkpoint, evaluation, predictor."""
    config = _load_config("default")
    config.cache_dir = cache_dir
    workdir = tmp_path / "run"
    result = trainer.train_and_evaluate(config, workdir)

    records = _read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for name in ("loss", "vertex_mm", "id_3d", "landmark_ndc", "photometric_l1",
                 "consistency/loss", "steps_per_s", "data_wait_s", "data_wait_fraction"):
        assert all(np.isfinite(r[name]) for r in records), name
    assert 0 <= records[-1]["data_wait_fraction"] <= 1
    stored = json.loads((workdir / "evaluation.json").read_text())
    assert stored == pytest.approx(result)
    assert result["wall_time_s"] > 0
    assert result["num_examples"] == config.data.num_eval_subjects * 2
    assert result["vertex_error_mm"] > 0 and result["mean_face_vertex_error_mm"] > 0
    assert "id_3d" in result and "photometric_l1" in result
    assert (workdir / "images" / "train_000002.png").is_file()
    assert (workdir / "images" / "eval_000003.png").is_file()
    assert (workdir / "checkpoints" / "3").is_dir()
    assert (workdir / "evaluation.png").stat().st_size > 1000  # the error curves

    # Re-running a finished run returns its stored evaluation; nothing is recomputed.
    assert trainer.train_and_evaluate(config, workdir) == stored
    assert json.loads((workdir / "evaluation.json").read_text()) == stored

    # The CoMA encoder is now cached for this config and hierarchy.
    capsys.readouterr()
    trainer.ensure_coma_encoder(config.coma, cache_dir=cache_dir)
    assert "cached in" in capsys.readouterr().out

    predictor = trainer.load_predictor(workdir)
    assert predictor.step == 3
    images = np.random.default_rng(0).random((2, 224, 224, 3), np.float32)
    code = predictor(images)
    assert code.shape.shape == (2, 300) and code.camera.shape == (2, 3)
    vertices, landmarks7 = predictor.mesh(code)
    assert vertices.shape == (2, 5023, 3) and landmarks7.shape == (2, 7, 3)
    with pytest.raises(ValueError, match="224, 224, 3"):
        predictor(images[:, :112])


def test_load_predictor_without_checkpoint_names_the_workdir(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no regressor checkpoint"):
        trainer.load_predictor(tmp_path)


def test_step_traces_once_and_fits_a_batch(synthetic_model):
    mesh = sharding.make_mesh(jax.devices()[:1])
    step, state, assets = _cheap_step_parts(synthetic_model, mesh, learning_rate=1e-2)
    step = trainer.jit_train_step(chex.assert_max_traces(step, n=1), mesh)
    state, assets = sharding.replicate(state, mesh), sharding.replicate(assets, mesh)
    batch = sharding.shard_batch(trainer._to_batch(_random_batch(synthetic_model)), mesh)
    first_params = jax.device_get(state.params)
    losses = []
    for _ in range(10):
        state, metrics = step(state, assets, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 10 and int(state.first_nonfinite_step) == -1
    assert losses[-1] < 0.7 * losses[0], losses
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), first_params,
                         jax.device_get(state.params))
    assert max(jax.tree.leaves(moved)) > 0


def test_eight_devices_give_the_same_losses_and_update_as_one(run_with_cpu_devices):
    code = """
import json, jax, numpy as np
import flame_jax
from recon import trainer
from recon.training import sharding
import tests.test_trainer as t

assert len(jax.devices()) == 8
flame = flame_jax.synthetic()
host = t._random_batch(flame, rows=8)
results = []
for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    step, state, assets = t._cheap_step_parts(flame, mesh)
    step = trainer.jit_train_step(step, mesh)
    state, assets = sharding.replicate(state, mesh), sharding.replicate(assets, mesh)
    batch = sharding.shard_batch(trainer._to_batch(host), mesh)
    assert len(batch.images.sharding.device_set) == len(devices)
    losses = []
    for _ in range(2):
        state, metrics = step(state, assets, batch)
        losses.append(jax.device_get(metrics))
    results.append((losses, jax.device_get(state.params)))
(losses1, params1), (losses8, params8) = results
worst_loss = max(float(abs(a[k] - b[k]) / max(abs(a[k]), 1e-6))
                 for a, b in zip(losses1, losses8) for k in a)
worst_param = max(float(np.max(np.abs(a - b))) for a, b in
                  zip(jax.tree.leaves(params1), jax.tree.leaves(params8)))
update = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(params1))
print(json.dumps({"loss_rel": worst_loss, "param_abs": worst_param, "param_max": update}))
"""
    out = json.loads(run_with_cpu_devices(code, num_devices=8, timeout=900).strip().splitlines()[-1])
    # Every loss term and the gradient norm (in the metrics) agree to float precision.
    assert out["loss_rel"] < 1e-4, out
    # Parameters after two AdamW steps of lr 1e-3: Adam divides each gradient by its own RMS,
    # so components with near-zero gradients (whose sums run in another order on 8 devices)
    # can move by a good part of lr; we allow 10 % of one step.
    assert out["param_abs"] < 1e-4, out


class _StopAfter:
    """Wraps a grain iterator; raises KeyboardInterrupt (a kill) when batch `stop` is asked."""

    def __init__(self, iterator, stop: int):
        self.iterator, self.stop, self.count = iterator, stop, 0

    def __next__(self):
        self.count += 1
        if self.count == self.stop:
            raise KeyboardInterrupt("simulated kill")
        return next(self.iterator)

    def get_state(self):
        return self.iterator.get_state()

    def set_state(self, state):
        self.iterator.set_state(state)


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, cache_dir, monkeypatch):
    config = _cheap_config(cache_dir, steps=4, checkpoint_every=2, log_every=1)
    whole = tmp_path / "whole"
    trainer.train_and_evaluate(config, whole)

    resumed = tmp_path / "resumed"
    make_loader = trainer.make_train_loader
    monkeypatch.setattr(trainer, "make_train_loader",
                        lambda *a, **k: _StopAfter(make_loader(*a, **k), stop=4))
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(config, resumed)  # killed while fetching batch 4
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["2"]
    monkeypatch.setattr(trainer, "make_train_loader", make_loader)
    final = trainer.train_and_evaluate(config, resumed)

    expected = json.loads((whole / "evaluation.json").read_text())
    for summary in (final, expected):
        summary.pop("wall_time_s")
    assert final == pytest.approx(expected, rel=1e-5)
    losses = lambda path: [(r["step"], r["loss"], r["vertex_mm"]) for r in _read_metrics(path)]  # noqa
    assert [s for s, *_ in losses(resumed)] == [1, 2, 3, 4]
    np.testing.assert_allclose(np.asarray(losses(resumed)), np.asarray(losses(whole)), rtol=1e-5)
    a = trainer.load_predictor(whole).variables
    b = trainer.load_predictor(resumed).variables
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)

    # Another config in the same workdir is refused, naming the key.
    other = _cheap_config(cache_dir, steps=4, checkpoint_every=2, log_every=1)
    other.optim.learning_rate = 1e-2
    with pytest.raises(ValueError, match="optim.learning_rate"):
        trainer.train_and_evaluate(other, resumed)


def test_a_nan_batch_stops_the_run_naming_the_step(tmp_path, cache_dir, monkeypatch):
    config = _cheap_config(cache_dir, steps=4, checkpoint_every=1, log_every=2)
    make_loader = trainer.make_train_loader

    class Poisoned(_StopAfter):
        def __next__(self):
            self.count += 1
            batch = next(self.iterator)
            if self.count == 2:
                batch = dict(batch, backbone_images=np.full_like(batch["backbone_images"],
                                                                 np.nan))
            return batch

    monkeypatch.setattr(trainer, "make_train_loader",
                        lambda *a, **k: Poisoned(make_loader(*a, **k), stop=0))
    with pytest.raises(FloatingPointError, match="step 2"):
        trainer.train_and_evaluate(config, tmp_path)
    # The last good checkpoint (step 1) is kept; nothing after the bad step was written.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_paper_config_names_every_missing_file(tmp_path):
    config = _load_config("paper", "")
    with pytest.raises(FileNotFoundError) as error:
        trainer.train_and_evaluate(config, tmp_path)
    for key in ("model.arcface_path", "recognition_arcface_path", "data.root", "data.names",
                "flame.path"):
        assert key in str(error.value)
    config.model.arcface_path = str(tmp_path / "missing.onnx")  # the reference follows it
    with pytest.raises(FileNotFoundError, match="missing.onnx' does not exist"):
        trainer.check_inputs(config)
    assert config.recognition_arcface_path == config.model.arcface_path


def test_unknown_config_keys_are_refused(tmp_path):
    config = _cheap_config(str(tmp_path))
    config.loss.no_such_term = 1.0
    with pytest.raises(ValueError, match="loss.no_such_term"):
        trainer.train_and_evaluate(config, tmp_path / "run")


def test_scene_options_reach_the_synthetic_config_and_the_pool_key():
    from recon.data import augment, synthetic

    default = _load_config("default", "")
    options = trainer._read_options(default)["data"]
    config = trainer.synthetic_config(options)
    assert (config.shape_std, config.max_yaw_deg, config.perspective_probability) == (2.0, 15.0, 0.0)
    assert config.augment == augment.AugmentConfig.clean()
    # An empty scene keeps SyntheticConfig's wide defaults (the paper config's held-out data).
    wide = trainer.synthetic_config(trainer.DataOptions(image_size=64))
    assert wide == synthetic.SyntheticConfig(image_size=64)
    assert repr(config) != repr(wide)  # the pool cache key holds repr(config)
    with pytest.raises(ValueError, match="degradations"):
        trainer.SceneOptions(degradations="none")
