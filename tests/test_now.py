"""NoW scorer: exact distances vs brute force, protocol invariances, crops, readers, CLI output."""

import json
import pathlib
import pickle

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from recon import now
from recon.now import cli, distance, io as now_io, predict, protocol, scoring

NOW_IBUG = [36, 39, 42, 45, 33, 48, 54]


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def face(flame_topology, landmark_embedding):
    """The FLAME template head (no eyeballs) in mm and its 7 NoW landmarks in mm."""
    vertices = np.asarray(flame_topology["v_template"], np.float64) * 1000.0
    faces = np.asarray(flame_topology["faces"], np.int64)
    index = np.asarray(protocol.FLAME_STATIC_INDICES)
    lmk_faces = np.asarray(landmark_embedding["static_lmk_faces"])[index]
    bary = np.asarray(landmark_embedding["static_lmk_bary"], np.float64)[index]
    landmarks = np.einsum("nk,nkd->nd", bary, vertices[faces[lmk_faces]])
    return vertices, faces, landmarks


def _similarity(points, seed, scale):
    rotation = Rotation.random(random_state=seed).as_matrix()
    shift = np.random.default_rng(seed).normal(size=3)
    return scale * points @ rotation + shift


# ----------------------------------------------------------------------------- distances

def test_point_triangle_distance_closed_forms_in_every_region():
    vertices = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    faces = np.array([[0, 1, 2]])
    points = np.array([[0.2, 0.2, 0.7],     # face region: height
                       [-1.0, -1.0, 0.5],   # vertex region of v0
                       [2.0, -0.5, 0.0],    # vertex region of v1
                       [0.5, -1.0, 0.3],    # edge v0-v1
                       [1.0, 1.0, -0.2],    # edge v1-v2 (hypotenuse)
                       [-0.5, 0.4, 0.0]])   # edge v2-v0
    expected = np.array([0.7, np.sqrt(2.25), np.sqrt(1.25), np.sqrt(1.09),
                         np.sqrt(0.5 + 0.04), 0.5])
    np.testing.assert_allclose(distance.point_mesh_distance(points, vertices, faces), expected,
                               atol=1e-12)
    np.testing.assert_allclose(distance.point_triangle_distance_reference(points, vertices, faces),
                               expected, atol=1e-12)


def test_libigl_distance_matches_brute_force_on_a_mesh(face):
    vertices, faces, _ = face
    rng = np.random.default_rng(0)
    # Points near the surface (face regions), near vertices and edges, and far away.
    near = vertices[rng.integers(0, 3931, 300)] + rng.normal(0, 2.0, (300, 3))
    edges = faces[rng.integers(0, len(faces), 150)]
    on_edges = (vertices[edges[:, 0]] + vertices[edges[:, 1]]) / 2 + rng.normal(0, 0.5, (150, 3))
    far = rng.normal(0, 150.0, (50, 3))
    points = np.concatenate([near, on_edges, far])
    reference = distance.point_triangle_distance_reference(points, vertices, faces[:4000])
    fast = distance.point_mesh_distance(points, vertices, faces[:4000])
    np.testing.assert_allclose(fast, reference, rtol=1e-9, atol=1e-9)


def test_distance_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        distance.point_mesh_distance(np.full((2, 3), np.nan), np.eye(3), np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="outside"):
        distance.MeshDistance(np.eye(3), np.array([[0, 1, 3]]))


# ----------------------------------------------------------------------------- protocol

def test_crop_region_follows_the_protocol():
    p = np.array([[-45.0, 0, 0], [-15, 0, 0], [15, 0, 0], [45, 0, 0], [0, -40, 10],
                  [-25, -60, 0], [25, -60, 0]])
    centre, radius = protocol.crop_region(p)
    bridge = np.array([0.0, 0, 0])
    np.testing.assert_allclose(centre, p[4] + 0.3 * (bridge - p[4]))
    assert radius == pytest.approx(1.4 * (90.0 + np.sqrt(1600 + 100)) / 2)
    points = centre + np.array([[radius, 0, 0], [radius * 1.0001, 0, 0], [0, 0, 0.5 * radius]])
    assert protocol.crop_mask(points, p).tolist() == [True, False, True]


