"""recon.image: the one reader, the crop (similarity + inverse, every anchor), the backbone
preprocessing on host and device, and the synthetic renderer drawing exactly the crop that
`crop_image` cuts from a photo of the same head."""

import io

import cv2
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

import flame_jax
from recon.data import augment, synthetic
from recon.image import crop as crop_lib
from recon.image import io as image_io
from recon.image import preprocess
from recon.render import camera as camera_lib

RNG = np.random.default_rng(0)


# ------------------------------------------------------------------------------------ reader


def _save(path, array, **kwargs):
    Image.fromarray(array).save(path, **kwargs)
    return path


def test_read_image_gives_rgb_uint8_from_every_mode(tmp_path):
    rgb = RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(image_io.read_image(_save(tmp_path / "a.png", rgb)), rgb)
    grey = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    out = image_io.read_image(_save(tmp_path / "g.png", grey))
    assert out.shape == (20, 30, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 1], grey)
    rgba = RNG.integers(0, 256, (20, 30, 4), dtype=np.uint8)
    np.testing.assert_array_equal(image_io.read_image(_save(tmp_path / "a4.png", rgba)),
                                  rgba[..., :3])
    wide = (RNG.integers(0, 65536, (20, 30))).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "w.png")
    out = image_io.read_image(tmp_path / "w.png")
    np.testing.assert_allclose(out[..., 0], np.round(wide / 65535.0 * 255.0), atol=1)


def test_read_image_errors_name_the_file(tmp_path):
    with pytest.raises(image_io.ImageReadError, match="missing.jpg"):
        image_io.read_image(tmp_path / "missing.jpg")
    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    with pytest.raises(image_io.ImageReadError, match="bad.jpg"):
        image_io.read_image(tmp_path / "bad.jpg")
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:200])
    with pytest.raises(image_io.ImageReadError, match="cut.jpg"):
        image_io.read_image(tmp_path / "cut.jpg")


def test_exif_orientation_only_when_asked(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :5] = 255
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    image.save(tmp_path / "o.jpg", exif=exif, quality=100)
    assert image_io.read_image(tmp_path / "o.jpg").shape == (10, 20, 3)
    upright = image_io.read_image(tmp_path / "o.jpg", apply_exif_orientation=True)
    assert upright.shape == (20, 10, 3)


# ------------------------------------------------------------------------------------ crops


def test_box_crop_maps_the_square_onto_the_crop():
    spec = crop_lib.CropSpec(anchor="box", scale=1.6, size=224)
    box = np.array([100.0, 60.0, 180.0, 160.0])  # 80 x 100: mean side 90
    matrix = crop_lib.crop_matrix(spec, box=box)
    side = 1.6 * 90.0
    corners = np.array([[140 - side / 2, 110 - side / 2], [140 + side / 2, 110 + side / 2]])
    np.testing.assert_allclose(crop_lib.transform_points(matrix, corners),
                               [[0, 0], [224, 224]], atol=1e-9)
    back = crop_lib.transform_points(crop_lib.invert(matrix), [[112.0, 112.0]])
    np.testing.assert_allclose(back, [[140.0, 110.0]], atol=1e-9)
    wide = crop_lib.CropSpec(anchor="box", scale=1.6, box_side="max", size=224)
    assert crop_lib.similarity_scale(crop_lib.crop_matrix(wide, box=box)) == pytest.approx(
        224 / 160.0)


def test_crop_errors_are_named():
    with pytest.raises(crop_lib.CropError, match="needs a face box"):
        crop_lib.crop_matrix(crop_lib.CropSpec(), landmarks=np.zeros((68, 2)))
    with pytest.raises(crop_lib.CropError, match="68 landmarks"):
        crop_lib.crop_matrix(crop_lib.CropSpec(anchor="dlib_five_points"), box=[0, 0, 9, 9])
    with pytest.raises(crop_lib.CropError, match="x1 > x0"):
        crop_lib.crop_matrix(crop_lib.CropSpec(), box=[5, 5, 1, 9])
    bad = np.full((68, 2), np.nan)
    with pytest.raises(crop_lib.CropError, match="NaN"):
        crop_lib.crop_matrix(crop_lib.CropSpec(anchor="arcface_five_points"), landmarks=bad)
    with pytest.raises(ValueError, match="anchor"):
        crop_lib.CropSpec(anchor="eyes")


