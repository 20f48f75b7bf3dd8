"""End-to-end smoke training, frozen-encoder loading and its errors, mesh folder loading, PCA."""

import importlib.util
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

import spectral_gcn
from spectral_gcn import checkpoint, data, mesh
from spectral_gcn import train as train_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config(arg="smoke"):
    spec = importlib.util.spec_from_file_location("coma_config", REPO / "configs" / "coma.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("coma_smoke")
    config = _config()
    config.cache_dir = str(tmp_path_factory.mktemp("cache"))
    evaluation = train_lib.train_and_evaluate(config, workdir)
    return workdir, config, evaluation


def test_smoke_training_writes_metrics_and_checkpoint(trained):
    workdir, config, evaluation = trained
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "loss" in line]
    assert steps == list(range(1, config.steps + 1))
    assert all(np.isfinite(line["loss"]) for line in lines if "loss" in line)
    assert (workdir / "checkpoints" / str(config.steps)).is_dir()
    for key in ("autoencoder_error_mm", "pca_error_mm", "mean_mesh_error_mm"):
        assert np.isfinite(evaluation[key]) and evaluation[key] > 0
    assert json.loads((workdir / "evaluation.json").read_text()) == evaluation
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        train_lib.train_and_evaluate(config, workdir)


def test_load_encoder_matches_training_model(trained):
    workdir, config, _ = trained
    variables, hierarchy, metadata, model_config = checkpoint.load_checkpoint(
        workdir / "checkpoints")
    assert metadata["hierarchy_key"] == hierarchy.key
    frozen = spectral_gcn.load_encoder(workdir / "checkpoints",
                                       expected_hierarchy=spectral_gcn.flame_hierarchy(
                                           cache_dir=config.cache_dir))
    # the stored statistics are the training meshes' mean/std, not the init values
    assert float(jnp.abs(frozen.variables["stats"]["mean"]).max()) > 0.05
    model = spectral_gcn.AutoEncoder(model_config)
    vertices = jnp.asarray(data.synthetic_meshes(__import__("flame_jax").synthetic(), 2, seed=7))
    expected = model.apply(variables, vertices, hierarchy, method=model.encode)

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


def test_missing_and_mismatched_checkpoints_raise(trained, tmp_path):
    workdir, config, _ = trained
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
    step_dir = tampered / str(config.steps) / "metadata"
    metadata_file = next(p for p in step_dir.rglob("*") if p.is_file() and p.name == "metadata")
    content = json.loads(metadata_file.read_text())
    content["model"]["latent_size"] = 16
    metadata_file.write_text(json.dumps(content))
    with pytest.raises(checkpoint.CheckpointError, match="do not match the model config"):
        spectral_gcn.load_encoder(tampered)


def test_train_cli_dispatch(tmp_path, trained):
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    config = cli.load_config(str(REPO / "configs" / "coma.py") + ":smoke")
    assert config.task == "coma" and config.steps == _config().steps
    cli.apply_override(config, "data.num_train=32")
    cli.apply_override(config, "data.source=folder")
    assert config.data.num_train == 32 and config.data.source == "folder"
    with pytest.raises(KeyError, match="no entry"):
        cli.apply_override(config, "data.nonexistent=1")
    assert cli.default_workdir("configs/coma.py:smoke") == pathlib.Path("runs/coma_smoke")
    with pytest.raises(ValueError, match="unknown argument"):
        cli.load_config(str(REPO / "configs" / "coma.py") + ":nope")


def test_mesh_folder_loader(tmp_path):
    vertices, faces = mesh.flame_topology()
    rng = np.random.default_rng(0)
    meshes = vertices[None] + 0.001 * rng.normal(size=(3, *vertices.shape)).astype(np.float32)
    folder = tmp_path / "registrations"
    (folder / "actor").mkdir(parents=True)
    # obj with texture indices and a quad-free face list, as registration tools write them
    with open(folder / "actor" / "a.obj", "w") as stream:
        stream.write("# registration\n")
        stream.writelines(f"v {x:.8f} {y:.8f} {z:.8f}\n" for x, y, z in meshes[0])
        stream.writelines(f"vt 0.5 0.5\n" for _ in range(3))
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
    with pytest.raises(ValueError, match=r"e\.obj:1: cannot parse"):
        data.load_mesh_folder(folder, 5023, faces)
    with pytest.raises(FileNotFoundError):
        data.load_mesh_folder(tmp_path / "missing", 5023)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no"):
        data.load_mesh_folder(tmp_path / "empty", 5023)


def test_pca_against_exact_subspace():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.normal(size=(30, 4)))[0].T  # 4 orthonormal directions in R^30
    train = (rng.normal(size=(50, 4)) * [5, 4, 3, 2]) @ basis + 1.0
    mean, components = train_lib.pca_fit(train.reshape(50, 10, 3), 4)
    test = (rng.normal(size=(5, 4)) @ basis + 1.0).reshape(5, 10, 3)
    np.testing.assert_allclose(train_lib.pca_reconstruct(test, mean, components), test, atol=1e-9)
    mean2, components2 = train_lib.pca_fit(train.reshape(50, 10, 3), 2)
    residual = test - train_lib.pca_reconstruct(test, mean2, components2)
    assert np.abs(residual).max() > 1e-3


def test_losses_per_example():
    prediction = jnp.zeros((2, 4, 3))
    target = jnp.ones((2, 4, 3)).at[1].set(2.0)
    std = jnp.full((4, 3), 0.5)
    np.testing.assert_allclose(train_lib.l1_normalized(prediction, target, std), [2.0, 4.0])
    np.testing.assert_allclose(train_lib.vertex_error_mm(prediction, target),
                               [1000 * np.sqrt(3), 2000 * np.sqrt(3)], rtol=1e-6)
    with pytest.raises(ValueError, match="differ"):
        train_lib.l1_normalized(prediction, target[:, :3], std)
