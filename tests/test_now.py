"""NoW: exact distances vs brute force, protocol invariances, readers, the crop through the
image contract (box, detected landmarks, fallback), prediction with a tiny random regressor,
the mean face in eval.py's output, and the NoW evaluator used during training."""

import dataclasses
import json
import pathlib
import shutil
import types

import numpy as np
import pytest
import trimesh
from scipy.spatial.transform import Rotation

from recon import now
from recon.image import crop as crop_lib
from recon.image import detect
from recon.now import cli, distance, io as now_io, predict, protocol, scoring
from recon.types import NOW_LANDMARKS_68

NUM_CONTOUR = 17  # FLAME's 68 landmarks = 17 contour points + the 51 static ones


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def face(flame_topology, landmark_embedding):
    """The FLAME template head (no eyeballs) in mm and its 7 NoW landmarks in mm."""
    vertices = np.asarray(flame_topology["v_template"], np.float64) * 1000.0
    faces = np.asarray(flame_topology["faces"], np.int64)
    index = np.asarray(NOW_LANDMARKS_68) - NUM_CONTOUR
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
    assert v.shape == (4, 3) and v.dtype == np.float64 and f.dtype == np.int64
    assert [sorted(t) for t in f.tolist()] == [[0, 1, 2], [0, 2, 3], [0, 1, 2]]
    trimesh.Trimesh(vertices, faces, process=False).export(tmp_path / "m.ply")
    v, f = now_io.read_mesh(tmp_path / "m.ply")
    np.testing.assert_allclose(v, vertices, atol=1e-4)
    np.testing.assert_array_equal(f, faces)
    now_io.write_mesh(tmp_path / "new" / "m.obj", vertices, faces)  # creates the folder
    v, f = now_io.read_mesh(tmp_path / "new" / "m.obj")
    np.testing.assert_allclose(v, vertices, atol=1e-5)
    np.testing.assert_array_equal(f, faces)
    (tmp_path / "bad.obj").write_text("v 0 0 0\nv 1 0 0\nv 1 1 0\nf 1 2 9\n")
    with pytest.raises(now.NowFileError, match=r"bad\.obj: cannot read mesh"):
        now_io.read_mesh(tmp_path / "bad.obj")
    (tmp_path / "text.obj").write_text("v 0 zero 0\nf 1 1 1\n")
    with pytest.raises(now.NowFileError, match=r"text\.obj: cannot read mesh"):
        now_io.read_mesh(tmp_path / "text.obj")
    with pytest.raises(now.NowFileError, match=r"absent\.obj: file not found"):
        now_io.read_mesh(tmp_path / "absent.obj")


# ----------------------------------------------------------------------------- end to end

def _write_dataset(root, face, num_subjects=2, images=(("multiview_neutral", 2), ("selfie", 1))):
    """A NoW-layout dataset (scans = the template head moved, in mm) and a perfect prediction
    folder (the template in metres) with a known per-image similarity."""
    vertices, faces, landmarks = face
    entries = []
    for s in range(num_subjects):
        subject = f"subject_{s}"
        scan = _similarity(vertices, 10 + s, 1.0)
        now_io.write_mesh(root / "scans" / subject / "scan.obj", scan, faces)
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
    # --predictions folders: no mean face, no crop fallbacks (nothing was predicted here).
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



# ----------------------------------------------------------------------------- the built-in split

@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory, synthetic_model):
    """One validation and one test subject, one 192 px image per challenge (MediaPipe finds
    these faces at 192 px; at 128 it misses the selfie)."""
    from recon.now import synthetic

    config = synthetic.SyntheticNowConfig(
        num_val_subjects=1, num_test_subjects=1, image_size=192, subdivisions=1,
        images_per_challenge=tuple((c, 1) for c in now.CHALLENGES))
    root = synthetic.ensure_synthetic_split(config, root=tmp_path_factory.mktemp("now") / "split",
                                            progress=False, model=synthetic_model)
    return config, root