def test_procrustes_recovers_a_similarity_and_allows_reflection():
    rng = np.random.default_rng(1)
    source = rng.normal(size=(7, 3))
    target = _similarity(source, 3, 2.5)
    fit = protocol.similarity_procrustes(target, source)
    np.testing.assert_allclose(fit.apply(source), target, atol=1e-10)
    assert fit.scale == pytest.approx(2.5)
    mirrored = source * np.array([-1.0, 1, 1])
    fit = protocol.similarity_procrustes(target, mirrored)
    np.testing.assert_allclose(fit.apply(mirrored), target, atol=1e-10)
    assert np.linalg.det(fit.rotation) < 0


def test_prediction_equal_to_the_scan_under_a_similarity_scores_zero(face):
    vertices, faces, landmarks = face
    metres = _similarity(vertices / 1000.0, 5, 1.0)  # a perfect prediction in metres, moved
    predicted_landmarks = _similarity(landmarks / 1000.0, 5, 1.0)
    score = protocol.score_prediction(vertices, landmarks, metres, faces, predicted_landmarks)
    assert score.distances_mm.max() < 1e-6
    assert len(score.distances_mm) == protocol.crop_mask(vertices, landmarks).sum() > 1000
    # Any other scale: the same for the non-metrical protocol.
    scaled = protocol.score_prediction(vertices, landmarks, 0.37 * metres, faces,
                                       0.37 * predicted_landmarks)
    assert scaled.distances_mm.max() < 1e-6
    # Metrical: right scale -> 0; 10% too big -> penalised by the scale error.
    right = protocol.score_prediction(vertices, landmarks, metres, faces, predicted_landmarks,
                                      metrical=True, unit="m")
    assert right.distances_mm.max() < 1e-6
    wrong = protocol.score_prediction(vertices, landmarks, 1.1 * metres, faces,
                                      1.1 * predicted_landmarks, metrical=True, unit="m")
    assert np.median(wrong.distances_mm) > 1.0
    millimetres = protocol.score_prediction(vertices, landmarks, 1000 * metres, faces,
                                            1000 * predicted_landmarks, metrical=True, unit="mm")
    assert millimetres.distances_mm.max() < 1e-6


def test_refinement_repairs_a_poor_landmark_alignment(face):
    vertices, faces, landmarks = face
    noisy = landmarks + np.random.default_rng(2).normal(0, 3.0, landmarks.shape)
    before = distance.point_mesh_distance(
        vertices[protocol.crop_mask(vertices, landmarks)],
        protocol.similarity_procrustes(landmarks, noisy).apply(vertices), faces)
    score = protocol.score_prediction(vertices, landmarks, vertices, faces, noisy, metrical=False)
    assert np.median(before) > 0.5
    assert np.median(score.distances_mm) < 0.01
    rigid = protocol.score_prediction(vertices, landmarks, vertices, faces, noisy, metrical=True,
                                      unit="mm")
    assert np.median(rigid.distances_mm) < 0.01


def _sphere_scan(radius, subdivisions=5):
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    # 7 "landmarks" on the sphere whose crop sphere contains the whole ball.
    p = radius * np.array([[-1.0, 0, 0], [-0.1, 0, 0.99], [0.1, 0, 0.99], [1, 0, 0],
                           [0, -0.99, 0.1], [-0.7, -0.7, 0.1], [0.7, -0.7, 0.1]])
    return np.asarray(sphere.vertices), np.asarray(sphere.faces), p