def test_arcface_anchor_equals_skimage_similarity_of_insightface():
    transform = pytest.importorskip("skimage.transform")
    landmarks = RNG.uniform(50, 200, (68, 2))
    spec = crop_lib.CropSpec(anchor="arcface_five_points", size=224)
    ours = crop_lib.crop_matrix(spec, landmarks=landmarks)
    # insightface estimate_norm in OpenCV index coordinates (pixel centres at integers).
    five = crop_lib.arcface_five_points(landmarks) - 0.5
    similarity = transform.SimilarityTransform.from_estimate(
        five, crop_lib.ARCFACE_TEMPLATE_112 * 2.0)
    reference = similarity.params[:2]
    shift = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5]])
    unshift = np.array([[1.0, 0.0, -0.5], [0.0, 1.0, -0.5]])
    np.testing.assert_allclose(ours, crop_lib.compose(shift, crop_lib.compose(reference,
                                                                              unshift)),
                               atol=1e-9)


def test_fit_similarity_matches_skimage():
    transform = pytest.importorskip("skimage.transform")
    source = RNG.uniform(0, 200, (5, 2))
    target = crop_lib.ARCFACE_TEMPLATE_112 + RNG.normal(0, 1.0, (5, 2))
    reference = transform.SimilarityTransform.from_estimate(source, target)
    np.testing.assert_allclose(crop_lib.fit_similarity(source, target), reference.params[:2],
                               atol=1e-9)