def test_synthetic_split_has_the_now_layout_and_scores_its_ground_truth(tiny_split):
    from recon.image import read_image
    from recon.now import synthetic

    config, root = tiny_split
    assert synthetic.ensure_synthetic_split(config, root=root) == root  # cached: no rebuild
    val = now_io.read_image_list(root / "imagepathsvalidation.txt")
    test = now_io.read_image_list(root / "imagepathstest.txt")
    assert [e.challenge for e in val] == list(now.CHALLENGES) and len(test) == 4
    assert {e.subject for e in val}.isdisjoint({e.subject for e in test})
    spec = crop_lib.CropSpec(anchor="box", size=224)
    for entry in val + test:
        image = read_image(predict.image_path(root, entry))
        box = now_io.read_face_box(predict.face_box_path(root, entry))
        assert image.shape == (192, 192, 3) and image.dtype == np.uint8
        assert 0 <= box["left"] < box["right"] <= 192 and 0 <= box["top"] < box["bottom"] <= 192
        source = predict.CropSource(box=now_io.face_box_array(box))
        assert predict.load_crop(root, entry, spec, source).image.shape == (224, 224, 3)
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


# ----------------------------------------------------------------------------- crops

def test_now_box_crop_is_crop_image_on_the_box_and_deca_window(tmp_path):
    from PIL import Image

    from recon.image import read_image

    entry = now_io.ImageEntry("subject", "selfie", "IMG_0001.jpg")
    pixels = np.random.default_rng(4).integers(0, 256, (300, 320, 3), dtype=np.uint8)
    predict.image_path(tmp_path, entry).parent.mkdir(parents=True)
    Image.fromarray(pixels).save(predict.image_path(tmp_path, entry), "JPEG")
    box = {"left": 100.0, "right": 180.0, "top": 60.0, "bottom": 160.0}
    now_io.write_face_box(predict.face_box_path(tmp_path, entry), box)
    spec = crop_lib.CropSpec(anchor="box", size=224, scale=1.6, box_side="mean")
    [source] = predict.crop_sources(tmp_path, [entry], spec, flame=None, progress=False)
    crop = predict.load_crop(tmp_path, entry, spec, source)
    expected = crop_lib.crop_image(read_image(predict.image_path(tmp_path, entry)), spec,
                                   box=[100.0, 60.0, 180.0, 160.0])
    np.testing.assert_array_equal(crop.matrix, expected.matrix)
    np.testing.assert_array_equal(crop.image, expected.image)
    # DECA's NoW window: side int(1.6 x mean side) around the box centre; its corners are the
    # crop's corners within a pixel.
    side = int(1.6 * (80 + 100) / 2)
    corners = crop.to_crop([[140 - side / 2, 110 - side / 2], [140 + side / 2, 110 + side / 2]])
    np.testing.assert_allclose(corners, [[0, 0], [224, 224]], atol=1.0)


def test_fallback_landmarks_put_the_template_box_on_the_now_box():
    template = np.random.default_rng(5).normal(0, 40, (68, 2))
    box = np.array([30.0, 45.0, 130.0, 160.0])
    moved = predict.fallback_landmarks(template, box)
    # Same centre and mean side (a uniform scale cannot match both sides of another aspect).
    own = crop_lib.box_from_landmarks(moved)
    np.testing.assert_allclose((own[:2] + own[2:]) / 2, (box[:2] + box[2:]) / 2, atol=1e-9)
    np.testing.assert_allclose(np.sum(own[2:] - own[:2]), np.sum(box[2:] - box[:2]), atol=1e-9)
    # A similarity: relative distances are kept.
    ratio = (np.linalg.norm(moved[1:] - moved[0], axis=1)
             / np.linalg.norm(template[1:] - template[0], axis=1))
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


def _points_with_relation(rng, box, relation):
    """(68, 2) random face-like points whose landmark box sits under `box` as `relation` says."""
    points = rng.normal(0.0, 30.0, (68, 2)) * [1.0, 1.2]
    return predict.place_on_box(points, box, relation)


