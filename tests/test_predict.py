"""`python -m recon.predict` end to end on a real photo (scikit-image's public-domain astronaut),
a faceless photo (skimage coffee) and a corrupt file; the photo crop against
`recon.image.crop_image`; regression wiring with a fake predictor and with a tiny real
checkpoint whose crop spec (dlib five points, 150 px) drives the crop. Tests that detect faces
skip when MediaPipe is not installed."""

import dataclasses
import importlib.util
import json

import jax.numpy as jnp
import numpy as np
import pytest

skimage_data = pytest.importorskip("skimage.data")
trimesh = pytest.importorskip("trimesh")
from PIL import Image  # noqa: E402

from recon import predict  # noqa: E402
from recon.image import CropSpec, crop_image, read_image  # noqa: E402
from recon.types import Code  # noqa: E402

needs_mediapipe = pytest.mark.skipif(
    importlib.util.find_spec("mediapipe") is None,
    reason="mediapipe (the optional 'photo' extra: pip install 'facerecon-jax[photo]') is not "
           "installed")

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


@needs_mediapipe
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


@needs_mediapipe
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


@needs_mediapipe
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
    # Measured on this photo (FIT_CROP): box ~104 px, initial ~4.6 px, final ~2.1 px (2 % of
    # the box).
    assert error["final"] < 0.04 * box_size, (error, box_size)
    assert error["final"] < 0.7 * error["initial"], error


class FakePredictor:
    """Stands in for recon.inference.load_predictor(DIR): the mean face, a centred camera, from
    crops cut with `crop`."""

    def __init__(self, crop=predict.FIT_CROP):
        self.crop = crop
        self.calls = []

    def __call__(self, crops):
        self.calls.append(np.asarray(crops))
        batch = crops.shape[0]
        zeros = lambda n: jnp.zeros((batch, n), jnp.float32)  # noqa: E731
        return Code(shape=zeros(300), pose=zeros(6), expression=zeros(100), texture=zeros(50),
                    camera=jnp.tile(jnp.asarray([[8.0, 0.0, 0.01]]), (batch, 1)),
                    light=zeros(27).at[:, 0:3].set(2.5))