def test_a_surface_offset_by_a_known_distance_scores_that_distance():
    scan, faces, landmarks = _sphere_scan(50.0)
    assert protocol.crop_mask(scan, landmarks).all()
    offset = 1.5
    bigger = scan * (50.0 + offset) / 50.0
    rigid = protocol.score_prediction(scan, landmarks, bigger / 1000.0, faces,
                                      landmarks / 1000.0, metrical=True, unit="m")
    # The polyhedron lies between its circumsphere (radius 51.5) and the sphere through its
    # face planes' nearest points; that facet sag bounds how far any distance can be from the
    # offset once the spheres are concentric.
    corners = bigger[faces]
    normals = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    plane_radius = np.abs(np.sum(normals / np.linalg.norm(normals, axis=1, keepdims=True)
                                 * corners[:, 0], axis=1))
    sag = 51.5 - plane_radius.min()
    assert 0.001 < sag < 0.05
    assert np.all(np.abs(rigid.distances_mm - offset) <= sag + 1e-3)
    np.testing.assert_allclose(rigid.alignment.scale, 1000.0)
    # Non-metrical: the fitted scale removes a pure scaling entirely.
    free = protocol.score_prediction(scan, landmarks, bigger, faces, landmarks)
    assert free.distances_mm.max() < 1e-4


def test_protocol_names_bad_arrays(face):
    vertices, faces, landmarks = face
    with pytest.raises(ValueError, match="predicted landmarks must be"):
        protocol.score_prediction(vertices, landmarks, vertices, faces, landmarks[:6])
    with pytest.raises(ValueError, match="unit"):
        protocol.score_prediction(vertices, landmarks, vertices, faces, landmarks, metrical=True,
                                  unit="inch")


# ----------------------------------------------------------------------------- image crop

def test_image_crop_follows_deca_protocol():
    box = {"left": 100.0, "right": 180.0, "top": 60.0, "bottom": 160.0}
    cx, cy, side = predict.crop_square(box)
    assert (cx, cy) == (140.0, 110.0)
    assert side == int(1.6 * (80 + 100) / 2)
    height, width = 300, 320
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([cols / width, rows / height, np.zeros_like(rows)], -1)
    crop = predict.crop_image(image, box)
    assert crop.shape == (224, 224, 3) and crop.dtype == np.float32
    # Corner (0, 0) samples the square's top-left pixel, (223, 223) its bottom-right.
    np.testing.assert_allclose(crop[0, 0, :2], [(cx - side / 2) / width, (cy - side / 2) / height],
                               atol=1e-5)
    np.testing.assert_allclose(crop[223, 223, :2],
                               [(cx + side / 2) / width, (cy + side / 2) / height], atol=1e-5)
    # Outside the image: zeros.
    off = predict.crop_image(image, {"left": -200.0, "right": -100.0, "top": 0.0, "bottom": 100.0})
    assert off[:, :100].max() == 0.0


# ----------------------------------------------------------------------------- readers