def test_box_relation_is_measured_and_inverted_by_place_on_box():
    rng = np.random.default_rng(2)
    relation = predict.BoxRelation(scale=1.12, shift=(0.03, -0.06))
    boxes = [np.array([x, y, x + w, y + w * 1.2]) for x, y, w in
             rng.uniform([0, 0, 60], [200, 200, 140], (12, 3))]
    pairs = [(_points_with_relation(rng, box, relation), box) for box in boxes]
    for points, box in pairs:  # place_on_box puts each exactly where the relation says
        scale, shift = predict.relation_of(points, box)
        np.testing.assert_allclose([scale, *shift], [1.12, 0.03, -0.06], atol=1e-9)
        assert predict.box_deviation(points, box, relation) < 1e-9
    # Two detections pulled off their faces do not move the median.
    pairs[0] = (pairs[0][0] * 1.4, pairs[0][1])
    pairs[1] = (pairs[1][0] + [40.0, 0.0], pairs[1][1])
    measured = predict.measure_box_relation(pairs)
    assert abs(measured.scale - 1.12) < 1e-9 and np.allclose(measured.shift, (0.03, -0.06))
    assert predict.box_deviation(*pairs[0], measured) > 0.3
    assert predict.box_deviation(*pairs[1], measured) > 0.3
    # Too few detections to measure: NoW's box is taken as the landmark box.
    few = pairs[:predict.MIN_RELATION_DETECTIONS - 1]
    assert predict.measure_box_relation(few) == predict.BoxRelation()
    # A known deviation: 10 % larger box -> log(1.1); centre 0.05 sides off -> 0.05.
    points, box = pairs[5]
    side = np.sum(crop_lib.box_from_landmarks(points)[2:] - crop_lib.box_from_landmarks(points)[:2]) / 2
    bigger = predict.place_on_box(points, box, predict.BoxRelation(1.12 / 1.1, relation.shift))
    np.testing.assert_allclose(predict.box_deviation(bigger, box, relation), np.log(1.1), atol=1e-9)
    shifted = points + [0.05 * side, 0.0]
    np.testing.assert_allclose(predict.box_deviation(shifted, box, relation), 0.05, atol=1e-9)


def test_crop_sources_move_stray_detections_onto_the_box(tmp_path, synthetic_model):
    rng = np.random.default_rng(4)
    relation = predict.BoxRelation(scale=1.05, shift=(0.0, 0.04))
    entries = [now_io.ImageEntry(f"S{i:02d}", "multiview_neutral", "IMG_0000.jpg")
               for i in range(12)]
    folder = predict.landmark_cache_dir(tmp_path / "now", entries, tmp_path / "cache")
    cached = {}
    for index, entry in enumerate(entries):
        box = np.array([50.0 + index, 40.0, 150.0 + index, 160.0])
        now_io.write_face_box(predict.face_box_path(tmp_path / "now", entry),
                              dict(zip(("left", "top", "right", "bottom"), box)))
        points = _points_with_relation(rng, box, relation)
        if index == 9:  # pulled off the face by an occluder: half the size, off-centre
            points = (points - points.mean(0)) * 0.5 + points.mean(0) + [25.0, 0.0]
        if index == 10:
            points = np.zeros((0, 2))  # no face
        if index == 11:
            points = np.full((68, 2), 90.0)  # collapsed to a point: no face either
        cached[entry.key] = points
        now_io.write_file(folder / entry.relative(".npy"),
                          lambda handle, array=points.astype(np.float32): np.save(handle, array))

    def no_detector():
        raise AssertionError("every image's landmarks are cached")

    spec = crop_lib.CropSpec(anchor="dlib_five_points", size=150)
    sources = predict.crop_sources(tmp_path / "now", entries, spec, synthetic_model,
                                   cache_dir=tmp_path / "cache", detector_factory=no_detector,
                                   progress=False)
    for source, entry in zip(sources[:9], entries):  # consistent detections are used as they are
        assert not source.fallback and not source.box_corrected
        np.testing.assert_allclose(source.landmarks, cached[entry.key], atol=1e-4)
    stray, missing, collapsed = sources[9], sources[10], sources[11]
    assert stray.box_corrected and not stray.fallback
    assert missing.fallback and not missing.box_corrected
    assert collapsed.fallback and np.all(np.isfinite(collapsed.landmarks))
    for source in (stray, missing, collapsed):  # both sit on NoW's box as the measured relation says
        scale, shift = predict.relation_of(source.landmarks, source.box)
        np.testing.assert_allclose([scale, *shift], [1.05, 0.0, 0.04], atol=1e-3)
    # With no check every detection is used as found.
    unchecked = predict.crop_sources(tmp_path / "now", entries, spec, synthetic_model,
                                     cache_dir=tmp_path / "cache", detector_factory=no_detector,
                                     progress=False, max_box_deviation=float("inf"))
    assert not any(source.box_corrected for source in unchecked)
    np.testing.assert_allclose(unchecked[9].landmarks, cached[entries[9].key], atol=1e-4)
    # The stray detection keeps its own shape (a scale and a shift of it, no rotation).
    original = cached[entries[9].key]
    ratio = (np.linalg.norm(stray.landmarks[1:] - stray.landmarks[0], axis=1)
             / np.linalg.norm(original[1:] - original[0], axis=1))
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)
    np.testing.assert_allclose(stray.landmarks[1:] - stray.landmarks[0],
                               ratio[0] * (original[1:] - original[0]), atol=1e-3)


