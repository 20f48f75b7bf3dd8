"""configs/paper.py end to end on stand-ins for its licensed files (`recon.training.fakes`), and
the CoMA encoder of a MICA-source run belonging to that run's FLAME model.

The smoke run is `python train.py --config configs/paper.py:smoke` in a subprocess (train.py's
`fakes` hook writes the FLAME 2020 pickle, masks, texture, ArcFace ONNX and MICA tree), with
XLA's backend optimisation off: it compiles the paper's step (224 x 224 renders, identity
network, 3D-ID encoder, shape consistency) about twice as fast on a CPU, which is what this test
is about; the numbers it checks do not depend on it.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flame_jax
import spectral_gcn
from recon.data import mica
from recon.model.arcface_import import import_arcface
from recon.options import load_config_file
from recon.training import coma_cache, fakes
from recon.training.regressor import loop

REPO = pathlib.Path(__file__).resolve().parents[1]


def _paper_config(arg: str = "smoke"):
    return load_config_file(REPO / "configs" / "paper.py", arg)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("facerecon_cache"))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, cache_dir):
    """(workdir, fakes paths) of `train.py --config configs/paper.py:smoke`."""
    workdir = tmp_path_factory.mktemp("paper_smoke")
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"])
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "train.py", "--config", "configs/paper.py:smoke", "--workdir",
               str(workdir), f"--config.cache_dir={cache_dir}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return workdir, fakes.make_paper_fakes(workdir / "fakes")  # reads the hook's manifest


def test_paper_smoke_trains_every_term_on_the_fakes(smoke):
    workdir, paths = smoke
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    config = _paper_config()
    assert [line["step"] for line in lines] == list(range(1, config.steps + 1))
    for line in lines:
        bad = {key: value for key, value in line.items()
               if isinstance(value, float) and not math.isfinite(value)}
        assert not bad, (line["step"], bad)
        # The 2D landmark term (landmark files of the MICA tree), the 3D-ID term (CoMA trained
        # on heads of the fake FLAME 2020 file) and the identity term (the ArcFace ONNX) work.
        for key in ("landmark_ndc", "id_3d", "identity_1_minus_cos", "vertex_mm",
                    "photometric_l1"):
            assert line[key] > 0, (line["step"], key, line[key])
    evaluation = json.loads((workdir / "evaluation.json").read_text())
    assert evaluation["step"] == config.steps and math.isfinite(evaluation["vertex_error_mm"])
    stored = json.loads((workdir / "config.json").read_text())
    assert stored["fakes"] == "paper" and stored["data"]["source"] == "mica"
    assert stored["model"]["arcface_path"] == paths["arcface"] == stored["recognition"]["path"]
    assert stored["flame"] == {"path": paths["flame"], "masks": paths["masks"],
                               "texture": paths["texture"]}
    assert stored["data"]["names"] == list(fakes.MICA_NAMES)
    assert stored["model"]["stages"] == [1, 1, 1, 1] and stored["model"]["trainable"] == \
        "last_stage"


def test_rerun_reuses_the_fakes_and_finds_the_run_finished(smoke, cache_dir):
    """What train.py's hook does again, in process: the same fakes, the same config (the run's
    stored one), so the finished run returns its evaluation without training."""
    workdir, _ = smoke
    manifest = workdir / "fakes" / fakes.MANIFEST
    stamp = manifest.stat().st_mtime_ns
    config = _paper_config()
    config.cache_dir = cache_dir
    fakes.apply_fakes(config, fakes.make_paper_fakes(workdir / "fakes"))
    assert manifest.stat().st_mtime_ns == stamp
    result = loop.train_and_evaluate(config, workdir)
    assert result == json.loads((workdir / "evaluation.json").read_text())


def test_fakes_are_the_official_formats(smoke):
    _, paths = smoke
    model = flame_jax.load(paths["flame"], masks=paths["masks"], texture=paths["texture"])
    reference = flame_jax.synthetic()
    for field in ("v_template", "shapedirs", "exprdirs", "posedirs", "j_regressor",
                  "lbs_weights", "faces", "static_lmk_faces", "dynamic_lmk_bary"):
        np.testing.assert_array_equal(getattr(model, field), getattr(reference, field))
    np.testing.assert_allclose(model.albedo_mean, reference.albedo_mean, atol=1e-6)
    np.testing.assert_allclose(model.albedo_basis, reference.albedo_basis, atol=1e-6)
    assert {k: v.tolist() for k, v in model.masks.items()} == {
        k: v.tolist() for k, v in reference.masks.items()}
    content = pathlib.Path(paths["flame"]).read_bytes()
    assert content.startswith(b"\x80\x02")  # protocol 2, as Python 2's cPickle wrote it
    assert b"chumpy.ch\nCh" in content and b"scipy.sparse.csc" in content  # FLAME 2020's kind
    module, variables = import_arcface(paths["arcface"])
    assert (module.stages, module.width) == (fakes.ARCFACE_STAGES, fakes.ARCFACE_WIDTH)
    embedding = jax.eval_shape(module.apply, variables, jnp.zeros((1, 112, 112, 3)))
    assert embedding.shape == (1, fakes.ARCFACE_EMBEDDING)
    # The MICA tree: neutral meshes of the stored betas are the registrations.
    import trimesh

    dataset = mica.MicaDataset(paths["mica_root"], paths["mica_names"], model=model)
    assert len(dataset) == len(fakes.MICA_NAMES) * fakes.ACTORS_PER_NAME
    name, actor, images, params = dataset.actors[1]
    registration = trimesh.load(pathlib.Path(paths["mica_root"]) / name /
                                mica.REGISTRATION_FOLDER / actor / "mesh.obj", process=False)
    np.testing.assert_allclose(dataset.neutral_vertices(1), registration.vertices, atol=2e-6)
    arrays = np.load(dataset.parameter_path(name, params))
    assert arrays["betas"].shape == (400,) and arrays["pose"].shape == (15,)
    np.testing.assert_array_equal(arrays["betas"][300:], 0.0)
    assert dataset[1]["landmark_weights"].sum() > 0


def test_coma_encoder_of_another_flame_model_is_never_reused(smoke, cache_dir, tmp_path,
                                                             monkeypatch):
    """Two FLAME files differing in one basis value: two cache keys; the smoke run's encoder
    is reused for its own file only, the other one is trained."""
    _, paths = smoke
    model = flame_jax.load(paths["flame"], masks=paths["masks"], texture=paths["texture"])
    other_path = fakes.write_flame_2020(
        model.replace(shapedirs=model.shapedirs.at[100, 1, 7].add(1e-5)),
        tmp_path / "generic_model.pkl")
    other = flame_jax.load(other_path, masks=paths["masks"], texture=paths["texture"])
    config = _paper_config()
    coma = config.coma
    hierarchy = spectral_gcn.flame_hierarchy(tuple(coma.factors), cache_dir=cache_dir)
    key = coma_cache.coma_cache_key(coma.to_dict(), hierarchy.key, flame_jax.digest(model))
    other_key = coma_cache.coma_cache_key(coma.to_dict(), hierarchy.key,
                                          flame_jax.digest(other))
    assert key != other_key
    entries = pathlib.Path(cache_dir) / "coma"
    assert (entries / key / coma_cache.CHECKPOINT_DIR).is_dir()  # what the smoke run trained
    assert not (entries / other_key).exists()
    messages = []
    coma_cache.ensure_coma_encoder(coma, model, cache_dir=cache_dir, log=messages.append)
    assert messages == [f"CoMA encoder: cached in {entries / key}"]

    class Trained(Exception):
        pass

    def train(*args, **kwargs):
        raise Trained

    from recon.training import coma as coma_trainer

    monkeypatch.setattr(coma_trainer, "train_and_evaluate", train)
    with pytest.raises(Trained):
        coma_cache.ensure_coma_encoder(coma, other, cache_dir=cache_dir, log=messages.append)
    assert "training it" in messages[-1] and not (entries / other_key).exists()


def _flip_one_edge(faces: np.ndarray) -> np.ndarray:
    """FLAME's triangles with the diagonal of one pair of neighbouring triangles flipped."""
    faces = np.array(faces)
    a, b, c = faces[0]
    for index, triangle in enumerate(faces[1:], start=1):
        if a in triangle and b in triangle:
            d = next(int(v) for v in triangle if v not in (a, b))
            faces[0], faces[index] = (a, d, c), (d, b, c)
            return faces
    raise AssertionError("no neighbour of triangle 0 across its first edge")


