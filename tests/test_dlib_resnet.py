"""dlib's face-recognition ResNet in Flax (`recon.model.dlib_resnet`) and dlib's face-chip
alignment (`recon.image.dlib_align`), checked against dlib itself.

Needs `dlib-bin` and `face_recognition_models` (skipped otherwise). Only the face-recognition
network and the 5-point shape predictor are loaded, never the 68-point predictor (its training
data is non-commercial).
"""

import hashlib
import itertools
import pathlib
import sys
import time

import numpy as np
import pytest

# dlib itself is the reference (the `dev` extra's dlib-bin); face_recognition_models, which
# ships the network's file, is a core dependency.
dlib = pytest.importorskip("dlib", reason="dlib is not installed (pip install dlib-bin)")

import face_recognition_models  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from recon.image import crop as crop_lib  # noqa: E402
from recon.image import dlib_align, similarity  # noqa: E402
from recon.model import dlib_resnet  # noqa: E402
from recon.model.dlib_resnet import (DESCRIPTOR_SIZE, FEATURE_POINTS, INPUT_SIZE,  # noqa: E402
                                     LEVEL_NAMES, DlibModelError, DlibResNet,
                                     import_dlib_resnet)

DESCRIPTOR_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def model_path():
    return pathlib.Path(face_recognition_models.face_recognition_model_location())


@pytest.fixture(scope="module")
def model_bytes(model_path):
    return model_path.read_bytes()


@pytest.fixture(scope="module")
def imported(model_path, tmp_path_factory):
    return import_dlib_resnet(model_path, cache_dir=tmp_path_factory.mktemp("dlib_cache"))


@pytest.fixture(scope="module")
def astronaut():
    skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is not installed")
    return np.ascontiguousarray(skimage_data.astronaut())


@pytest.fixture(scope="module")
def astronaut_five(astronaut):
    """dlib's 5-point predictor on the astronaut's face: (det, (5, 2) int points)."""
    detector = dlib.get_frontal_face_detector()
    rects, scores, _ = detector.run(astronaut, 0, 0.0)
    assert len(rects) >= 1, "dlib's HOG detector found no face in skimage's astronaut"
    rect = rects[int(np.argmax(scores))]
    predictor = dlib.shape_predictor(
        face_recognition_models.pose_predictor_five_point_model_location())
    shape = predictor(astronaut, rect)
    assert shape.num_parts == 5
    points = np.array([[shape.part(i).x, shape.part(i).y] for i in range(5)], np.float64)
    return shape, points