def test_refine_sources_recrop_untrusted_faces_from_the_models_landmarks(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(6)
    spec = crop_lib.CropSpec(anchor="dlib_five_points", size=150)
    template = crop_lib.reference_points(rng.normal(0.0, 0.04, (68, 3)) * [1.0, 1.2, 0.5])
    entries, sources = [], []
    for index in range(10):
        entry = now_io.ImageEntry(f"S{index:02d}", "multiview_occlusions", "IMG_0000.jpg")
        path = predict.image_path(tmp_path, entry)
        path.parent.mkdir(parents=True)
        Image.fromarray(rng.integers(0, 255, (200, 200, 3), dtype=np.uint8)).save(path)
        box = np.array([40.0 + index, 30.0, 150.0 + index, 160.0])
        points = predict.place_on_box(template, box)
        entries.append(entry)
        sources.append(predict.CropSource(box=box, landmarks=points,
                                          box_corrected=index == 8, fallback=index == 9))

    class FakePredictor:  # its landmarks: the same crop points for every crop
        crop = spec

        def __init__(self, crop_points):
            self.crop_points = crop_points
            self.calls = 0

        def __call__(self, images):
            assert images.shape[1:] == (150, 150, 3)
            self.calls += 1
            return len(images)

        def landmarks_2d(self, count):
            return np.broadcast_to(self.crop_points, (count, 68, 2))

    # The model's landmarks: the template's, 2 % larger and 3 px off in the crop.
    chip = predict.load_crop(tmp_path, entries[8], spec, sources[8])
    crop_points = (chip.to_crop(sources[8].landmarks) - 75.0) * 1.02 + 75.0 + [3.0, 0.0]
    model = FakePredictor(crop_points)
    refined = predict.refine_sources(tmp_path, entries, sources, model)
    assert model.calls == 1  # the two untrusted crops in one batch
    for index in range(8):
        assert refined[index] is sources[index]
    for index in (8, 9):
        assert refined[index].refined and refined[index].box is sources[index].box
        first = predict.load_crop(tmp_path, entries[index], spec, sources[index])
        np.testing.assert_allclose(refined[index].landmarks, first.to_image(crop_points),
                                   atol=1e-6)
        assert refined[index].fallback == sources[index].fallback
    # Landmarks far off NoW's box (half the face's size) are not used.
    shrunk = FakePredictor((crop_points - 75.0) * 0.5 + 75.0)
    kept = predict.refine_sources(tmp_path, entries, sources, shrunk)
    assert [source.refined for source in kept] == [False] * 10
    assert all(a is b for a, b in zip(kept, sources))


# ----------------------------------------------------------------------------- a tiny model

@pytest.fixture(scope="module")
def tiny_model(synthetic_model):
    """A randomly initialised tiny IResNet regressor and its `Predictor` (box crop, 64 px).

    The backbone's weights are drawn with numpy from `jax.eval_shape` of its init (compiling
    the backbone's init costs ~50 s on 2 shared CPUs); the head is initialised by
    `build.init_variables` as it is for imported backbone weights.
    """
    import jax
    import jax.numpy as jnp

    from recon import inference
    from recon.model import build

    options = build.ModelOptions(stages=(1, 1, 1, 1), width=4, embedding_size=16,
                                 head_hidden_size=16, head_num_hidden=1)
    spec = crop_lib.CropSpec(anchor="box", size=64)
    model, _ = build.build_model(options, camera=crop_lib.template_camera(spec, synthetic_model),
                                 load_weights=False)
    shapes = jax.eval_shape(model.backbone.init, jax.random.key(0),
                            jnp.zeros((1,) + build.input_shape(options)))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if name.endswith(("['var']", "['scale']")):
            return np.ones(leaf.shape, np.float32)
        if name.endswith(("['mean']", "['bias']")):
            return np.zeros(leaf.shape, np.float32)
        if name.endswith("['alpha']"):
            return np.full(leaf.shape, 0.25, np.float32)
        fan_in = int(np.prod(leaf.shape[:-1])) or 1
        return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    imported = jax.tree_util.tree_map_with_path(
        draw, {"params": shapes["params"], "batch_stats": shapes.get("batch_stats", {})})
    variables = build.init_variables(model, imported, 0, options)
    predictor = inference.predictor_from_variables(model, variables, crop=spec,
                                                   input_kind=options.input_kind,
                                                   flame=synthetic_model, step=7)
    return types.SimpleNamespace(model=model, variables=variables, predictor=predictor)


def _template_predictions(folder, entries, flame):
    """The FLAME template (v_template, its 7 NoW landmarks) as every entry's prediction."""
    import flame_jax

    landmarks = flame_jax.forward(flame, flame_jax.FlameParams.zeros(1, flame)).landmarks[0]
    landmarks7 = np.asarray(landmarks)[list(NOW_LANDMARKS_68)]
    for entry in entries:
        now_io.write_prediction(folder, entry, np.asarray(flame.v_template),
                                np.asarray(flame.faces), landmarks7)


def test_eval_with_a_checkpoint_scores_the_mean_face(tiny_split, tiny_model, synthetic_model,
                                                     tmp_path):
    _, root = tiny_split
    lines = []
    request = cli.EvalRequest(now_root=str(root), checkpoint="runs/tiny",
                              output=str(tmp_path / "out"), workers=1, progress=False)
    assert cli.run(request, predictor_factory=lambda _: tiny_model.predictor,
                   out=lines.append) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results) == {"all", "per_challenge", "per_image", "missing", "metrical", "protocol",
                            "mean_face", "crop_fallbacks", "crop_corrections"}
    assert results["crop_fallbacks"] == []  # a box-anchored model needs no landmarks
    assert results["crop_corrections"] == []
    mean_face = results["mean_face"]
    assert set(mean_face) == {"median_mm", "mean_mm", "std_mm", "per_challenge"}
    assert set(mean_face["per_challenge"]) == set(now.CHALLENGES)
    entries = now_io.read_image_list(root / "imagepathsvalidation.txt")
    for entry in entries:
        assert (tmp_path / "out" / "predictions" / entry.relative(".obj")).is_file()
    # The mean-face entry is the score of a folder of template predictions, made independently.
    _template_predictions(tmp_path / "template", entries, synthetic_model)
    direct = scoring.evaluate_predictions(root, tmp_path / "template", workers=1, progress=False)
    for key, value in scoring.summary(direct.all_distances()).items():
        assert mean_face[key] == pytest.approx(value, rel=1e-5)
    for challenge in now.CHALLENGES:
        expected = scoring.summary(direct.all_distances(challenge))
        for key, value in expected.items():
            assert mean_face["per_challenge"][challenge][key] == pytest.approx(value, rel=1e-5)
    table = "\n".join(map(str, lines))
    assert "| tiny | all | 4 |" in table and "| mean face | all | 4 |" in table
    assert "| mean face | selfie | 1 |" in table
    # The test split: exported for submission, nothing scored, no mean face.
    export = cli.EvalRequest(now_root=str(root), split="test", checkpoint="runs/tiny",
                             output=str(tmp_path / "export"), progress=False)
    assert cli.run(export, predictor_factory=lambda _: tiny_model.predictor,
                   out=lambda *_: None) == 0
    test_entries = now_io.read_image_list(root / "imagepathstest.txt")
    assert (tmp_path / "export" / "predictions" / test_entries[0].relative(".obj")).is_file()
    assert not (tmp_path / "export" / "results.json").exists()
    assert not (tmp_path / "export" / cli.MEAN_FACE_DIR).exists()


