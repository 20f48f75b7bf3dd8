"""`python -m recon.predict` end to end on a real photo (scikit-image's public-domain astronaut),
a faceless photo (skimage coffee) and a corrupt file; regression wiring with a fake predictor."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("mediapipe")
skimage_data = pytest.importorskip("skimage.data")
trimesh = pytest.importorskip("trimesh")
from PIL import Image  # noqa: E402

from recon import predict  # noqa: E402
from recon.types import Code  # noqa: E402

# Short schedule (the CLI defaults are 100 / 200 / 40 / 60); the rigid and landmark counts match
# tests/test_fitting.py so both share compiled steps when run in one process.
STEPS = ["--rigid-steps", "60", "--landmark-steps", "120", "--appearance-steps", "0",
         "--photometric-steps", "8"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.fromarray(skimage_data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(skimage_data.coffee()).save(folder / "coffee.jpg")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated, not a jpeg")
    (folder / "notes.txt").write_text("not an image suffix: ignored")
    return folder


@pytest.fixture(scope="module")
def folder_run(photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    status = predict.main([str(photos), "--out", str(out), "--fit", *STEPS])
    return status, out


def test_folder_run_reports_failures_and_exit_status(folder_run, photos):
    status, out = folder_run
    assert status == 1  # two of the three images failed
    failures = json.loads((out / "failures.json").read_text())
    by_file = {entry["file"]: entry for entry in failures}
    assert set(by_file) == {str(photos / "broken.jpg"), str(photos / "coffee.jpg")}
    assert by_file[str(photos / "broken.jpg")]["reason"] == "unreadable"
    assert "broken.jpg" in by_file[str(photos / "broken.jpg")]["error"]
    assert by_file[str(photos / "coffee.jpg")]["reason"] == "no_face"
    assert not (out / "coffee.obj").exists() and not (out / "notes.obj").exists()


def test_astronaut_outputs_load_back(folder_run):
    _, out = folder_run
    meshes = [trimesh.load(out / f"astronaut.{suffix}", process=False, force="mesh")
              for suffix in ("obj", "ply", "glb")]
    for mesh in meshes:
        assert mesh.vertices.shape == (5023, 3) and mesh.faces.shape == (9976, 3)
        np.testing.assert_allclose(mesh.vertices, meshes[1].vertices, atol=1e-5)
    vertices = np.asarray(meshes[1].vertices)
    extent = vertices.max(0) - vertices.min(0)
    assert 0.1 < extent[0] < 0.3 and 0.15 < extent[1] < 0.4  # a head, in metres
    now = np.load(out / "astronaut.npy")
    assert now.shape == (7, 3)
    # NoW's points lie on the surface: within 5 mm of a mesh vertex.
    nearest = np.linalg.norm(now[:, None] - vertices[None], axis=-1).min(1)
    assert nearest.max() < 5e-3
    # Eye corners (36, 39, 42, 45) in image order, the nose (33) below the eyes, mouth corners.
    assert now[0, 0] < now[1, 0] < now[2, 0] < now[3, 0]
    assert now[4, 1] < now[:4, 1].min() and now[5, 0] < now[6, 0]
    code = np.load(out / "astronaut_code.npz")
    shapes = {name: code[name].shape for name in code.files}
    assert shapes == {"shape": (300,), "pose": (6,), "expression": (100,), "texture": (50,),
                      "camera": (3,), "light": (27,)}
    overlay = np.asarray(Image.open(out / "astronaut_overlay.png"))
    assert overlay.shape == (448, 3 * 448, 3)
    # The render covers the middle of the shaded panel (grey only around the head).
    centre = overlay[224, 448 + 224].astype(int)
    assert np.abs(centre - 128).max() > 10


def test_astronaut_fit_converges(folder_run):
    _, out = folder_run
    summary = json.loads((out / "astronaut.json").read_text())
    assert set(summary) == {"box", "landmark_set", "landmarks_detected", "landmarks_fitted",
                            "landmark_error_px"}
    assert summary["landmark_set"] == "ibug68_from_mediapipe478"
    x0, y0, x1, y1 = summary["box"]
    detected = np.asarray(summary["landmarks_detected"])
    fitted = np.asarray(summary["landmarks_fitted"])
    assert detected.shape == fitted.shape == (68, 2)
    error = summary["landmark_error_px"]
    np.testing.assert_allclose(error["final"],
                               np.linalg.norm(fitted - detected, axis=-1).mean(), rtol=1e-3)
    box_size = np.sqrt((x1 - x0) * (y1 - y0))
    # Measured on this photo: box ~104 px, initial ~4.6 px, final ~2.3 px (2.2 % of the box).
    assert error["final"] < 0.04 * box_size, (error, box_size)
    assert error["final"] < 0.7 * error["initial"], error


class FakePredictor:
    """Stands in for recon.trainer.load_predictor(DIR): the mean face, a centred camera."""

    def __init__(self):
        self.calls = []

    def __call__(self, crops):
        self.calls.append(np.asarray(crops))
        batch = crops.shape[0]
        zeros = lambda n: jnp.zeros((batch, n), jnp.float32)  # noqa: E731
        return Code(shape=zeros(300), pose=zeros(6), expression=zeros(100), texture=zeros(50),
                    camera=jnp.tile(jnp.asarray([[8.0, 0.0, 0.01]]), (batch, 1)),
                    light=zeros(27).at[:, 0:3].set(2.5))


@pytest.mark.parametrize("fit", [False, True])
def test_checkpoint_mode_uses_the_predictor(photos, tmp_path, monkeypatch, fit):
    fake = FakePredictor()
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    monkeypatch.setattr(predict, "load_regressor",
                        lambda path: fake if path == str(checkpoint) else None)
    out = tmp_path / "out"
    args = [str(photos / "astronaut.png"), "--out", str(out), "--checkpoint", str(checkpoint),
            "--rigid-steps", "60", "--landmark-steps", "20", "--appearance-steps", "0",
            "--photometric-steps", "0"] + (["--fit"] if fit else [])
    assert predict.main(args) == 0
    assert json.loads((out / "failures.json").read_text()) == []
    assert len(fake.calls) == 1
    crops = fake.calls[0]
    assert crops.shape == (1, 224, 224, 3) and crops.dtype == np.float32
    assert 0.0 <= crops.min() and crops.max() <= 1.0
    error = json.loads((out / "astronaut.json").read_text())["landmark_error_px"]
    code = np.load(out / "astronaut_code.npz")
    if fit:  # the regressed code starts the fit
        assert error["final"] < error["initial"]
    else:  # regression only: the code is the predictor's
        assert error["final"] == error["initial"]
        np.testing.assert_allclose(code["camera"], [8.0, 0.0, 0.01])


def test_missing_checkpoint_and_source_are_clear_errors(tmp_path, capsys):
    assert predict.main([str(tmp_path), "--out", str(tmp_path / "o"), "--checkpoint",
                         str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert predict.main([str(tmp_path), "--out", str(tmp_path / "o"), "--checkpoint",
                         str(empty)]) == 2  # recon.trainer.load_predictor: no checkpoint there
    assert "empty_run" in capsys.readouterr().err
    assert predict.main([str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert predict.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2  # empty folder
    assert "no images" in capsys.readouterr().err


def test_now_landmark_indices():
    landmarks = np.arange(68 * 3, dtype=np.float32).reshape(68, 3)
    np.testing.assert_array_equal(predict.now_landmarks(landmarks),
                                  landmarks[[36, 39, 42, 45, 33, 48, 54]])


def test_flame_model_file_without_albedo_borrows_the_builtin_one(tmp_path):
    """--flame-model PATH: a FLAME file without albedo or masks (as the official ones) is
    loaded through flame_jax.load; the albedo space and face mask come from the built-in model."""
    import flame_jax

    builtin = flame_jax.synthetic()
    bare = builtin.replace(albedo_mean=None, albedo_basis=None, masks=None,
                           v_template=builtin.v_template + 0.001)
    path = tmp_path / "flame_without_albedo.npz"
    flame_jax.save(bare, path)
    reconstructor = predict.Reconstructor(fit=False, predictor=FakePredictor(),
                                          flame_model_path=str(path))
    np.testing.assert_allclose(reconstructor.model.v_template, bare.v_template)
    np.testing.assert_array_equal(reconstructor.assets.albedo_mean, builtin.albedo_mean)
    assert float(reconstructor.assets.face_region.sum()) > 1000


def two_faces_image():
    """The astronaut beside a half-size copy of herself (as in test_detect.py)."""
    big = skimage_data.astronaut()
    small = np.asarray(Image.fromarray(big).resize((256, 256), Image.Resampling.LANCZOS))
    canvas = np.full((512, 768, 3), 235, np.uint8)
    canvas[:, :512] = big
    canvas[128:384, 512:] = small
    return canvas


def test_all_faces_writes_one_set_per_face(tmp_path, monkeypatch):
    Image.fromarray(two_faces_image()).save(tmp_path / "pair.png")
    fake = FakePredictor()
    monkeypatch.setattr(predict, "load_regressor", lambda path: fake)
    out = tmp_path / "out"
    common = [str(tmp_path / "pair.png"), "--checkpoint", str(tmp_path)]
    assert predict.main(common + ["--out", str(out), "--all-faces"]) == 0
    boxes = [json.loads((out / f"pair_face{i}.json").read_text())["box"] for i in (0, 1)]
    assert boxes[0][2] - boxes[0][0] > boxes[1][2] - boxes[1][0]  # largest first
    for i in (0, 1):
        assert (out / f"pair_face{i}.glb").exists() and (out / f"pair_face{i}_overlay.png").exists()
    assert not (out / "pair.json").exists()
    single = tmp_path / "single"
    assert predict.main(common + ["--out", str(single)]) == 0
    assert json.loads((single / "pair.json").read_text())["box"] == boxes[0]
    assert not (single / "pair_face1.json").exists()


def test_regressor_flame_model_decodes_its_codes():
    import flame_jax

    fake = FakePredictor()
    fake.flame = flame_jax.synthetic()
    fake.flame = fake.flame.replace(v_template=fake.flame.v_template * 1.01)
    reconstructor = predict.Reconstructor(fit=False, predictor=fake)
    assert reconstructor.model is fake.flame
