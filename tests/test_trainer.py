"""The regressor's trainer (`recon.training.regressor`): the default path end to end (dlib
backbone, cached trunk, every loss), the predictor equal to the evaluation step on a held-out
crop, run state (a refused rerun leaves the workdir loadable), a single trace, 1/2/4/8 devices,
exact resume after a kill, a NaN batch named, the configs.

Most tests use a cheap variant of the smoke config (a width-8 IResNet, no rendered or 3D-ID
terms) that compiles in seconds; the end-to-end test runs the default's own architecture and
every loss.
"""

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from recon import evaluation, inference
from recon.data import sources
from recon.model import build
from recon.options import load_config_file
from recon.training import sharding
from recon.training.regressor import loop, options as options_lib, step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load_config(name: str, arg: str = "smoke") -> ml_collections.ConfigDict:
    return load_config_file(REPO / "configs" / f"{name}.py", arg)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("facerecon_cache"))


def _set(config, key: str, value) -> None:
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
        node = node[parent]
    node[leaf] = value


def cheap_config(cache_dir: str, **overrides) -> ml_collections.ConfigDict:
    """The smoke config on a width-8 IResNet without rendered, identity or 3D-ID terms (fast
    to compile), no PNGs."""
    config = _load_config("default")
    config.cache_dir = cache_dir
    config.model.backbone = "iresnet"
    config.model.dlib_output = "descriptor"
    config.model.width = 8
    config.model.embedding_size = 64
    config.model.trainable = "all"
    config.model.batch_norm = "batch"
    config.model.trunk_cache = False
    config.recognition.network = "none"
    config.loss.photometric = 0.0
    config.loss.identity = 0.0
    config.loss.id_3d = 0.0
    config.image_every = 0
    for key, value in overrides.items():
        _set(config, key, value)
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
            "backbone_inputs": rng.uniform(-1, 1, (rows, 112, 112, 3)).astype(np.float32),
            "landmarks": rng.uniform(8, size - 8, (rows, 68, 2)).astype(np.float32),
            "landmark_weights": np.ones((rows, 68), np.float32),
            "skin_masks": np.ones((rows, size, size), np.float32),
            "vertices": vertices.astype(np.float32),
            "has_3d": np.ones((rows,), np.float32),
            "subject_ids": np.repeat(np.arange(rows // 2, dtype=np.int32), 2)}


def cheap_step_parts(flame, size: int = 64, learning_rate: float = 1e-3):
    """(train step, initial state, assets) of the tiny regressor (host arrays)."""
    from recon import objective

    model_options = build.ModelOptions(width=8, embedding_size=64, head_hidden_size=32,
                                       head_num_hidden=1, batch_norm="batch")
    model, _ = build.build_model(model_options, camera=(8.0, 0.0, 0.0))
    variables = build.init_variables(model, None, 0, model_options)
    labels = build.trainable_labels(variables["params"], model_options)
    optimizer = step_lib.make_optimizer(
        labels, options_lib.OptimOptions(learning_rate=learning_rate), 10)
    state = step_lib.create_state(variables, optimizer)
    weights = objective.LossWeights(photometric=0.0, identity=0.0, id_3d=0.0)
    options = step_lib.StepOptions(weights=weights, images_per_subject=2,
                                   image_size=(size, size))
    step = step_lib.make_train_step(model, optimizer, options, labels)
    return step, state, objective.make_assets(flame)


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


def test_face_region_error_only_sees_the_face(synthetic_model):
    from recon.training.regressor import evaluation as regressor_evaluation

    template = np.asarray(synthetic_model.v_template)[None]
    face = np.asarray(synthetic_model.vertex_mask("face"))
    moved = template.copy()
    moved[0, ~face] += 0.01  # the rest of the head 10 mm off: the face error does not see it
    errors = regressor_evaluation.mesh_errors(jnp.asarray(moved), jnp.asarray(template),
                                              jnp.asarray(np.flatnonzero(face), jnp.int32))
    assert float(errors["face_vertex_error_mm"][0]) < 1e-3
    assert float(errors["vertex_error_mm"][0]) > 1.0


def test_default_path_end_to_end_and_predictor_equals_the_evaluation(tmp_path, cache_dir,
                                                                      capsys):
    """configs/default.py:smoke through train_and_evaluate: the dlib backbone with its cached
    trunk, the CoMA encoder trained and cached, every default loss, metrics, PNGs, checkpoint,
    evaluation with the face-region errors; then the predictor on held-out crops equals the
    evaluation step's code on the same examples."""
    config = _load_config("default")
    config.cache_dir = cache_dir
    workdir = tmp_path / "run"
    result = loop.train_and_evaluate(config, workdir)

    records = _read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for name in ("loss", "vertex_mm", "id_3d", "landmark_ndc", "photometric_l1",
                 "identity_1_minus_cos", "consistency/loss", "steps_per_s", "data_wait_s",
                 "data_wait_fraction"):
        assert all(np.isfinite(r[name]) for r in records), name
    assert all(r["identity_1_minus_cos"] > 0 for r in records)
    stored = json.loads((workdir / "evaluation.json").read_text())
    assert stored == pytest.approx(result)
    assert result["num_examples"] == config.data.num_eval_subjects * 2
    for name in ("vertex_error_mm", "face_vertex_error_mm", "scaled_vertex_error_mm"):
        assert result[name] > 0 and result[f"mean_face_{name}"] > 0, name
    assert (workdir / "images" / "eval_000003.png").is_file()
    assert (workdir / "checkpoints" / "3").is_dir()
    assert (workdir / "evaluation.png").stat().st_size > 1000
    assert json.loads((workdir / "config.json").read_text())["data"]["crop"]["anchor"] == \
        "dlib_five_points"

    # Re-running a finished run returns its stored evaluation; nothing is recomputed.
    assert loop.train_and_evaluate(config, workdir) == stored

    # The predictor: the crop spec and the architecture come from the checkpoint.
    predictor = inference.load_predictor(workdir)
    assert predictor.step == 3 and predictor.crop.anchor == "dlib_five_points"
    assert predictor.crop.size == 150 and predictor.input_kind == "dlib"
    with pytest.raises(ValueError, match="150, 150, 3"):
        predictor(np.zeros((1, 224, 224, 3), np.float32))

    # Predictor(crop) equals the evaluation step on the same held-out examples.
    options = options_lib.read_options(config)
    flame = build.load_flame(options.flame)
    held_out = sources.eval_pool(flame, options.data, backbone_kind="dlib", cache_dir=cache_dir)
    crops = held_out.crops(0)
    record = held_out[0]
    code = predictor(crops)
    model, _ = build.build_model(options.model, camera=(1.0, 0.0, 0.0), load_weights=False)
    vector = jax.jit(lambda v, x: model.apply(v, x))(predictor.variables,
                                                     jnp.asarray(record["backbone_inputs"]))
    np.testing.assert_allclose(np.asarray(code.to_vector()), np.asarray(vector), rtol=1e-4,
                               atol=1e-4)
    vertices, landmarks7 = predictor.mesh(code)
    assert vertices.shape == (2, 5023, 3) and landmarks7.shape == (2, 7, 3)


def test_refused_rerun_leaves_config_and_predictor_working(tmp_path, cache_dir):
    config = cheap_config(cache_dir, steps=2, checkpoint_every=2, log_every=1)
    workdir = tmp_path / "run"
    loop.train_and_evaluate(config, workdir)
    before = (workdir / "config.json").read_text()
    other = cheap_config(cache_dir, steps=2, checkpoint_every=2, log_every=1)
    other.optim.learning_rate = 5e-3
    other.data.crop.padding = 0.3
    with pytest.raises(ValueError, match="optim.learning_rate") as error:
        loop.train_and_evaluate(other, workdir)
    assert "data.crop.padding" in str(error.value)
    assert (workdir / "config.json").read_text() == before
    predictor = inference.load_predictor(workdir)
    assert predictor.crop.padding == 0.25 and predictor.step == 2
    # The predictor reads the checkpoint's config, not config.json.
    (workdir / "config.json").write_text("{}")
    assert inference.load_predictor(workdir).crop.padding == 0.25


def test_load_predictor_errors_name_the_workdir(tmp_path):
    with pytest.raises(inference.PredictorLoadError, match="holds no regressor checkpoint"):
        inference.load_predictor(tmp_path)


def test_step_traces_once_and_fits_a_batch(synthetic_model):
    mesh = sharding.make_mesh(jax.devices()[:1])
    step, state, assets = cheap_step_parts(synthetic_model, learning_rate=1e-2)
    step = step_lib.jit_train_step(chex.assert_max_traces(step, n=1), mesh)
    state, assets = sharding.replicate(state, mesh), sharding.replicate(assets, mesh)
    batch = sharding.shard_batch(step_lib.to_batch(_random_batch(synthetic_model)), mesh)
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


def test_smoke_runs_on_2_4_8_devices_with_the_one_device_losses(run_with_cpu_devices, tmp_path,
                                                                cache_dir):
    """The smoke config's batch of 8 on 1, 2, 4 and 8 devices: same data order, same losses."""
    code = f"""
import json, jax, pathlib
import tests.test_trainer as t
from recon.training import sharding
from recon.training.regressor import loop

assert len(jax.devices()) == 8
make_mesh = sharding.make_mesh
out = {{}}
for count in (1, 2, 4, 8):
    sharding.make_mesh = lambda devices=None, count=count: make_mesh(jax.devices()[:count])
    config = t.cheap_config({cache_dir!r}, steps=2, checkpoint_every=2, log_every=1)
    workdir = pathlib.Path({str(tmp_path)!r}) / f"devices_{{count}}"
    loop.train_and_evaluate(config, workdir)
    out[count] = t._read_metrics(workdir)
print(json.dumps(out))
"""
    out = json.loads(run_with_cpu_devices(code, num_devices=8, timeout=900).strip().splitlines()[-1])
    one = out["1"]
    for count in ("2", "4", "8"):
        for a, b in zip(one, out[count]):
            for key in ("loss", "vertex_mm", "landmark_ndc", "grad_norm"):
                assert abs(a[key] - b[key]) <= 1e-5 * max(abs(a[key]), 1.0), (count, key, a, b)


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
    config = cheap_config(cache_dir, steps=4, checkpoint_every=2, log_every=1)
    whole = tmp_path / "whole"
    loop.train_and_evaluate(config, whole)

    resumed = tmp_path / "resumed"
    make_loader = sources.make_train_loader
    monkeypatch.setattr(sources, "make_train_loader",
                        lambda *a, **k: _StopAfter(make_loader(*a, **k), stop=4))
    with pytest.raises(KeyboardInterrupt):
        loop.train_and_evaluate(config, resumed)  # killed while fetching batch 4
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["2"]
    monkeypatch.setattr(sources, "make_train_loader", make_loader)
    final = loop.train_and_evaluate(config, resumed)

    expected = json.loads((whole / "evaluation.json").read_text())
    for summary in (final, expected):
        summary.pop("wall_time_s")
    assert final == pytest.approx(expected, rel=1e-5)
    losses = lambda path: [(r["step"], r["loss"], r["vertex_mm"]) for r in _read_metrics(path)]  # noqa
    assert [s for s, *_ in losses(resumed)] == [1, 2, 3, 4]
    np.testing.assert_allclose(np.asarray(losses(resumed)), np.asarray(losses(whole)), rtol=1e-5)
    a = inference.load_predictor(whole).variables
    b = inference.load_predictor(resumed).variables
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), a, b)