@pytest.fixture(scope="module")
def chips(astronaut, astronaut_five):
    """(4, 150, 150, 3) uint8: two noise chips, a smooth gradient, the astronaut's face chip."""
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (INPUT_SIZE, INPUT_SIZE, 3), dtype=np.uint8) for _ in range(2)]
    yy, xx = np.mgrid[0:INPUT_SIZE, 0:INPUT_SIZE]
    gradient = np.stack([xx * 255 // 149, yy * 255 // 149, 255 - (xx + yy) * 255 // 298], -1)
    face = dlib.get_face_chip(astronaut, astronaut_five[0], size=INPUT_SIZE, padding=0.25)
    return np.stack(noise + [gradient.astype(np.uint8), face])


@pytest.fixture(scope="module")
def dlib_descriptors(model_path, chips):
    net = dlib.face_recognition_model_v1(str(model_path))
    return np.array([np.array(net.compute_face_descriptor(np.ascontiguousarray(chip)))
                     for chip in chips])


@pytest.fixture(scope="module")
def our_descriptors(imported, chips):
    module, variables = imported
    return np.asarray(module.apply(variables, jnp.asarray(chips, jnp.float32)))


# ------------------------------------------------------------------------------ the network


def test_descriptors_match_dlib(our_descriptors, dlib_descriptors):
    assert our_descriptors.shape == (4, DESCRIPTOR_SIZE)
    assert our_descriptors.dtype == np.float32
    error = np.abs(our_descriptors - dlib_descriptors).max()
    print(f"max |ours - dlib| over {len(our_descriptors)} chips: {error:.3g}")
    assert error <= DESCRIPTOR_TOLERANCE
    # Not a vacuous comparison: the chips give clearly different descriptors.
    assert np.abs(dlib_descriptors[0] - dlib_descriptors[3]).max() > 0.05


def test_descriptors_match_dlib_under_jit(imported, chips, dlib_descriptors):
    module, variables = imported
    out = np.asarray(jax.jit(module.apply)(variables, jnp.asarray(chips, jnp.float32)))
    assert np.abs(out - dlib_descriptors).max() <= DESCRIPTOR_TOLERANCE


def test_partial_evaluation_is_exact(imported, chips):
    module, variables = imported
    x = jnp.asarray(chips[2:], jnp.float32)
    full = np.asarray(module.apply(variables, x))  # same batch: XLA's conv tiling depends on it
    shapes = {}
    for point in FEATURE_POINTS:
        features = module.apply(variables, x, method=DlibResNet.features, until=point)
        shapes[point] = features.shape[1:]
        out = module.apply(variables, features, method=DlibResNet.from_features, after=point)
        np.testing.assert_array_equal(np.asarray(out), full, err_msg=point)
    # dlib's sizes: level1 sums a 3x3 block with a 4x4 pooled shortcut, level0 a 1x1 with a 2x2.
    assert shapes == {"input": (150, 150, 3), "stem": (35, 35, 32), "level4": (35, 35, 32),
                      "level3": (17, 17, 64), "level2": (8, 8, 128), "level1": (4, 4, 256),
                      "level0": (2, 2, 256), "pool": (256,)}
    with pytest.raises(ValueError, match="until"):
        module.apply(variables, x, method=DlibResNet.features, until="level5")


def test_map_output_is_the_level_flattened_and_has_no_deeper_parameters(imported, chips):
    module, variables = imported
    x = jnp.asarray(chips[2:], jnp.float32)
    level2 = np.asarray(module.apply(variables, x, method=DlibResNet.features, until="level2"))
    mapped = module.clone(output="level2")
    shapes = jax.eval_shape(mapped.init, jax.random.key(0), x)
    assert sorted(shapes["params"]) == ["level2", "level3", "level4", "stem"]
    kept = {"params": {k: v for k, v in variables["params"].items() if k in shapes["params"]}}
    out = np.asarray(mapped.apply(kept, x))
    np.testing.assert_array_equal(out, level2.reshape(len(level2), -1))
    level3 = mapped.apply(kept, x, method=DlibResNet.features, until="level3")
    np.testing.assert_allclose(np.asarray(mapped.apply(
        kept, level3, method=DlibResNet.from_features, after="level3")), out, atol=1e-5)
    with pytest.raises(ValueError, match="beyond"):
        mapped.apply(kept, level3, method=DlibResNet.from_features, after="level1")


def test_parameter_groups(imported):
    module, variables = imported
    params = variables["params"]
    assert set(params) == set(LEVEL_NAMES)
    assert params["stem"]["conv"]["kernel"].shape == (7, 7, 3, 32)
    assert set(params["level3"]) == {"block0", "block1", "block2", "block3"}
    assert params["level3"]["block0"]["conv1"]["kernel"].shape == (3, 3, 32, 64)
    assert set(params["level0"]) == {"block0"}
    assert params["fc"]["kernel"].shape == (256, DESCRIPTOR_SIZE)
    assert set(params["fc"]) == {"kernel"}  # fc_no_bias
    # The module's own init has the same tree, so a trainer can start from either.
    init = jax.eval_shape(DlibResNet().init, jax.random.PRNGKey(0),
                          jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3)))
    assert jax.tree_util.tree_structure(init) == jax.tree_util.tree_structure(variables)
    assert jax.tree_util.tree_map(jnp.shape, init) == jax.tree_util.tree_map(jnp.shape, variables)
    assert module.mean_rgb == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)


# ------------------------------------------------------------------------------- the reader


def _write(tmp_path, data, name="model.dat"):
    path = tmp_path / name
    path.write_bytes(bytes(data))
    return path


def _with_bytes_at(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) >= 1, old
    index = data.index(old)
    return data[:index] + new + data[index + len(old):]


# The stem conv (first con_ layer written): tag "con_4", then its params tensor: version 2,
# sizes (4736, 1, 1, 1) = 32*3*7*7 weights + 32 biases.
_STEM_CON = b"\x05con_4" + b"\x01\x02" + b"\x02\x80\x12" + b"\x01\x01" * 3
# Its filters alias_tensor: version 1, (32, 3, 7, 7).
_STEM_FILTERS = b"\x01\x01" + b"\x01\x20\x01\x03\x01\x07\x01\x07"


