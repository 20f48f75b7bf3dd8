"""recon.image.detect: the MediaPipe -> iBUG-68 table, detection on a real photo and the face
mesh's crop mapped back to the photo. Tests that run MediaPipe skip when it is not installed."""

import importlib.util
import sys

import numpy as np
import pytest

from recon.image import detect

NO_MEDIAPIPE = ("mediapipe (the optional 'photo' extra: pip install 'facerecon-jax[photo]') is "
                "not installed")


def test_mediapipe_table_is_68_distinct_mesh_vertices():
    table = detect.MEDIAPIPE_TO_IBUG68
    assert table.shape == (68,)
    assert len(set(table.tolist())) == 68
    assert table.min() >= 0 and table.max() < 468  # face-mesh vertices, not the iris points
    assert table[8] == 152  # chin: MediaPipe's lowest midline vertex


def test_landmark_weights():
    weights = detect.landmark_weights(0.25)
    np.testing.assert_array_equal(weights[:17], 0.25)
    np.testing.assert_array_equal(weights[17:], 1.0)


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # import mediapipe -> ImportError
    with pytest.raises(detect.PhotoExtraMissing, match=r"facerecon-jax\[photo\]"):
        detect.FaceDetector()


@pytest.fixture(scope="module")
def detector():
    if importlib.util.find_spec("mediapipe") is None:
        pytest.skip(NO_MEDIAPIPE)
    with detect.FaceDetector() as face_detector:
        yield face_detector


def test_astronaut_face_and_landmark_geometry(detector):
    data = pytest.importorskip("skimage.data")
    image = data.astronaut()
    faces = detector(image)
    assert len(faces) == 1
    face = faces[0]
    x0, y0, x1, y1 = face.box
    # The astronaut's face is around (225, 120) in the 512 x 512 photo, about 100 px wide.
    assert 180 < (x0 + x1) / 2 < 270 and 80 < (y0 + y1) / 2 < 160
    assert 70 < face.box_size < 140
    points = face.landmarks_68
    assert points.shape == (68, 2) and np.isfinite(points).all()
    np.testing.assert_array_equal(points, face.landmarks_478[detect.MEDIAPIPE_TO_IBUG68])
    # iBUG semantics, read off the photo (image x grows to the subject's left):
    # eye corners 36 < 39 < 42 < 45 in x; mouth corners 48 < 54; nose tip 30 between the eyes
    # in x and below them; chin 8 the lowest contour point; brows above eyes above mouth.
    assert points[36, 0] < points[39, 0] < points[42, 0] < points[45, 0]
    assert points[48, 0] < points[54, 0]
    assert points[39, 0] < points[30, 0] < points[42, 0]
    assert points[30, 1] > points[[36, 39, 42, 45], 1].max()
    assert np.argmax(points[:17, 1]) == 8
    assert points[17:27, 1].mean() < points[36:48, 1].mean() < points[48:68, 1].mean()
    # The landmarks lie in the 1.6x crop region of the box.
    margin = 0.3 * (x1 - x0)
    assert (points[:, 0] > x0 - margin).all() and (points[:, 0] < x1 + margin).all()


def test_faceless_photos_give_no_face(detector):
    data = pytest.importorskip("skimage.data")
    assert detector(data.coffee()) == []
    assert detector(np.full((120, 160, 3), 128, np.uint8)) == []


def two_faces_image():
    """The astronaut beside a half-size copy of herself: (512, 768, 3) uint8."""
    from PIL import Image

    data = pytest.importorskip("skimage.data")
    big = data.astronaut()
    small = np.asarray(Image.fromarray(big).resize((256, 256), Image.Resampling.LANCZOS))
    canvas = np.full((512, 768, 3), 235, np.uint8)
    canvas[:, :512] = big
    canvas[128:384, 512:] = small
    return canvas


def test_several_faces_largest_first(detector):
    faces = detector(two_faces_image())
    assert len(faces) == 2
    assert faces[0].box_size > 1.6 * faces[1].box_size
    assert (faces[0].box[0] + faces[0].box[2]) / 2 < 512 < (faces[1].box[0] + faces[1].box[2]) / 2


def test_mesh_landmarks_map_back_through_the_crop(detector):
    """The face mesh runs on `MESH_CROP` and its points come back through `Crop.to_image`: the
    photo moved inside a larger canvas gives the same landmarks, moved (within a pixel)."""
    data = pytest.importorskip("skimage.data")
    image = data.astronaut()
    shift = np.array([37.0, 23.0])
    canvas = np.zeros((600, 580, 3), np.uint8)
    canvas[23:23 + 512, 37:37 + 512] = image
    (box, _), = detector.boxes(image)
    points = detector.landmarks(image, box)
    moved = detector.landmarks(canvas, box + np.tile(shift, 2))
    assert points.shape == moved.shape == (478, 2)
    error = np.linalg.norm(moved - (points + shift), axis=-1)
    assert np.median(error) < 0.5 and error.max() < 1.0, (np.median(error), error.max())