def test_pp_round_trip_and_errors(tmp_path):
    landmarks = np.arange(21, dtype=np.float64).reshape(7, 3) / 3
    now_io.write_pp(tmp_path / "a.pp", landmarks)
    np.testing.assert_allclose(now_io.read_pp(tmp_path / "a.pp"), landmarks, atol=1e-6)
    lines = (tmp_path / "a.pp").read_text().splitlines()
    assert lines[8].lstrip().startswith("<point")  # the official reader's line 9
    (tmp_path / "six.pp").write_text("\n".join(lines[:-2] + lines[-1:]))
    with pytest.raises(now.NowFileError, match=r"six\.pp.*expected 7 <point> elements, found 6"):
        now_io.read_pp(tmp_path / "six.pp")
    (tmp_path / "bad.pp").write_text("<PickedPoints><point x='1' y='2'/></PickedPoints>")
    with pytest.raises(now.NowFileError, match=r"bad\.pp.*without attribute 'z'"):
        now_io.read_pp(tmp_path / "bad.pp")
    (tmp_path / "junk.pp").write_text("not xml <<")
    with pytest.raises(now.NowFileError, match=r"junk\.pp.*not a MeshLab"):
        now_io.read_pp(tmp_path / "junk.pp")
    with pytest.raises(now.NowFileError, match="missing.pp: file not found"):
        now_io.read_pp(tmp_path / "missing.pp")


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_face_box_uses_the_restricted_unpickler(tmp_path):
    box = {"left": 10.0, "right": 90.5, "top": 5.0, "bottom": 100.0}
    now_io.write_face_box(tmp_path / "box.npy", box)
    assert now_io.read_face_box(tmp_path / "box.npy") == box
    # A numpy-scalar dict as np.save writes it in the release (np.float64 values).
    array = np.empty((), dtype=object)
    array[()] = {key: np.float64(value) for key, value in box.items()}
    np.save(tmp_path / "np.npy", array, allow_pickle=True)
    assert now_io.read_face_box(tmp_path / "np.npy") == box
    array[()] = {"left": 1.0, "right": 2.0}
    np.save(tmp_path / "keys.npy", array, allow_pickle=True)
    with pytest.raises(now.NowFileError, match=r"keys\.npy.*lacks keys \['top', 'bottom'\]"):
        now_io.read_face_box(tmp_path / "keys.npy")
    array[()] = _Evil()
    np.save(tmp_path / "evil.npy", array, allow_pickle=True)
    with pytest.raises(now.NowFileError, match=r"evil\.npy.*forbidden global"):
        now_io.read_face_box(tmp_path / "evil.npy")
    np.save(tmp_path / "array.npy", np.zeros(4))
    with pytest.raises(now.NowFileError, match=r"array\.npy.*expected a pickled dict"):
        now_io.read_face_box(tmp_path / "array.npy")


def test_image_list_reader(tmp_path):
    path = tmp_path / "imagepathsvalidation.txt"
    path.write_text("FaMoS_1/multiview_neutral/IMG_0001.jpg\n\n"
                    "/abs/prefix/FaMoS_2/selfie/IMG_0002.jpg\n")
    entries = now_io.read_image_list(path)
    assert [e.key for e in entries] == ["FaMoS_1/multiview_neutral/IMG_0001.jpg",
                                        "FaMoS_2/selfie/IMG_0002.jpg"]
    assert entries[0].relative(".obj") == pathlib.Path("FaMoS_1/multiview_neutral/IMG_0001.obj")
    path.write_text("FaMoS_1/sideways/IMG.jpg\n")
    with pytest.raises(now.NowFileError, match=r"imagepathsvalidation\.txt:1: unknown challenge"):
        now_io.read_image_list(path)
    path.write_text("IMG.jpg\n")
    with pytest.raises(now.NowFileError, match=r":1: expected 'subject/challenge/image.jpg'"):
        now_io.read_image_list(path)