@needs_mediapipe
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
                         str(empty)]) == 2  # recon.inference.load_predictor: no checkpoint there
    assert "empty_run" in capsys.readouterr().err
    assert predict.main([str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert predict.main([str(tmp_path), "--out", str(tmp_path / "o")]) == 2  # empty folder
    assert "no images" in capsys.readouterr().err


def test_now_landmark_indices():
    landmarks = np.arange(68 * 3, dtype=np.float32).reshape(68, 3)
    np.testing.assert_array_equal(predict.now_landmarks(landmarks),
                                  landmarks[[36, 39, 42, 45, 33, 48, 54]])


def test_overlay_factor_is_a_multiple_of_the_crop():
    assert [predict.overlay_factor(size) for size in (224, 150, 112, 64, 448, 600)] == \
        [2, 3, 4, 7, 1, 1]


def test_a_predictor_must_name_its_crop():
    with pytest.raises(TypeError, match="crop"):
        predict.Reconstructor(fit=False, predictor=FakePredictor(crop=None))


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


@needs_mediapipe
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


@pytest.fixture(scope="module")
def astronaut_face():
    """(image, the detected face) of the astronaut."""
    if importlib.util.find_spec("mediapipe") is None:
        pytest.skip("mediapipe (the optional 'photo' extra) is not installed")
    from recon.image import detect

    image = skimage_data.astronaut()
    with detect.FaceDetector() as detector:
        face, = detector(image)
    return image, face


@pytest.mark.parametrize("spec", [
    predict.FIT_CROP,
    CropSpec(anchor="dlib_five_points", size=150, padding=0.25),
    CropSpec(anchor="arcface_five_points", size=112),
], ids=lambda spec: f"{spec.anchor}_{spec.size}")
def test_photo_crop_is_the_image_contracts_crop(astronaut_face, spec):
    """The crop the regressor and the fit see is `recon.image.crop_image` of the detected box
    and landmarks with the predictor's spec; landmarks go in and out through its matrix."""
    image, face = astronaut_face
    fake = FakePredictor(crop=spec)
    reconstructor = predict.Reconstructor(fit=False, predictor=fake)
    reconstruction, visuals = reconstructor(image, face)
    expected = crop_image(image, spec, box=face.box, landmarks=face.landmarks_68)
    np.testing.assert_array_equal(fake.calls[0], expected.image[None])
    np.testing.assert_array_equal(visuals["crop"].matrix, expected.matrix)
    np.testing.assert_allclose(visuals["landmarks_crop"], expected.to_crop(face.landmarks_68),
                               atol=1e-3)
    np.testing.assert_allclose(reconstruction.landmarks_fitted,
                               expected.to_image(visuals["fitted_crop"]), atol=1e-3)
    # The face fills the crop: the 51 inner landmarks land inside it (ArcFace's crop cuts the
    # chin).
    inner = visuals["landmarks_crop"][17:]
    assert inner.min() > 0 and inner.max() < spec.size


def test_fit_crop_matches_an_independent_box_crop(astronaut_face):
    """FIT_CROP is NoW's and DECA's box crop: 1.6 x the mean box side around the box centre,
    224 px. An independent crop of that window (Pillow, float source box) agrees with the
    photo crop within a pixel of displacement (values within a grey level, bilinear both)."""
    image, face = astronaut_face
    crop = predict.Reconstructor(fit=False, predictor=FakePredictor()).crop_face(image, face)
    x0, y0, x1, y1 = face.box
    side = 1.6 * ((x1 - x0) + (y1 - y0)) / 2
    corner = np.array([(x0 + x1) / 2 - side / 2, (y0 + y1) / 2 - side / 2])
    np.testing.assert_allclose(crop.to_image([[0.0, 0.0], [224.0, 224.0]]),
                               [corner, corner + side], atol=1e-6)
    assert corner.min() > 0 and (corner + side).max() < 512  # the window is inside the photo
    reference = Image.fromarray(image).resize(
        (224, 224), Image.Resampling.BILINEAR, box=(*corner, *(corner + side)))
    reference = np.asarray(reference, np.float32) / 255.0
    difference = np.abs(crop.image - reference)[2:-2, 2:-2]
    assert difference.mean() < 1.5 / 255 and np.percentile(difference, 99) < 6 / 255, \
        (difference.mean() * 255, np.percentile(difference, 99) * 255)


@needs_mediapipe
def test_exif_orientation_is_applied_before_detection(tmp_path, monkeypatch):
    """A phone photo stored sideways with EXIF orientation 6 is turned upright: the same face
    box as the upright photo."""
    upright = skimage_data.astronaut()
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: display rotated 90 degrees clockwise
    stored.save(tmp_path / "phone.png", exif=exif)
    np.testing.assert_array_equal(read_image(tmp_path / "phone.png",
                                             apply_exif_orientation=True), upright)
    Image.fromarray(upright).save(tmp_path / "upright.png")
    monkeypatch.setattr(predict, "load_regressor", lambda path: FakePredictor())
    out = tmp_path / "out"
    assert predict.main([str(tmp_path), "--out", str(out), "--checkpoint", str(tmp_path)]) == 0
    boxes = [json.loads((out / f"{stem}.json").read_text())["box"]
             for stem in ("phone", "upright")]
    np.testing.assert_allclose(boxes[0], boxes[1], atol=1e-6)


def write_tiny_checkpoint(workdir, crop: CropSpec):
    """A randomly initialised IResNet regressor (width 8) stored as the trainer stores a step,
    with a config naming `crop`: what `recon.inference.load_predictor` reads.

    The backbone's random weights are drawn here (He-normal kernels, unit scales and variances)
    and handed to `init_variables` as imported ones, which then initialises only the head:
    flax's own initialisation of the whole IResNet takes about 45 s on a 2-core CPU."""
    import jax
    import jax.numpy as jnp

    from recon.model import build
    from recon.options import to_dict
    from recon.training.checkpoints import RunCheckpointer

    options = build.ModelOptions(backbone="iresnet", width=8, head_hidden_size=32,
                                 head_num_hidden=1)
    model, _ = build.build_model(options, camera=(8.0, 0.0, 0.0), load_weights=False)
    backbone, _ = build.build_backbone(options, load_weights=False)
    shapes = jax.eval_shape(backbone.init, jax.random.key(0),
                            jnp.zeros((1,) + build.input_shape(options)))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = np.prod(leaf.shape[:-1])
            return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        return np.full(leaf.shape, {"scale": 1.0, "var": 1.0, "alpha": 0.25}.get(name, 0.0),
                       np.float32)

    backbone_variables = {collection: jax.tree_util.tree_map_with_path(draw, shapes[collection])
                          for collection in ("params", "batch_stats")}
    variables = build.init_variables(model, backbone_variables, 0, options)
    config = {"task": "regressor", "model": to_dict(options), "flame": {},
              "data": {"crop": to_dict(crop)}}
    with RunCheckpointer(workdir / "checkpoints", config=config, async_save=False) as manager:
        manager.save(1, {"params": variables["params"],
                         "batch_stats": variables["batch_stats"], "step": np.int32(1)})


@needs_mediapipe
def test_checkpoint_crop_spec_drives_the_photo_crop(tmp_path, monkeypatch, capsys):
    """`--checkpoint W --fit` with a tiny real checkpoint trained (here: initialised) on 150 px
    dlib five-point crops: the regressor gets that crop of the photo, the fit runs in it, and
    the overlay is 3 x 150 px per panel."""
    spec = CropSpec(anchor="dlib_five_points", size=150, padding=0.25)
    workdir = tmp_path / "run"
    write_tiny_checkpoint(workdir, spec)
    seen = []

    def spying_load_regressor(path):
        predictor = real_load_regressor(path)
        assert predictor.crop == spec and predictor.workdir == str(workdir)

        def apply(variables, crops):
            seen.append(np.asarray(crops))
            return predictor.apply(variables, crops)

        return dataclasses.replace(predictor, apply=apply)

    real_load_regressor = predict.load_regressor
    monkeypatch.setattr(predict, "load_regressor", spying_load_regressor)
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(photo)
    out = tmp_path / "out"
    assert predict.main([str(photo), "--out", str(out), "--checkpoint", str(workdir), "--fit",
                         "--rigid-steps", "30", "--landmark-steps", "10",
                         "--appearance-steps", "0", "--photometric-steps", "0"]) == 0
    summary = json.loads((out / "astronaut.json").read_text())
    expected = crop_image(read_image(photo), spec,
                          landmarks=np.asarray(summary["landmarks_detected"]))
    assert len(seen) == 1 and seen[0].shape == (1, 150, 150, 3)
    np.testing.assert_allclose(seen[0][0], expected.image, atol=2e-3)
    error = summary["landmark_error_px"]
    assert error["final"] < error["initial"], error
    overlay = np.asarray(Image.open(out / "astronaut_overlay.png"))
    assert overlay.shape == (450, 3 * 450, 3)
    # The overlay's input panel is the same window as the regressor's crop, 3 x larger.
    panel = overlay[:, :450].astype(np.float32).reshape(150, 3, 150, 3, 3).mean((1, 3)) / 255
    assert np.abs(panel - expected.image).mean() < 0.02
    assert "incomplete" not in capsys.readouterr().err  # the 450 px render fits its capacities