def test_eval_reports_an_unloadable_checkpoint(tiny_split, tmp_path, capsys):
    _, root = tiny_split
    request = cli.EvalRequest(now_root=str(root), checkpoint=str(tmp_path / "empty"),
                              output=str(tmp_path / "out"), progress=False)
    assert cli.run(request, out=lambda *_: None) == cli.EXIT_ERROR
    assert "holds no regressor checkpoint" in capsys.readouterr().err


def _tree(root):
    return sorted(str(path.relative_to(root)) for path in pathlib.Path(root).rglob("*"))


def test_landmark_crops_are_detected_once_cached_and_fall_back(tiny_split, tiny_model,
                                                                synthetic_model, tmp_path,
                                                                monkeypatch):
    pytest.importorskip("mediapipe", reason="landmark-anchored NoW crops detect faces with "
                                            "mediapipe: pip install 'facerecon-jax[photo]'")
    from PIL import Image

    root = tmp_path / "now"
    shutil.copytree(tiny_split[1], root)
    entries = now_io.read_image_list(root / "imagepathsvalidation.txt")
    blank = entries[0]
    Image.fromarray(np.full((192, 192, 3), 120, np.uint8)).save(predict.image_path(root, blank),
                                                                 "JPEG")
    monkeypatch.setenv("FACERECON_CACHE_DIR", str(tmp_path / "cache"))
    before = _tree(root)
    spec = crop_lib.CropSpec(anchor="arcface_five_points", size=64)
    sources = predict.crop_sources(root, entries, spec, synthetic_model, progress=False)
    assert sources[0].fallback and sources[0].landmarks.shape == (68, 2)
    detected = [source for source in sources[1:] if not source.fallback]
    assert len(detected) >= 2  # MediaPipe finds the rendered faces (all 3 when this was written)
    for source in detected:  # the detected face is the one in NoW's box
        assert detect.box_iou(crop_lib.box_from_landmarks(source.landmarks), source.box) > 0.5
    folder = predict.landmark_cache_dir(root, entries)
    assert folder.parent == tmp_path / "cache" / predict.LANDMARKS_DIR
    assert np.load(folder / blank.relative(".npy")).shape == (0, 2)  # "no face" is recorded
    assert np.load(folder / entries[1].relative(".npy")).shape in ((68, 2), (0, 2))

    def no_detector():
        raise AssertionError("every image's landmarks should come from the cache")

    again = predict.crop_sources(root, entries, spec, synthetic_model, progress=False,
                                 detector_factory=no_detector)
    for first, second in zip(sources, again):
        np.testing.assert_allclose(first.landmarks, second.landmarks, atol=1e-4)
        assert first.fallback == second.fallback
    # The whole evaluation with a landmark-anchored model: the fallback is reported.
    predictor = dataclasses.replace(tiny_model.predictor, crop=spec)
    lines = []
    request = cli.EvalRequest(now_root=str(root), checkpoint="runs/tiny",
                              output=str(tmp_path / "out"), workers=1, progress=False)
    assert cli.run(request, predictor_factory=lambda _: predictor, out=lines.append) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    fallbacks = sorted(e.key for e, s in zip(entries, sources) if s.fallback)
    assert results["crop_fallbacks"] == fallbacks and blank.key in fallbacks
    corrected = sorted(e.key for e, s in zip(entries, sources) if s.box_corrected)
    assert results["crop_corrections"] == corrected
    assert any(blank.key in str(line) and "template" in str(line) for line in lines)
    assert len(results["per_image"]) == len(entries)
    assert _tree(root) == before  # the NoW root is only read