def test_arcface_crop_inverts_a_known_similarity():
    angle, scale, shift = np.deg2rad(12.0), 1.8, np.array([80.0, 25.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    # The five points in the image: scale * R @ template + shift (continuous coordinates).
    template = crop_lib.ARCFACE_TEMPLATE_112 + 0.5
    five = scale * template @ rotation.T + shift
    landmarks = np.zeros((68, 2))
    landmarks[36:42], landmarks[42:48] = five[0], five[1]
    landmarks[30], landmarks[48], landmarks[54] = five[2], five[3], five[4]
    height, width = 300, 320
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([xs + 0.5, ys + 0.5, np.zeros_like(xs)], -1)  # each pixel: its centre
    spec = crop_lib.CropSpec(anchor="arcface_five_points", size=112)
    cut = crop_lib.crop_image(image, spec, landmarks=landmarks)
    v, u = np.mgrid[0:112, 0:112].astype(np.float64) + 0.5
    expected = scale * np.stack([u, v], -1) @ rotation.T + shift  # where (u, v) came from
    np.testing.assert_allclose(cut.image[..., :2], expected, atol=2e-2)
    np.testing.assert_allclose(cut.to_crop(five), template, atol=1e-6)


def test_mica_crop_is_insightface_norm_crop(tmp_path, synthetic_model):
    """MICA's `arcface_input` images are insightface's norm_crop at 224: our MICA_CROP on the
    same landmarks gives the same image (insightface's own call: skimage's similarity in pixel
    indices, cv2.warpAffine), and MicaDataset refuses a run whose crop is another window."""
    transform = pytest.importorskip("skimage.transform")
    from recon.data import mica

    image = (RNG.random((300, 280, 3)) * 255).astype(np.uint8)
    image = cv2.GaussianBlur(image, (0, 0), 2.0)  # bilinear differences stay sub-grey-level
    landmarks = crop_lib.transform_points(
        np.array([[1.2, 0.1, 60.0], [-0.1, 1.2, 40.0]]),
        (crop_lib.ARCFACE_TEMPLATE_112[[0, 1, 2, 3, 4]] + 0.5) * 1.0)
    points68 = np.zeros((68, 2))
    points68[36:42], points68[42:48] = landmarks[0], landmarks[1]
    points68[30], points68[48], points68[54] = landmarks[2], landmarks[3], landmarks[4]
    similarity = transform.SimilarityTransform.from_estimate(
        crop_lib.arcface_five_points(points68) - 0.5, crop_lib.ARCFACE_TEMPLATE_112 * 2.0)
    insightface = cv2.warpAffine(image, similarity.params[:2], (224, 224), borderValue=0.0)
    ours = crop_lib.crop_image(image, mica.MICA_CROP, landmarks=points68).image
    assert np.abs(ours * 255.0 - insightface.astype(np.float64)).mean() < 0.5
    with pytest.raises(ValueError, match="norm_crop"):
        mica.MicaDataset(tmp_path, ["X"], model=synthetic_model,
                         crop=crop_lib.CropSpec(anchor="box", size=224))


def test_warp_samples_where_the_matrix_says():
    image = np.zeros((300, 400, 3), np.float32)
    image[140:143, 250:253] = 1.0  # a 3 x 3 dot centred on (251.5, 141.5)
    angle = 0.3
    matrix = np.array([[0.8 * np.cos(angle), -0.8 * np.sin(angle), 20.0],
                       [0.8 * np.sin(angle), 0.8 * np.cos(angle), -90.0]])
    out = crop_lib.warp(image, matrix, 256)
    expected = crop_lib.transform_points(matrix, [[251.5, 141.5]])[0]
    weights = out[..., 0]
    rows, cols = np.mgrid[:256, :256]
    centroid = np.array([(weights * (cols + 0.5)).sum(), (weights * (rows + 0.5)).sum()]) / \
        weights.sum()
    np.testing.assert_allclose(centroid, expected, atol=0.1)
    # Independent reference: scipy's bilinear sampling of the same inverse map.
    import scipy.ndimage
    inverse = crop_lib.invert(matrix)
    points = crop_lib.transform_points(inverse, np.stack([cols.ravel() + 0.5,
                                                          rows.ravel() + 0.5], -1)) - 0.5
    ref = scipy.ndimage.map_coordinates(image[..., 0], [points[:, 1], points[:, 0]], order=1,
                                        mode="constant", cval=0.0).reshape(256, 256)
    np.testing.assert_allclose(out[..., 0], ref, atol=1e-5)


def test_warp_antialiases_strong_shrinks():
    stripes = np.zeros((800, 800, 3), np.float32)
    stripes[:, ::2] = 1.0  # a pattern a point sampler would alias
    matrix = crop_lib.box_matrix([0, 0, 800, 800], size=100, scale=1.0)
    out = crop_lib.warp(stripes, matrix, 100)
    assert abs(float(out[10:-10, 10:-10].mean()) - 0.5) < 0.01
    assert float(out[10:-10, 10:-10].std()) < 0.02


def test_crop_camera_draws_the_crop_of_the_reference_frame():
    points = RNG.normal(0.0, 0.05, (40, 3))
    reference = crop_lib.reference_points(points)
    for angle in (0.0, 0.4, -1.2):
        scale = 1.3
        matrix = np.array([[scale * np.cos(angle), -scale * np.sin(angle), 70.0],
                           [scale * np.sin(angle), scale * np.cos(angle), 40.0]])
        roll, camera = crop_lib.crop_camera(matrix, 150)
        rolled = np.asarray(synthetic._roll(jnp.asarray(points[None], jnp.float32),
                                            jnp.asarray([roll], jnp.float32)))
        drawn = np.asarray(camera_lib.project_to_pixels(
            jnp.asarray(rolled), jnp.asarray([camera], jnp.float32), (150, 150)))[0, :, :2]
        np.testing.assert_allclose(drawn, crop_lib.transform_points(matrix, reference),
                                   atol=2e-3)


def test_template_camera_puts_the_template_where_the_crop_puts_a_face():
    flame = flame_jax.synthetic()
    landmarks = np.asarray(flame_jax.forward(flame, flame_jax.FlameParams.zeros(
        1, flame)).landmarks[0], np.float64)
    for spec in (crop_lib.CropSpec(anchor="box", size=224),
                 crop_lib.CropSpec(anchor="dlib_five_points", size=150),
                 crop_lib.CropSpec(anchor="arcface_five_points", size=224)):
        camera = crop_lib.template_camera(spec, flame)
        drawn = np.asarray(camera_lib.project_to_pixels(
            jnp.asarray(landmarks[None], jnp.float32), jnp.asarray([camera], jnp.float32),
            (spec.size, spec.size)))[0, :, :2]
        reference = crop_lib.reference_points(landmarks)
        matrix = crop_lib.crop_matrix(spec, box=crop_lib.box_from_landmarks(reference),
                                      landmarks=reference)
        # The template is near-frontal: dropping the fitted roll (< 0.3 degrees) moves points
        # by under 0.5 % of the crop.
        np.testing.assert_allclose(drawn, crop_lib.transform_points(matrix, reference),
                                   atol=0.005 * spec.size)


# -------------------------------------------------------------------------- preprocessing

SIZES = [(150, 150), (150, 64), (150, 112), (224, 112), (224, 64), (64, 150), (112, 150),
         (64, 112), (224, 224)]


@pytest.mark.parametrize("source,target", SIZES)
def test_resize_matches_opencv_and_device_matches_host(source, target):
    images = RNG.random((2, source, source, 3)).astype(np.float32)
    host = preprocess.resize(images, target)
    mode = cv2.INTER_AREA if target < source else cv2.INTER_LINEAR
    reference = np.stack([cv2.resize(image, (target, target), interpolation=mode)
                          for image in images])
    np.testing.assert_allclose(host, reference, atol=2e-5)
    device = np.asarray(jax.jit(preprocess.resize_jax, static_argnums=1)(images, target))
    np.testing.assert_allclose(device, host, atol=2e-6)


@pytest.mark.parametrize("kind", ["arcface", "dlib"])
@pytest.mark.parametrize("size", [64, 112, 150, 224])
def test_backbone_input_host_and_device_agree(kind, size):
    crops = RNG.integers(0, 256, (2, size, size, 3)).astype(np.uint8)
    host = preprocess.backbone_input(crops, kind, max_value=255.0)
    device = np.asarray(preprocess.backbone_input_jax(
        jnp.asarray(crops, jnp.float32) / 255.0, kind))
    tolerance = 1e-5 if kind == "arcface" else 2e-3  # dlib's input is in 0..255
    np.testing.assert_allclose(device, host, atol=tolerance)
    n = preprocess.BACKBONE_INPUT_SIZE[kind]
    assert host.shape == (2, n, n, 3)
    if kind == "arcface" and size == 224:  # an exact 2 x 2 average (MICA's blob)
        expected = crops.astype(np.float64).reshape(2, 112, 2, 112, 2, 3).mean((2, 4))
        np.testing.assert_allclose(host, (expected - 127.5) / 127.5, atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        preprocess.backbone_input(np.full((1, size, size, 3), np.nan, np.float32), kind)
    with pytest.raises(ValueError, match="kind"):
        preprocess.backbone_input(crops, "vgg")


# --------------------------------------------- synthetic crops equal crops cut from a photo


@pytest.mark.parametrize("anchor", ["box", "dlib_five_points", "arcface_five_points"])
def test_synthetic_renders_the_crop_that_crop_image_cuts_from_a_photo(anchor):
    """The generator draws the crop straight into the crop frame; cutting the same crop from
    a wide 'photo' of the same head with `crop_image` must give the same image and points."""
    flame = flame_jax.synthetic()
    spec = crop_lib.CropSpec(anchor=anchor, size=96, padding=0.25, scale=1.6)
    config = synthetic.SyntheticConfig(crop=spec, landmark_noise=0.0, box_scale_jitter=0.0,
                                       box_shift_jitter=0.0, perspective_probability=0.0,
                                       augment=augment.AugmentConfig.clean(), max_roll_deg=15)
    host = synthetic.HostModel.from_model(flame)
    scenes = synthetic.sample_scenes(host, config, 3, [0, 1], seed=0)
    device_scenes = jax.tree.map(jnp.asarray, scenes)
    landmarks_3d = np.asarray(synthetic.scene_landmarks(flame, device_scenes), np.float64)
    geometry = synthetic.crop_geometry(landmarks_3d, scenes, config)
    cropped = synthetic.render_scenes(flame, device_scenes, jnp.asarray(geometry.roll),
                                      jnp.asarray(geometry.camera),
                                      settings=config.raster_settings)
    # The photo: the reference frame (u = 1000 x, v = -1000 y) shifted into a 400 px image.
    photo_size, offset = 400, 200.0
    photo_camera = np.array([[2000.0 / photo_size, 0.0, 0.0]] * 2, np.float32)
    photo = synthetic.render_scenes(
        flame, device_scenes, jnp.zeros(2), jnp.asarray(photo_camera),
        settings=synthetic.rasterizer.RasterSettings(photo_size, photo_size))
    for k in range(2):
        photo_points = crop_lib.reference_points(landmarks_3d[k]) + offset
        np.testing.assert_allclose(np.asarray(photo.landmarks[k]), photo_points, atol=1e-3)
        box = crop_lib.box_from_landmarks(photo_points)
        image = np.asarray(photo.foreground[k]) * np.asarray(photo.alpha[k])[..., None]
        cut = crop_lib.crop_image(np.clip(image, 0, 1), spec, box=box, landmarks=photo_points)
        np.testing.assert_allclose(cut.to_crop(photo_points),
                                   np.asarray(cropped.landmarks[k]), atol=0.05)
        drawn = np.clip(np.asarray(cropped.foreground[k]), 0, 1) * np.asarray(
            cropped.alpha[k])[..., None]
        # Same image up to resampling: the photo is rendered at a similar scale and resampled.
        difference = np.abs(cut.image - drawn).mean()
        assert difference < 0.02, difference