@pytest.mark.parametrize("cut", [1, 3, 5000, 10_000_000, -1000, -1])
def test_truncated_file(tmp_path, model_bytes, cut):
    data = model_bytes[:cut]
    with pytest.raises(DlibModelError, match="truncated"):
        import_dlib_resnet(_write(tmp_path, data), cache_dir=tmp_path / "cache")


def test_corruptions_are_named(tmp_path, model_bytes):
    cases = {
        # one byte of a layer tag: "con_4" -> "com_4"
        "tag": (_replace_once(model_bytes, b"\x05con_4", b"\x05com_4"),
                r"wrong layer tag .*expected 'con_4' or .*found 'com_4'.*stem/conv"),
        # the loss layer's version (the file's first bytes)
        "magic": (b"\x01\x07" + model_bytes[2:],
                  r"add_loss_layer: unexpected serialisation version 7"),
        "loss tag": (_replace_once(model_bytes, b"loss_metric_2", b"loss_metrix_2"),
                     r"wrong layer tag.*loss_metrix_2"),
        # the stem filters' alias tensor (32, 3, 7, 7) -> (32, 4, 7, 7)
        "shape": (_replace_once(model_bytes, _STEM_FILTERS,
                                _STEM_FILTERS[:4] + b"\x01\x04" + _STEM_FILTERS[6:]),
                  r"wrong tensor shape: filters \(32, 4, 7, 7\), expected \(32, 3, 7, 7\)"),
        "trailing": (model_bytes + b"\x00", r"1 trailing bytes"),
        # a NaN in the stem conv's weights (the first float of its params tensor)
        "nan": (_with_bytes_at(model_bytes, model_bytes.index(_STEM_CON) + len(_STEM_CON),
                               np.float32(np.nan).tobytes()),
                r"stem/conv/kernel has 1 non-finite"),
    }
    for name, (data, pattern) in cases.items():
        assert len(data) == len(model_bytes) + (name == "trailing")
        with pytest.raises(DlibModelError, match=pattern):
            import_dlib_resnet(_write(tmp_path, data, f"{name}.dat"), cache_dir=tmp_path / name)
        written = tmp_path / name / "dlib"
        assert not written.exists() or not any(written.iterdir())  # nothing cached


def test_missing_file_and_package(tmp_path, monkeypatch):
    with pytest.raises(DlibModelError, match="no such file"):
        import_dlib_resnet(tmp_path / "absent.dat", cache_dir=tmp_path)
    monkeypatch.setitem(sys.modules, "face_recognition_models", None)
    with pytest.raises(DlibModelError, match="pip install face_recognition_models"):
        import_dlib_resnet(cache_dir=tmp_path)


def test_cache(tmp_path, model_path, model_bytes, monkeypatch):
    monkeypatch.setenv("FACERECON_CACHE_DIR", str(tmp_path / "env_cache"))
    start = time.perf_counter()
    module, variables = import_dlib_resnet(model_path)  # parse + write the cache
    first = time.perf_counter() - start
    digest = hashlib.sha256(model_bytes).hexdigest()
    cache_file = tmp_path / "env_cache" / "dlib" / f"{digest}.npz"
    assert cache_file.is_file()
    assert not list(cache_file.parent.glob(".*.tmp"))  # the atomic write left no temp file

    def no_parse(*args, **kwargs):
        raise AssertionError("the cached arrays should have been used")

    monkeypatch.setattr(dlib_resnet, "parse_dlib_resnet", no_parse)
    start = time.perf_counter()
    module2, variables2 = import_dlib_resnet(model_path)
    cached = time.perf_counter() - start
    print(f"import: first read {first:.2f} s, cached read {cached:.2f} s")
    assert first < 30.0
    assert module2.mean_rgb == module.mean_rgb
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, variables2)

    # A damaged cache is rebuilt, not trusted (and so parses again).
    cache_file.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(AssertionError, match="cached arrays"):
        import_dlib_resnet(model_path)
    monkeypatch.undo()
    _, variables3 = import_dlib_resnet(model_path, cache_dir=tmp_path / "env_cache")
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables, variables3)


# ------------------------------------------------------------------------- chip alignment