def test_a_nan_batch_stops_the_run_naming_the_step(tmp_path, cache_dir, monkeypatch):
    config = cheap_config(cache_dir, steps=4, checkpoint_every=1, log_every=2)
    make_loader = sources.make_train_loader

    class Poisoned(_StopAfter):
        def __next__(self):
            self.count += 1
            batch = next(self.iterator)
            if self.count == 2:
                batch = dict(batch, backbone_inputs=np.full_like(batch["backbone_inputs"],
                                                                 np.nan))
            return batch

    monkeypatch.setattr(sources, "make_train_loader",
                        lambda *a, **k: Poisoned(make_loader(*a, **k), stop=0))
    with pytest.raises(FloatingPointError, match="step 2"):
        loop.train_and_evaluate(config, tmp_path)
    # The last good checkpoint (step 1) is kept; nothing after the bad step was written.
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1"]


def test_paper_config_names_every_missing_file(tmp_path):
    config = _load_config("paper", "")
    with pytest.raises(FileNotFoundError) as error:
        loop.train_and_evaluate(config, tmp_path)
    for key in ("model.arcface_path", "recognition.path", "data.root", "data.names",
                "flame.path"):
        assert key in str(error.value)
    config.model.arcface_path = str(tmp_path / "missing.onnx")  # the reference follows it
    assert config.recognition.path == config.model.arcface_path
    with pytest.raises(FileNotFoundError, match="missing.onnx' does not exist"):
        options_lib.check_inputs(options_lib.read_options(config))