def test_prediction_landmark_readers(tmp_path):
    landmarks = np.random.default_rng(3).normal(size=(7, 3))
    np.save(tmp_path / "a.npy", landmarks.astype(np.float32))
    np.save(tmp_path / "b.npy", landmarks[None])
    np.savetxt(tmp_path / "c.txt", landmarks)
    for name in ("a.npy", "b.npy", "c.txt"):
        np.testing.assert_allclose(now_io.read_prediction_landmarks(tmp_path / name), landmarks,
                                   atol=1e-6)
    np.save(tmp_path / "shape.npy", np.zeros((68, 3)))
    with pytest.raises(now.NowFileError, match=r"shape\.npy: landmarks must be 7 x 3.*\(68, 3\)"):
        now_io.read_prediction_landmarks(tmp_path / "shape.npy")
    bad = landmarks.copy()
    bad[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(now.NowFileError, match=r"nan\.npy.*NaN"):
        now_io.read_prediction_landmarks(tmp_path / "nan.npy")
    array = np.empty((), dtype=object)
    array[()] = {"landmarks": landmarks}
    np.save(tmp_path / "pickled.npy", array, allow_pickle=True)
    with pytest.raises(now.NowFileError, match=r"pickled\.npy: not a plain numeric"):
        now_io.read_prediction_landmarks(tmp_path / "pickled.npy")
    (tmp_path / "d.txt").write_text("1 2\n3 4\n")
    with pytest.raises(now.NowFileError, match=r"d\.txt"):
        now_io.read_prediction_landmarks(tmp_path / "d.txt")


def test_mesh_readers(tmp_path, face):
    vertices, faces, _ = face
    (tmp_path / "quad.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nv 0 1 0\nvt 0 0\n"
                                       "f 1/1/1 2/1/1 3/1/1 4/1/1\nf -4 -3 -2\n")
    v, f = now_io.read_mesh(tmp_path / "quad.obj")
    assert v.shape == (4, 3) and f.tolist() == [[0, 1, 2], [0, 2, 3], [0, 1, 2]]
    trimesh.Trimesh(vertices, faces, process=False).export(tmp_path / "m.ply")
    v, f = now_io.read_mesh(tmp_path / "m.ply")
    np.testing.assert_allclose(v, vertices, atol=1e-4)
    np.testing.assert_array_equal(f, faces)
    now_io.write_obj(tmp_path / "m.obj", vertices, faces)
    v, f = now_io.read_mesh(tmp_path / "m.obj")
    np.testing.assert_allclose(v, vertices, atol=1e-5)
    np.testing.assert_array_equal(f, faces)
    (tmp_path / "bad.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nf 1 2 9\n")
    with pytest.raises(now.NowFileError, match=r"bad\.obj: faces index vertices outside"):
        now_io.read_mesh(tmp_path / "bad.obj")
    (tmp_path / "text.obj").write_text("v 0 zero 0\nf 1 1 1\n")
    with pytest.raises(now.NowFileError, match=r"text\.obj: malformed vertex line"):
        now_io.read_mesh(tmp_path / "text.obj")


# ----------------------------------------------------------------------------- end to end

def _write_dataset(root, face, num_subjects=2, images=(("multiview_neutral", 2), ("selfie", 1))):
    """A NoW-layout dataset (scans = the template head moved, in mm) and a perfect prediction
    folder (the template in metres) with a known per-image similarity."""
    vertices, faces, landmarks = face
    entries = []
    for s in range(num_subjects):
        subject = f"subject_{s}"
        scan = _similarity(vertices, 10 + s, 1.0)
        now_io.write_obj(root / "scans" / subject / "scan.obj", scan, faces)
        now_io.write_pp(root / "scans_lmks_onlypp" / subject / "scan.pp",
                        _similarity(landmarks, 10 + s, 1.0))
        for challenge, count in images:
            for k in range(count):
                entries.append(now_io.ImageEntry(subject, challenge, f"IMG_{k}.jpg"))
    now_io.write_image_list(root / "imagepathsvalidation.txt", entries)
    return entries


def _write_predictions(folder, entries, face, *, scale=1.0):
    vertices, faces, landmarks = face
    for i, entry in enumerate(entries):
        now_io.write_prediction(folder, entry, _similarity(vertices / 1000.0 * scale, i, 1.0),
                                faces, _similarity(landmarks / 1000.0 * scale, i, 1.0))


def test_missing_predictions_are_all_listed_and_exit_2(tmp_path, face, capsys):
    entries = _write_dataset(tmp_path / "now", face)
    _write_predictions(tmp_path / "pred", entries[1:4], face)
    (tmp_path / "pred" / entries[2].relative(".npy")).unlink()
    with pytest.raises(now.NowMissingError) as info:
        scoring.evaluate_predictions(tmp_path / "now", tmp_path / "pred", workers=1,
                                     progress=False)
    assert sorted(info.value.missing) == sorted([entries[0].key, entries[2].key, entries[4].key,
                                                 entries[5].key])
    assert "no landmarks .npy/.txt" in str(info.value)
    request = cli.EvalRequest(now_root=str(tmp_path / "now"), predictions=(str(tmp_path / "pred"),),
                              output=str(tmp_path / "out"), workers=1, progress=False)
    assert cli.run(request) == cli.EXIT_MISSING
    assert entries[4].key in capsys.readouterr().err
    assert not (tmp_path / "out" / "results.json").exists()
    allowed = cli.EvalRequest(**{**request.__dict__, "allow_missing": True})
    assert cli.run(allowed, out=lambda *_: None) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted(results["missing"]) == sorted(info.value.missing)
    assert set(results["per_image"]) == {entries[1].key, entries[3].key}


def test_results_json_has_the_fixed_format(tmp_path, face):
    entries = _write_dataset(tmp_path / "now", face)
    _write_predictions(tmp_path / "good", entries, face)
    _write_predictions(tmp_path / "big", entries, face, scale=1.05)
    lines = []
    request = cli.EvalRequest(now_root=str(tmp_path / "now"), output=str(tmp_path / "out"),
                              predictions=(str(tmp_path / "good"), str(tmp_path / "big")),
                              labels=("good", "big"), metrical=True, workers=2, progress=False)
    assert cli.run(request, out=lines.append) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"all", "per_challenge", "per_image", "missing", "metrical", "protocol"}
    assert set(results["all"]) == {"median_mm", "mean_mm", "std_mm"}
    assert set(results["per_challenge"]) == set(now.CHALLENGES)
    assert results["per_challenge"]["multiview_expressions"]["median_mm"] is None
    assert set(results["per_image"]) == {e.key for e in entries}
    for value in results["per_image"].values():
        assert set(value) == {"median_mm", "mean_mm", "n_points"}
        assert value["median_mm"] < 1e-3  # OBJ text rounding (1e-8 m) only
    assert results["metrical"] is True and results["missing"] == []
    big = json.loads((tmp_path / "out" / "big" / "results.json").read_text())
    assert big["all"]["median_mm"] > 0.3  # 5% too big, metrical: penalised
    png = (tmp_path / "out" / "cumulative_error.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert any("| good | all | 6 |" in line for line in lines)


def test_predict_split_with_a_fake_predictor_then_scores(tmp_path, face):
    from PIL import Image

    vertices, faces, landmarks = face
    entries = _write_dataset(tmp_path / "now", face, num_subjects=1)
    seen = []
    for entry in entries:
        image = np.full((120, 100, 3), 128, np.uint8)
        Image.fromarray(image).save(tmp_path / "now" / "x.jpg")
        target = tmp_path / "now" / now_io.IMAGES_DIR / entry.subject / entry.challenge / entry.image
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(target)
        now_io.write_face_box(tmp_path / "now" / now_io.FACE_BOXES_DIR / entry.relative(".npy"),
                              {"left": 20, "right": 80, "top": 30, "bottom": 100})

    def fake_predict(images):
        seen.append(images.shape)
        assert images.dtype == np.float32 and 0.0 <= images.min() and images.max() <= 1.0
        batch = len(images)
        return (np.tile(vertices[None] / 1000.0, (batch, 1, 1)),
                np.tile(landmarks[None] / 1000.0, (batch, 1, 1)))

    predict.predict_split(tmp_path / "now", entries, fake_predict, faces, tmp_path / "pred",
                          batch_size=2, progress=False)
    assert seen == [(2, 224, 224, 3), (1, 224, 224, 3)]
    for entry in entries:
        assert now_io.read_prediction_landmarks(
            tmp_path / "pred" / entry.relative(".npy")).shape == (7, 3)
    results = scoring.evaluate_predictions(tmp_path / "now", tmp_path / "pred", workers=1,
                                           progress=False)
    assert scoring.summary(results.all_distances())["median_mm"] < 1e-3
    request = cli.EvalRequest(now_root=str(tmp_path / "now"), split="test",
                              output=str(tmp_path / "export"), progress=False)
    (tmp_path / "now" / "imagepathstest.txt").write_text(
        (tmp_path / "now" / "imagepathsvalidation.txt").read_text())
    assert cli.run(request, predictor_factory=lambda _: fake_predict, faces=faces,
                   out=lambda *_: None) == 0
    assert (tmp_path / "export" / "predictions" / entries[0].relative(".obj")).is_file()
    assert not (tmp_path / "export" / "results.json").exists()


def test_checkpoint_predictor_error_is_clear(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "recon.trainer", None)
    with pytest.raises(RuntimeError, match="recon.trainer.load_predictor"):
        predict.load_checkpoint_predictor("runs/default")


def test_synthetic_split_has_the_now_layout_and_scores_its_ground_truth(tmp_path,
                                                                      synthetic_model):
    from recon.now import synthetic

    config = synthetic.SyntheticNowConfig(
        num_val_subjects=1, num_test_subjects=1, image_size=64, subdivisions=1,
        images_per_challenge=tuple((c, 1) for c in now.CHALLENGES))
    root = synthetic.ensure_synthetic_split(config, root=tmp_path / "split", progress=False,
                                            model=synthetic_model)
    assert synthetic.ensure_synthetic_split(config, root=root) == root  # cached: no rebuild
    val = now_io.read_image_list(root / "imagepathsvalidation.txt")
    test = now_io.read_image_list(root / "imagepathstest.txt")
    assert [e.challenge for e in val] == list(now.CHALLENGES) and len(test) == 4
    assert {e.subject for e in val}.isdisjoint({e.subject for e in test})
    for entry in val + test:
        image = predict.read_image(root / now_io.IMAGES_DIR / entry.subject / entry.challenge
                                   / entry.image)
        box = now_io.read_face_box(root / now_io.FACE_BOXES_DIR / entry.relative(".npy"))
        assert image.shape == (64, 64, 3)
        assert 0 <= box["left"] < box["right"] <= 64 and 0 <= box["top"] < box["bottom"] <= 64
        # The face is brighter/different from the background inside the box on average.
        assert predict.load_crop(root, entry).shape == (224, 224, 3)
    with pytest.raises(now.NowFileError, match="expected one"):
        now_io.find_scan(root, test[0].subject)  # test scans are not public
    scan_path, pp_path = now_io.find_scan(root, val[0].subject)
    scan, scan_faces = now_io.read_mesh(scan_path)
    truth = np.load(root / synthetic.GROUND_TRUTH_DIR / f"{val[0].subject}.npz")
    score = protocol.score_prediction(scan, now_io.read_pp(pp_path), truth["vertices_m"],
                                      truth["faces"], truth["landmarks7_m"])
    # Only the 0.2 mm scan noise remains: median |normal component| = 0.6745 sigma.
    assert np.median(score.distances_mm) == pytest.approx(0.6745 * config.scan_noise_mm, rel=0.15)
    assert len(score.distances_mm) > 1000


def test_mesh_predictor_wraps_a_code_predictor(face):
    vertices, faces, landmarks = face
    calls = []

    class FakeTrainerPredictor:  # the shape of recon.trainer.Predictor
        flame = type("Flame", (), {"faces": faces})()

        def __call__(self, images):
            return {"batch": len(images)}

        def mesh(self, code, *, neutral=True):
            calls.append(neutral)
            return (np.tile(vertices[None], (code["batch"], 1, 1)),
                    np.tile(landmarks[None], (code["batch"], 1, 1)))

    wrapped = predict.MeshPredictor(FakeTrainerPredictor())
    out_vertices, out_landmarks = wrapped(np.zeros((2, 224, 224, 3), np.float32))
    assert out_vertices.shape == (2, len(vertices), 3) and out_landmarks.shape == (2, 7, 3)
    assert calls == [True]  # NoW scores the neutral (zero expression and pose) mesh
    np.testing.assert_array_equal(wrapped.faces, faces)