def test_landmark_model_without_mediapipe_names_the_install(tiny_split, tiny_model,
                                                           synthetic_model, tmp_path,
                                                           monkeypatch, capsys):
    def missing():
        raise detect.PhotoExtraMissing("No module named 'mediapipe'")

    monkeypatch.setattr(detect, "_mediapipe", missing)
    monkeypatch.setenv("FACERECON_CACHE_DIR", str(tmp_path / "cache"))
    _, root = tiny_split
    entries = now_io.read_image_list(root / "imagepathsvalidation.txt")
    spec = crop_lib.CropSpec(anchor="dlib_five_points", size=64)
    with pytest.raises(detect.PhotoExtraMissing,
                       match=r"'dlib_five_points'.*pip install 'facerecon-jax\[photo\]'"):
        predict.crop_sources(root, entries, spec, synthetic_model, progress=False)
    predictor = dataclasses.replace(tiny_model.predictor, crop=spec)
    request = cli.EvalRequest(now_root=str(root), output=str(tmp_path / "out"), progress=False)
    assert cli.run(request, predictor_factory=lambda _: predictor,
                   out=lambda *_: None) == cli.EXIT_ERROR
    assert "pip install 'facerecon-jax[photo]'" in capsys.readouterr().err
    assert not (tmp_path / "out" / "predictions").exists()