def test_unknown_and_inconsistent_options_are_refused(tmp_path):
    config = cheap_config(str(tmp_path))
    config.loss.no_such_term = 1.0
    with pytest.raises(ValueError, match="loss.no_such_term"):
        loop.train_and_evaluate(config, tmp_path / "run")
    config = cheap_config(str(tmp_path))
    config.model.trunk_cache = True
    with pytest.raises(ValueError, match="trunk_cache"):
        options_lib.read_options(config)
    config = cheap_config(str(tmp_path))
    config.loss.identity = 0.2
    with pytest.raises(ValueError, match="recognition"):
        options_lib.read_options(config)


def test_scene_and_crop_options_reach_the_synthetic_config():
    from recon.data import augment, synthetic

    default = _load_config("default", "")
    data = options_lib.read_options(default).data
    config = sources.synthetic_config(data)
    assert (config.shape_std, config.max_yaw_deg, config.perspective_probability) == (2.0, 15.0, 0.0)
    assert config.augment == augment.AugmentConfig.clean()
    assert config.crop == data.crop and config.loss_size == 64
    assert config.landmark_noise == data.scene.landmark_noise
    wide = sources.synthetic_config(sources.DataOptions(image_size=64))
    assert wide == synthetic.SyntheticConfig(image_size=64)
    assert repr(config) != repr(wide)  # the pool cache key holds repr(config)
    with pytest.raises(ValueError, match="degradations"):
        sources.SceneOptions(degradations="none")
    # configs/default.py:wide: the default with NoW-wide scenes and box-only crops on 15 % of
    # the images, everything else equal.
    wide_run = _load_config("default", "wide")
    wide_config = sources.synthetic_config(options_lib.read_options(wide_run).data)
    assert (wide_config.max_yaw_deg, wide_config.expression_std,
            wide_config.perspective_probability,
            wide_config.fallback_crop_probability) == (40.0, 1.0, 0.3, 0.15)
    assert wide_config.augment == augment.AugmentConfig.clean()
    assert sources.synthetic_config(options_lib.read_options(default).data
                                    ).fallback_crop_probability == 0.0
    assert wide_run.steps == 400 and wide_run.coma == default.coma
    assert wide_run.model == default.model and wide_run.loss == default.loss
    with pytest.raises(ValueError, match="unknown argument"):
        _load_config("default", "narrow")
