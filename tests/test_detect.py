"""recon.photo.detect: the MediaPipe -> iBUG-68 table, the regressor crop, detection on a real photo."""

import sys

import numpy as np
import pytest

from recon.photo import detect


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


def test_crop_from_box_samples_a_ramp_exactly():
    # A ramp image whose value at pixel column x is x: bilinear sampling (and Pillow's
    # anti-aliasing filter, symmetric) reproduces a linear function, so each crop pixel centre
    # (j + 0.5) maps through the transform to a continuous image coordinate u and reads u - 0.5.
    width, height = 250, 200
    ramp = np.tile(np.arange(width, dtype=np.uint8), (height, 1))
    image = np.stack([ramp, ramp, ramp], -1)
    box = [60.3, 50.7, 160.1, 140.2]
    for size in (224, 64):  # upsampling and downsampling
        crop, transform = detect.crop_from_box(image, box, scale=1.6, size=size)
        assert crop.shape == (size, size, 3) and crop.dtype == np.float32
        side = 1.6 * max(box[2] - box[0], box[3] - box[1])
        np.testing.assert_allclose(transform[0, 0], side / size)
        np.testing.assert_allclose(detect.apply_transform(transform, [[size / 2, size / 2]]),
                                   [[(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]])
        centres = np.stack(np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5), -1)
        mapped = detect.apply_transform(transform, centres.reshape(-1, 2)).reshape(size, size, 2)
        inside = ((mapped[..., 0] > 2 + side / size) & (mapped[..., 0] < width - 2 - side / size)
                  & (mapped[..., 1] > 2 + side / size)
                  & (mapped[..., 1] < height - 2 - side / size))
        assert inside.mean() > 0.5
        np.testing.assert_allclose(crop[..., 0][inside] * 255.0, mapped[..., 0][inside] - 0.5,
                                   atol=0.6)


def test_crop_outside_the_image_is_black():
    image = np.full((100, 100, 3), 200, np.uint8)
    crop, transform = detect.crop_from_box(image, [0, 0, 50, 50], size=80)  # corner at (-15, -15)
    np.testing.assert_allclose(transform[:2, 2], [-15.0, -15.0])
    assert crop[:5, :5].max() == 0.0
    np.testing.assert_allclose(crop[60:, 60:], 200 / 255.0, atol=1e-6)


@pytest.mark.parametrize("box", [[10, 10, 10, 20], [5, 30, 40, 20]])
def test_crop_rejects_empty_boxes(box):
    with pytest.raises(ValueError, match="box must be"):
        detect.crop_from_box(np.zeros((50, 50, 3), np.uint8), box)


def test_crop_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="uint8"):
        detect.crop_from_box(np.zeros((50, 50, 3), np.float32), [0, 0, 10, 10])
    with pytest.raises(ValueError, match="RGB"):
        detect.crop_from_box(np.zeros((50, 50), np.uint8), [0, 0, 10, 10])


def test_read_image_names_a_corrupt_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(detect.ImageReadError, match="broken.jpg"):
        detect.read_image(path)
    with pytest.raises(FileNotFoundError):
        detect.read_image(tmp_path / "missing.png")


def test_missing_extra_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # import mediapipe -> ImportError
    with pytest.raises(detect.PhotoExtraMissing, match=r"facerecon-jax\[photo\]"):
        detect.FaceDetector()


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("mediapipe")
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
    assert (points[:, 0] > x0 - 0.3 * (x1 - x0)).all() and (points[:, 0] < x1 + 0.3 * (x1 - x0)).all()


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