# ----------------------------------------------------------------------------- during training

def test_now_evaluator_scores_the_state_and_marks_the_best(tiny_split, tiny_model,
                                                           synthetic_model, tmp_path):
    from recon.training.regressor import now_eval
    from recon.training.regressor.options import EvalOptions

    _, root = tiny_split
    predictor = tiny_model.predictor
    options = types.SimpleNamespace(
        eval=EvalOptions(now_root=str(root), now_split="val", now_workers=1),
        data=types.SimpleNamespace(crop=predictor.crop),
        model=types.SimpleNamespace(input_kind=predictor.input_kind))
    evaluator = now_eval.NowEvaluator(options, tiny_model.model, synthetic_model,
                                      tmp_path / "run")
    state = types.SimpleNamespace(params=tiny_model.variables["params"],
                                  batch_stats=tiny_model.variables["batch_stats"])
    first = evaluator(0, state)
    keys = {f"now_{prefix}{stat}_mm" for prefix in ("", "mean_face_")
            for stat in ("median", "mean", "std")}
    assert set(first) == keys and all(np.isfinite(value) and value > 0 for value in first.values())
    entries = now_io.read_image_list(root / "imagepathsvalidation.txt")
    for entry in entries:
        assert (tmp_path / "run" / "now" / "step_0" / entry.relative(".obj")).is_file()
    direct = scoring.evaluate_predictions(root, tmp_path / "run" / "now" / "step_0", workers=1,
                                          progress=False)
    assert first["now_median_mm"] == pytest.approx(np.median(direct.all_distances()))
    second = evaluator(5, state)  # same parameters, same scores (no recompilation either)
    assert second == pytest.approx(first)
    history = [{"step": 0, **first}, {"step": 5, **second, "now_median_mm": 0.5},
               {"step": 6}]
    now_eval.NowEvaluator.mark_best(history)
    assert [entry["now_best"] for entry in history] == [False, True, False]
    with pytest.raises(ValueError, match="test scans"):
        now_eval.NowEvaluator(types.SimpleNamespace(**{**vars(options), "eval": EvalOptions(
            now_root=str(root), now_split="test")}), tiny_model.model, synthetic_model, tmp_path)


def test_predictor_landmarks_are_the_photo_paths(tiny_model):
    from recon.photo import fitting

    predictor = tiny_model.predictor
    crops = np.random.default_rng(1).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    code = predictor(crops)
    points = np.asarray(predictor.landmarks_2d(code))
    assert points.shape == (2, 68, 2) and np.all(np.isfinite(points))
    expected = np.asarray(fitting.landmarks_2d(code, predictor.flame, image_size=64))
    np.testing.assert_allclose(points, expected, atol=1e-4)