def test_coma_checkpoint_of_other_triangles_is_refused(smoke, cache_dir, tmp_path):
    """A CoMA checkpoint made on a mesh with other triangles is refused by a MICA-source run
    (before anything is trained), and so is a FLAME model with other triangles."""
    workdir, paths = smoke
    vertices, faces = spectral_gcn.flame_topology()
    flipped = _flip_one_edge(faces)
    config = _paper_config()
    coma = config.coma
    hierarchy = spectral_gcn.build_hierarchy(vertices, flipped, tuple(coma.factors),
                                             cache_dir=cache_dir)
    model_config = spectral_gcn.CoMAConfig(**{
        key: tuple(value) if isinstance(value, (list, tuple)) else value
        for key, value in coma.model.to_dict().items()})
    # Its variables' shapes (values do not matter here; `init` itself takes 15 s unjitted).
    shapes = jax.eval_shape(lambda: spectral_gcn.AutoEncoder(model_config).init(
        jax.random.key(0), jnp.zeros((1, model_config.num_vertices, 3)), hierarchy))
    variables = jax.tree.map(lambda leaf: np.ones(leaf.shape, leaf.dtype), shapes)
    checkpoint = spectral_gcn.save_checkpoint(tmp_path / "coma_other", 1, variables, hierarchy,
                                              model_config, coma.factors)
    assert spectral_gcn.load_encoder(checkpoint).hierarchy.key == hierarchy.key  # a real one
    config.cache_dir = cache_dir
    fakes.apply_fakes(config, paths)
    config.coma_checkpoint_dir = str(checkpoint)
    with pytest.raises(spectral_gcn.CheckpointError, match="trained on hierarchy"):
        loop.train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    model = flame_jax.load(paths["flame"])
    with pytest.raises(ValueError, match="FLAME's triangles"):
        coma_cache.ensure_coma_encoder(coma, model.replace(faces=flipped), cache_dir=cache_dir)