def _texture(height=700, width=700, seed=0):
    """A smooth random colour texture plus oblique stripes (uint8): misalignment shows."""
    import cv2

    rng = np.random.default_rng(seed)
    noise = rng.random((height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    smooth = cv2.resize(noise, (width + 16, height + 16), interpolation=cv2.INTER_CUBIC)
    smooth = smooth[8:8 + height, 8:8 + width]
    yy, xx = np.mgrid[0:height, 0:width]
    stripes = 0.5 + 0.5 * np.sin(xx * 0.37 + yy * 0.11)[..., None]
    return np.clip((0.6 * smooth + 0.4 * stripes) * 255, 0, 255).astype(np.uint8)


def _detection(points):
    rect = dlib.rectangle(0, 0, 10, 10)
    return dlib.full_object_detection(rect, [dlib.point(int(x), int(y)) for x, y in points])


def _face_points(count, rng, scale, center=(350.0, 350.0)):
    """Integer image points: dlib's template (5) or mean face (68, random jaw) under a random
    similarity of the given scale (image pixels per chip pixel)."""
    if count == 5:
        template = dlib_align.chip_template(5)
    else:
        template = np.zeros((68, 2))
        template[:17] = rng.random((17, 2)) * 150  # ignored by dlib's 68-point rule
        template[17:] = (0.25 + dlib_align.DLIB_MEAN_FACE_17_67) / 1.5 * 150
    angle = rng.uniform(-0.6, 0.6)
    rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shift = np.asarray(center) - rotation @ np.array([75.0, 75.0]) + rng.uniform(-20, 20, 2)
    return template @ rotation.T + shift, rotation, shift


@pytest.mark.parametrize("count", [5, 68])
def test_chip_matrix_matches_dlib(count):
    import cv2

    image = _texture()
    rng = np.random.default_rng(count)
    worst_max, means = 0, []
    for scale in (0.6, 0.9, 1.3, 1.8):  # dlib samples the full-resolution image up to 2x
        points, _, _ = _face_points(count, rng, scale)
        points = np.round(points)  # dlib stores integer part coordinates
        det = _detection(points)
        reference = dlib.get_face_chip(image, det, size=150, padding=0.25)

        details = dlib.get_face_chip_details(det, size=150, padding=0.25)
        ours = dlib_align.face_chip_details(points, size=150, padding=0.25)
        rect = details.rect
        np.testing.assert_allclose(ours.rect, [rect.left(), rect.top(), rect.right(),
                                               rect.bottom()], atol=1e-9)
        assert ours.angle == pytest.approx(details.angle, abs=1e-12)

        # The project's one warp, in its convention (pixel centres at +0.5), floored to uint8
        # as dlib does.
        chip = _dlib_style(crop_lib.warp(image, dlib_align.dlib_chip_matrix(points + 0.5), 150))

        difference = np.abs(chip.astype(int) - reference.astype(int))
        worst_max = max(worst_max, int(difference.max()))
        means.append(difference.mean())
        shift, _ = cv2.phaseCorrelate(reference.mean(-1).astype(np.float64),
                                      chip.mean(-1).astype(np.float64))
        assert np.hypot(*shift) < 0.05, (scale, shift)
    print(f"{count}-point chips vs dlib.get_face_chip: max abs {worst_max} grey levels, "
          f"mean {np.mean(means):.4f}")
    assert worst_max <= 1 and np.mean(means) < 0.01


@pytest.mark.parametrize("count", [5, 68])
def test_chip_matrix_maps_points_to_template(count):
    rng = np.random.default_rng(10 + count)
    size = 150
    for scale in (0.7, 1.0, 2.5):
        points, _, _ = _face_points(count, rng, scale)  # exact similarity, not rounded
        matrix = dlib_align.dlib_chip_matrix(points, pixel_centers="integer")
        fitted = points if count == 5 else points[list(dlib_align.DLIB_68_FIT_INDICES)]
        mapped = fitted @ matrix[:, :2].T + matrix[:, 2]
        template = dlib_align.chip_template(count, size=size, padding=0.25)
        # dlib's rectangle convention: chip index (size-1)/2 shows the fit's chip point size/2,
        # with the zoom scaled by s (size-1) / (size s - 1).
        ratio = scale * (size - 1) / (size * scale - 1)
        np.testing.assert_allclose(mapped, (size - 1) / 2 + ratio * (template - size / 2),
                                   atol=1e-8)
        assert np.abs(mapped - template).max() < 0.75
        # The matrix is a similarity whose chip corners are dlib's rotated rectangle corners.
        linear = matrix[:, :2]
        assert np.allclose(linear @ linear.T, np.eye(2) * np.linalg.det(linear), atol=1e-12)
        # The project convention: M_half(p + 0.5) = M_integer(p) + 0.5.
        half = dlib_align.dlib_chip_matrix(points + 0.5)
        np.testing.assert_allclose((points + 0.5) @ half[:, :2].T + half[:, 2],
                                   points @ linear.T + matrix[:, 2] + 0.5, atol=1e-9)


def test_pyramid_difference_is_bounded():
    """Above 2x shrink dlib samples a blurred pyramid level; `warp` box-averages (stated)."""
    image = _texture(1000, 1000, seed=3)
    rng = np.random.default_rng(7)
    points, _, _ = _face_points(5, rng, 3.0, center=(500.0, 500.0))
    points = np.round(points)
    reference = dlib.get_face_chip(image, _detection(points), size=150, padding=0.25)
    chip = _dlib_style(crop_lib.warp(image, dlib_align.dlib_chip_matrix(points + 0.5), 150))
    difference = np.abs(chip.astype(int) - reference.astype(int))
    print(f"scale 3 (pyramid): max abs {difference.max()}, mean {difference.mean():.2f}")
    assert difference.mean() < 20  # same geometry, different low-pass filtering


def _dlib_style(chip: np.ndarray) -> np.ndarray:
    """A float chip in [0, 1] as dlib's uint8 chip: values truncated (static_cast)."""
    return np.clip(np.floor(chip * 255.0 + 1e-3), 0, 255).astype(np.uint8)


def _roles_ok(five) -> bool:
    """dlib's 5-point roles on an upright face: 0/1 image-right eye outer/inner, 2/3 image-left
    eye outer/inner, 4 nose bottom (below the eyes, between the inner corners)."""
    five = np.asarray(five, np.float64)
    eyes, nose = five[:4], five[4]
    return bool(nose[1] > eyes[:, 1].max()
                and five[3, 0] < nose[0] < five[1, 0]
                and five[0, 0] > five[1, 0] and five[2, 0] < five[3, 0])


def test_five_point_mapping(astronaut_five):
    _, dlib_five = astronaut_five
    # dlib's own 5-point predictor on a real photo: its order has these roles.
    assert _roles_ok(dlib_five), dlib_five
    # iBUG-68 in dlib's mean face (interpolation.h lists it in iBUG order for points 17..67):
    mean68 = np.zeros((68, 2))
    mean68[17:] = dlib_align.DLIB_MEAN_FACE_17_67
    five = dlib_align.five_points_from_68(mean68)
    assert dlib_align.DLIB_FIVE_FROM_IBUG68 == (45, 42, 36, 39, 33)
    assert _roles_ok(five)
    # ... and it is dlib's 5-point template (same points, same order) within 0.004 units ...
    assert np.abs(five - dlib_align.DLIB_FIVE_TEMPLATE).max() < 0.004
    # ... and, fitted by a similarity onto the predictor's points on the photo, lands on them
    # (within 1.5 px for an interocular distance of ~55 px).
    fitted = similarity.fit_similarity(five, dlib_five)
    residual = np.abs(similarity.transform_points(fitted, five) - dlib_five).max()
    assert residual < 1.5, residual
    # Any swap of two indices breaks the roles (so the check above would catch it).
    for i, j in itertools.combinations(range(5), 2):
        swapped = five.copy()
        swapped[[i, j]] = swapped[[j, i]]
        assert not _roles_ok(swapped), (i, j)
    # Batched input works and rejects wrong shapes.
    assert dlib_align.five_points_from_68(np.stack([mean68, mean68])).shape == (2, 5, 2)
    with pytest.raises(ValueError):
        dlib_align.five_points_from_68(np.zeros((5, 2)))


def test_astronaut_chip_through_our_alignment(astronaut, astronaut_five, imported,
                                              our_descriptors):
    """Our alignment of dlib's 5 points gives dlib's chip, hence dlib's descriptor."""
    shape, points = astronaut_five
    reference = dlib.get_face_chip(astronaut, shape, size=150, padding=0.25)
    chip = _dlib_style(crop_lib.warp(astronaut, dlib_align.dlib_chip_matrix(points + 0.5), 150))
    difference = np.abs(chip.astype(int) - reference.astype(int))
    assert difference.max() <= 1
    module, variables = imported
    descriptor = np.asarray(module.apply(variables, jnp.asarray(chip[None], jnp.float32)))
    assert np.abs(descriptor - our_descriptors[3]).max() < 1e-2
