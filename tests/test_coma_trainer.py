"""recon.training.coma: a run killed (SIGKILL) after its first checkpoint and resumed with the same
command equals an uninterrupted run; a different config is refused naming the keys; the CLI;
the step overfits a handful of meshes; the frozen encoder is read back from the run's
checkpoints; the mesh folder reader, PCA and the losses against closed forms."""

import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

import flame_jax
import spectral_gcn
from recon.options import load_config_file
from recon.training import coma as coma_trainer
from recon.training import checkpoints, guard, metrics as metrics_lib, sharding
from spectral_gcn import checkpoint, data, mesh

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 5  # checkpoints at step 2 and 4 (smoke: checkpoint_every=2), and the final step 5


def _config(cache_dir, arg="smoke"):
    config = load_config_file(REPO / "configs" / "coma.py", arg)
    config.steps = STEPS
    config.cache_dir = str(cache_dir)
    return config


def _child_env(compile_cache):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(compile_cache))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "")
                                                       .split(os.pathsep) if p])
    return env


# The child runs train.py's main exactly as `python train.py ...` does, except that the process
# kills itself with SIGKILL (no cleanup, no finally blocks) once its first checkpoint is committed.
KILL_AFTER_FIRST_CHECKPOINT = """
    import os, runpy, signal, sys
    from recon.training import checkpoints

    original_save = checkpoints.RunCheckpointer.save

    def save_then_die(self, step, *args, **kwargs):
        original_save(self, step, *args, **kwargs)
        self.wait()
        print(f"killed after checkpoint {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.RunCheckpointer.save = save_then_die
    sys.argv = ["train.py"] + sys.argv[1:]
    runpy.run_path("train.py", run_name="__main__")
"""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(uninterrupted workdir, killed-and-resumed workdir, config, their evaluations)."""
    root = tmp_path_factory.mktemp("coma_runs")
    cache, compile_cache = root / "cache", root / "xla_cache"
    config = _config(cache)
    spectral_gcn.flame_hierarchy(tuple(config.factors), cache_dir=cache)  # built once, shared
    command = ["--config", "configs/coma.py:smoke", f"--config.steps={STEPS}",
               f"--config.cache_dir={cache}", "--workdir", str(root / "resumed")]
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILL_AFTER_FIRST_CHECKPOINT)]
                            + command, cwd=REPO, env=_child_env(compile_cache),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "killed after checkpoint 2" in killed.stdout
    assert sorted(p.name for p in (root / "resumed" / "checkpoints").iterdir()
                  if p.name.isdigit()) == ["2"]
    assert not (root / "resumed" / "evaluation.json").exists()
    # The same command again, as a user would type it: it resumes from step 2.
    resumed = subprocess.run([sys.executable, "train.py"] + command, cwd=REPO,
                             env=_child_env(compile_cache), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from step 2" in resumed.stdout
    uninterrupted = coma_trainer.train_and_evaluate(config, root / "uninterrupted")
    resumed_evaluation = json.loads((root / "resumed" / "evaluation.json").read_text())
    return root / "uninterrupted", root / "resumed", config, uninterrupted, resumed_evaluation


def test_killed_and_resumed_run_equals_uninterrupted(runs):
    uninterrupted, resumed, config, evaluation, resumed_evaluation = runs
    assert resumed_evaluation["resumed_from_step"] == 2 and evaluation["resumed_from_step"] == 0
    for key in ("autoencoder_error_mm", "pca_error_mm", "mean_mesh_error_mm"):
        np.testing.assert_allclose(resumed_evaluation[key], evaluation[key], rtol=1e-6)
    records = {}
    for name, workdir in (("a", uninterrupted), ("b", resumed)):
        records[name] = [r for r in metrics_lib.read_metrics(workdir / "metrics.jsonl")
                         if "loss" in r]
    # every step logged once (the resumed run dropped nothing and repeated nothing)
    assert [r["step"] for r in records["b"]] == list(range(1, STEPS + 1))
    for a, b in zip(records["a"], records["b"]):
        for key in ("loss", "error_mm", "grad_norm"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-6, err_msg=f"{key} step {a['step']}")
    variables_a, _, _, _ = checkpoint.load_checkpoint(uninterrupted / "checkpoints")
    variables_b, _, _, _ = checkpoint.load_checkpoint(resumed / "checkpoints")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 variables_a, variables_b)
    # the parameters did move (the comparison above is not between two initialisations)
    first = checkpoint.load_checkpoint(uninterrupted / "checkpoints", step=4)[0]
    assert not np.allclose(first["params"]["decoder"]["conv_out"]["kernel"],
                           variables_a["params"]["decoder"]["conv_out"]["kernel"])
    assert (resumed / "metrics.png").stat().st_size > 1000


def test_finished_run_returns_its_evaluation_and_other_configs_fail(runs):
    uninterrupted, _, config, evaluation, _ = runs
    (uninterrupted / "evaluation.json").unlink()
    assert coma_trainer.train_and_evaluate(config, uninterrupted) == evaluation
    assert json.loads((uninterrupted / "evaluation.json").read_text()) == evaluation
    other = _config(config.cache_dir)
    other.learning_rate = 2e-3
    other.model.filters = (8, 8, 8, 16)
    with pytest.raises(checkpoints.ConfigMismatchError) as error:
        coma_trainer.train_and_evaluate(other, uninterrupted)
    message = str(error.value)
    assert "learning_rate: 0.001 -> 0.002" in message
    assert "model.filters: [8, 8, 8, 8] -> [8, 8, 8, 16]" in message
    unknown = _config(config.cache_dir)
    unknown.data.shape_sd = 1.0
    with pytest.raises(ValueError, match=r"data\.shape_sd"):
        coma_trainer.train_and_evaluate(unknown, uninterrupted.parent / "unused")


def test_nonfinite_batch_is_rejected_and_named(runs):
    """The trainer's own jitted step (same shapes as the run: compiled already) on a batch
    holding one NaN coordinate: the update is rejected, the step named, training goes on."""
    _, _, config, _, _ = runs
    options = coma_trainer.to_dataclass(config, coma_trainer.ComaTrainConfig)
    mesh_ = sharding.make_mesh()
    hierarchy = sharding.replicate(spectral_gcn.flame_hierarchy(
        tuple(config.factors), cache_dir=config.cache_dir), mesh_)
    batch = np.asarray(data.synthetic_meshes(flame_jax.synthetic(), 4, seed=3))
    mean, std = data.normalization_statistics(batch)
    state, train_step, _ = coma_trainer.initial_state(options, hierarchy, mean, std, mesh_)
    state, _ = train_step(state, hierarchy, sharding.shard_batch(batch, mesh_))
    before = jax.tree.map(np.array, state.params)
    poisoned = batch.copy()
    poisoned[1, 7, 2] = np.nan
    state, step_metrics = train_step(state, hierarchy, sharding.shard_batch(poisoned, mesh_))
    assert not np.isfinite(float(step_metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params), before)
    state, _ = train_step(state, hierarchy, sharding.shard_batch(batch, mesh_))
    assert int(state.step) == 3 and guard.first_nonfinite_step(state) == 2
    with pytest.raises(FloatingPointError, match="step 2"):
        guard.raise_if_nonfinite(state)


def test_autoencoder_overfits_a_handful_of_meshes():
    """4 smoothly deformed spheres: 100 Adam steps must cut the loss by >= 5x (a broken
    optimizer, a wrong gradient sign or a step that ignores its update fails this)."""
    icosphere = trimesh.creation.icosphere(subdivisions=3)
    vertices = np.asarray(icosphere.vertices, np.float32) * 0.1
    hierarchy = mesh.build_hierarchy(vertices, np.asarray(icosphere.faces, np.int32),
                                     (4, 4, 4, 4), use_cache=False)
    rng = np.random.default_rng(0)
    meshes = np.stack([vertices + vertices @ (0.02 * rng.normal(size=(3, 3))).T
                       + 0.005 * rng.normal(size=3) for _ in range(4)]).astype(np.float32)
    mean, std = data.normalization_statistics(meshes)
    config = spectral_gcn.CoMAConfig(num_vertices=vertices.shape[0], filters=(8, 8, 8, 8),
                                     order=3, latent_size=8)
    model = spectral_gcn.AutoEncoder(config)
    optimizer = coma_trainer.make_optimizer(learning_rate=1e-2, steps=100, final_lr_fraction=1.0)
    variables = jax.jit(model.init)(jax.random.key(0), jnp.asarray(meshes[:1]), hierarchy)
    state = coma_trainer.TrainState(
        step=jnp.zeros((), jnp.int32), params=variables["params"],
        stats={"encoder": {"mean": jnp.asarray(mean), "std": jnp.asarray(std)}},
        opt_state=optimizer.init(variables["params"]),
        first_nonfinite_step=guard.no_nonfinite_step())
    train_step = jax.jit(coma_trainer.make_train_step(model, optimizer), donate_argnums=(0,))
    losses, errors = [], []
    for _ in range(100):
        state, step_metrics = train_step(state, hierarchy, jnp.asarray(meshes))
        losses.append(float(step_metrics["loss"]))
        errors.append(float(step_metrics["error_mm"]))
    assert losses[-1] <= losses[0] / 5, (losses[0], losses[-1])
    assert errors[-1] <= errors[0] / 4, (errors[0], errors[-1])
    # the reported loss is CoMA's loss of the meshes, recomputed here independently in numpy
    reconstruction = np.asarray(model.apply({"params": state.params, "stats": state.stats},
                                            jnp.asarray(meshes), hierarchy), np.float64)
    np.testing.assert_allclose(np.mean(np.abs(reconstruction - meshes) / std), losses[-1],
                               rtol=0.1)


def test_train_cli_rejects_unknown_keys():
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/coma.py:smoke",
                             "--config.no_such_key=1"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0
    assert "no key 'no_such_key'" in result.stderr and "data.num_train" in result.stderr
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.default_workdir("configs/coma.py:smoke") == pathlib.Path("runs/coma_smoke")
    assert cli.default_workdir("configs/coma.py") == pathlib.Path("runs/coma")
    assert set(cli.TASKS) == {"coma", "regressor"}


def test_load_encoder_matches_training_model(runs):
    workdir, _, config, _, _ = runs
    variables, hierarchy, metadata, model_config = checkpoint.load_checkpoint(
        workdir / "checkpoints")
    assert metadata["hierarchy_key"] == hierarchy.key
    assert model_config == spectral_gcn.CoMAConfig(filters=(8, 8, 8, 8), order=3)
    frozen = spectral_gcn.load_encoder(workdir / "checkpoints",
                                       expected_hierarchy=spectral_gcn.flame_hierarchy(
                                           tuple(config.factors), cache_dir=config.cache_dir))
    # the stored statistics are the training meshes' mean/std, not the init values
    assert float(jnp.abs(frozen.variables["stats"]["mean"]).max()) > 0.05
    model = spectral_gcn.AutoEncoder(model_config)
    vertices = jnp.asarray(data.synthetic_meshes(flame_jax.synthetic(), 2, seed=7))
    expected = jax.jit(lambda v, h, x: model.apply(v, x, h, method=model.encode))(
        variables, hierarchy, vertices)

    @jax.jit
    def loss(encoder_variables, predicted, target):
        frozen_encoder = frozen.replace(variables=encoder_variables)
        difference = (spectral_gcn.encode(frozen_encoder, predicted)
                      - spectral_gcn.encode(frozen_encoder, target))
        return jnp.sum(difference ** 2)

    np.testing.assert_allclose(jax.jit(spectral_gcn.encode)(frozen, vertices), expected,
                               rtol=1e-5, atol=1e-5)
    grads = jax.grad(loss, argnums=(0, 1))(frozen.variables, vertices + 0.001, vertices)
    assert float(jnp.abs(grads[1]).max()) > 0  # flows to the predicted mesh
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads[0]))  # frozen


def test_standalone_encoder_checkpoint_round_trip(runs, tmp_path):
    """spectral_gcn.save_checkpoint (no trainer state) is read back by load_encoder."""
    workdir = runs[0]
    variables, hierarchy, metadata, model_config = checkpoint.load_checkpoint(
        workdir / "checkpoints")
    spectral_gcn.save_checkpoint(tmp_path / "encoder", 7, variables, hierarchy, model_config,
                                 metadata["factors"], {"note": "exported"})
    frozen = spectral_gcn.load_encoder(tmp_path / "encoder", expected_hierarchy=hierarchy,
                                       expected_config=model_config)
    jax.tree.map(np.testing.assert_array_equal, frozen.variables,
                 {"params": variables["params"]["encoder"],
                  "stats": variables["stats"]["encoder"]})
    assert checkpoint.load_checkpoint(tmp_path / "encoder")[2]["note"] == "exported"


def test_missing_and_mismatched_checkpoints_raise(runs, tmp_path):
    workdir = runs[0]
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        spectral_gcn.load_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no CoMA checkpoint steps"):
        spectral_gcn.load_encoder(tmp_path / "empty")
    with pytest.raises(checkpoint.CheckpointError, match="no step 99"):
        spectral_gcn.load_encoder(workdir / "checkpoints", step=99)
    _, hierarchy, _, _ = checkpoint.load_checkpoint(workdir / "checkpoints")
    other = hierarchy.replace(key="0" * 64)  # e.g. another topology or decimation version
    with pytest.raises(checkpoint.CheckpointError, match="was expected"):
        spectral_gcn.load_encoder(workdir / "checkpoints", expected_hierarchy=other)
    with pytest.raises(checkpoint.CheckpointError, match="differs from the expected"):
        spectral_gcn.load_encoder(workdir / "checkpoints",
                                  expected_config=spectral_gcn.CoMAConfig(latent_size=16))
    # a checkpoint whose metadata claims another architecture than its arrays
    tampered = tmp_path / "tampered"
    shutil.copytree(workdir / "checkpoints", tampered)
    step_dir = tampered / str(STEPS) / "metadata"
    metadata_file = next(p for p in step_dir.rglob("*") if p.is_file() and p.name == "metadata")
    content = json.loads(metadata_file.read_text())
    content["model"]["latent_size"] = 16
    metadata_file.write_text(json.dumps(content))
    with pytest.raises(checkpoint.CheckpointError, match="do not match the model config"):
        spectral_gcn.load_encoder(tampered)


def test_mesh_folder_loader(tmp_path):
    vertices, faces = mesh.flame_topology()
    rng = np.random.default_rng(0)
    meshes = vertices[None] + 0.001 * rng.normal(size=(3, *vertices.shape)).astype(np.float32)
    folder = tmp_path / "registrations"
    (folder / "actor").mkdir(parents=True)
    # obj with texture indices, as registration tools write them
    with open(folder / "actor" / "a.obj", "w") as stream:
        stream.write("# registration\n")
        stream.writelines(f"v {x:.8f} {y:.8f} {z:.8f}\n" for x, y, z in meshes[0])
        stream.writelines("vt 0.5 0.5\n" for _ in range(3))
        stream.writelines(f"f {a + 1}/1 {b + 1}/2 {c + 1}/3\n" for a, b, c in faces)
    trimesh.Trimesh(meshes[1], faces, process=False).export(folder / "actor" / "b.ply")
    trimesh.Trimesh(meshes[2], faces, process=False).export(folder / "c.obj")
    loaded, paths = data.load_mesh_folder(folder, 5023, faces)
    assert [p.name for p in paths] == ["a.obj", "b.ply", "c.obj"]
    np.testing.assert_allclose(loaded, meshes, atol=1e-6)
    scaled, _ = data.load_mesh_folder(folder, 5023, faces, scale=1000.0)
    np.testing.assert_allclose(scaled, meshes * 1000, rtol=1e-5, atol=1e-3)

    trimesh.Trimesh(vertices[:100], faces[:10], process=False).export(folder / "d.ply")
    with pytest.raises(ValueError, match=r"d\.ply: 100 vertices, expected 5023"):
        data.load_mesh_folder(folder, 5023, faces)
    (folder / "d.ply").unlink()
    (folder / "e.obj").write_text("v 1 2\n")
    with pytest.raises(ValueError, match=r"e\.obj"):
        data.load_mesh_folder(folder, 5023, faces)
    with pytest.raises(FileNotFoundError):
        data.load_mesh_folder(tmp_path / "missing", 5023)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        data.load_mesh_folder(tmp_path / "empty", 5023)


def test_epoch_sampler_state_round_trip():
    sampler = coma_trainer.EpochSampler(10, 4, seed=3)
    batches = [sampler.next_indices() for _ in range(5)]
    assert all(len(set(b)) == 4 for b in batches)
    assert len(set(np.concatenate(batches[:2]))) == 8  # an epoch never repeats an example
    resumed = coma_trainer.EpochSampler(10, 4, seed=3)
    replay = coma_trainer.EpochSampler(10, 4, seed=3)
    for _ in range(3):
        replay.next_indices()
    resumed.set_state(json.loads(json.dumps(replay.get_state())))
    for expected in batches[3:]:
        np.testing.assert_array_equal(resumed.next_indices(), expected)
    with pytest.raises(ValueError, match="fewer than the batch size"):
        coma_trainer.EpochSampler(3, 4, seed=0)


def test_pca_against_exact_subspace():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(30, 4)))[0].T  # 4 orthonormal directions in R^30
    train = (rng.normal(size=(50, 4)) * [5, 4, 3, 2]) @ basis + 1.0
    mean, components = coma_trainer.pca_fit(train.reshape(50, 10, 3), 4)
    test = (rng.normal(size=(5, 4)) @ basis + 1.0).reshape(5, 10, 3)
    np.testing.assert_allclose(coma_trainer.pca_reconstruct(test, mean, components), test,
                               atol=1e-9)
    mean2, components2 = coma_trainer.pca_fit(train.reshape(50, 10, 3), 2)
    residual = test - coma_trainer.pca_reconstruct(test, mean2, components2)
    assert np.abs(residual).max() > 1e-3


def test_losses_per_example():
    prediction = jnp.zeros((2, 4, 3))
    target = jnp.ones((2, 4, 3)).at[1].set(2.0)
    std = jnp.full((4, 3), 0.5)
    np.testing.assert_allclose(coma_trainer.l1_normalized(prediction, target, std), [2.0, 4.0])
    np.testing.assert_allclose(coma_trainer.vertex_error_mm(prediction, target),
                               [1000 * np.sqrt(3), 2000 * np.sqrt(3)], rtol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        coma_trainer.l1_normalized(prediction, target[:, :3], std)
