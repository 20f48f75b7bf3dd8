"""dlib's face-chip alignment (`dlib.get_face_chip`) for our landmarks, in numpy.

    five = five_points_from_68(landmarks_68)            # (5, 2) in dlib's 5-point order
    matrix = dlib_chip_matrix(five)                      # (2, 3) image -> 150 x 150 chip
    chip = recon.image.crop.warp(image, matrix, 150)     # what dlib.get_face_chip returns

dlib's face network (`recon.model.dlib_resnet`) is trained on chips made by
`get_face_chip_details(det, 150, 0.25)` + `extract_image_chip` (dlib/image_transforms/
interpolation.h); this module reproduces that mapping exactly.

5-point layout (shape_predictor_5_face_landmarks): 0 / 1 = outer / inner corner of the eye on
the image's right (the subject's left eye), 2 / 3 = outer / inner corner of the eye on the
image's left, 4 = the bottom of the nose (between the nostrils). In iBUG-68 (0-based) these are
45, 42, 36, 39 and 33 (`DLIB_FIVE_FROM_IBUG68`): dlib's 5-point chip template and its mean
68-point face (both in interpolation.h) put those iBUG points within 0.004 template units of
the 5 template points, and the tests check the roles on dlib's own 5-point predictor's output.

The similarity. dlib fits (Umeyama, least squares, reflections excluded) a similarity from
template positions in the chip, (padding + t) / (1 + 2 padding) * size, to the given points:
  * 5 points: its 5-point template (all 5 used);
  * 68 points: its mean face for iBUG points 27..54 and 60..64 (nose, eyes, outer mouth and
    upper inner lip: points 0..16 (jaw), 17..26 (brows) and the lower lip 55..59, 65..67 are
    ignored although the mean shape lists 17..67).
The chip is then not sampled with that fit directly: dlib keeps only the fit's rotation, its
scale s and the image point C that the fit puts at the chip position (size/2, size/2), builds the
rectangle of side size*s - 1 centred on C (dlib's drectangle counts pixels inclusively), and
maps chip pixel (0, 0) to that rectangle's rotated top-left corner and chip pixel (size-1, 0) to
its top-right corner. So chip pixel (0, 0) samples the image at
C + R(angle) * (-(size*s - 1)/2, -(size*s - 1)/2) and neighbouring chip pixels are
(size*s - 1)/(size - 1) image pixels apart, not s: the centre of the chip, ((size-1)/2,
(size-1)/2) in pixel indices, shows C, half a pixel up-left of where the fit put it, and the
zoom differs from the fit's by s (size-1)/(size s - 1) (1 at s = 1, 0.9967 at s = 2, size 150).
For points that are an exact similarity of the template, the chip shows them at
(size-1)/2 + s (size-1)/(size s - 1) * (template - size/2): half a pixel up-left of the template
at s = 1, each coordinate within 0.8 px of it for any s >= 0.5.
dlib also rounds the part coordinates to integers (full_object_detection stores integer
points); we use the points as given.

Pixel conventions. `pixel_centers="half"` (the default, the project's convention, see
`recon.image.crop`): continuous coordinates, pixel (row i, column j) covers [j, j+1) x [i, i+1),
its centre is (j + 0.5, i + 0.5); points, matrix and chip are all in that convention, so the
matrix composes with `recon.image.crop` and chip pixel (0, 0)'s centre (0.5, 0.5) samples the
image at the continuous point C_half + R (-(size*s - 1)/2, ...) with C_half = C + (0.5, 0.5).
`pixel_centers="integer"`: dlib's and OpenCV's own pixel-index convention (pixel (j, i)'s
centre is the point (j, i)); pass the points dlib would be given, and `cv2.warpAffine(image,
matrix, (size, size))` is dlib's chip. The two matrices are conjugate by the half-pixel shift:
M_half(p) = M_integer(p - 0.5) + 0.5.

Sampling (`recon.image.crop.warp`, the project's one warp) vs dlib's `extract_image_chip`: both
bilinear with pixel centres as above. Differences: (1) OpenCV quantises sub-pixel positions to
1/32 pixel, dlib interpolates in double precision; (2) dlib truncates the interpolated value to
uint8 (static_cast) where `warp` returns floats; (3) dlib gives black to a chip pixel whose 2x2
neighbourhood is not entirely inside the image, OpenCV blends the inside pixels with black
(only within one pixel of the image border); (4) when the chip's rectangle in the image is more
than about twice the chip's side (s > ~2; exactly: while `pyramid_down<2>.rect_down(rect).area()
> size*size`), dlib first builds a 5-tap pyramid_down<2> image pyramid and samples a coarser
level, while `warp` box-averages by the integer factor that leaves at most a 2x shrink.
Measured against dlib.get_face_chip on the textured test image of tests/test_dlib_resnet.py
(uint8, 5- and 68-point detections under random similarities, scales 0.6..1.8, no pyramid,
`warp` floored to uint8 like dlib): chip rectangle and angle equal to 1e-12, pixel values max
abs difference 1 grey level, mean 0.0009, phase-correlation shift < 0.05 px; at scale 3 (dlib
and `warp` both low-pass filter, differently) the difference is bounded as the test states.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from recon.image import similarity

# dlib's 5-point order, as iBUG-68 indices (0-based): image-right eye outer (45) and inner (42)
# corner, image-left eye outer (36) and inner (39) corner, nose bottom (33).
DLIB_FIVE_FROM_IBUG68 = (45, 42, 36, 39, 33)

# get_face_chip_details' 5-point template (unit square, before padding), dlib's order.
DLIB_FIVE_TEMPLATE = np.array([
    [0.8595674595992, 0.2134981538014],
    [0.6460604764104, 0.2289674387677],
    [0.1205750620789, 0.2137274526848],
    [0.3340850613712, 0.2290642403242],
    [0.4901123135679, 0.6277975316475],
], np.float64)

# get_face_chip_details' mean face for iBUG points 17..67 (unit square, before padding).
_MEAN_FACE_X = [
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689]
_MEAN_FACE_Y = [
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182]
DLIB_MEAN_FACE_17_67 = np.stack([_MEAN_FACE_X, _MEAN_FACE_Y], axis=1)  # (51, 2), row = i - 17

# The iBUG points dlib's 68-point rule fits: 27..54 and 60..64 (no jaw, brows or lower lip).
DLIB_68_FIT_INDICES = tuple(i for i in range(17, 68)
                            if not (17 <= i <= 26 or 55 <= i <= 59 or 65 <= i <= 67))

PIXEL_CENTERS = ("half", "integer")


class ChipDetails(NamedTuple):
    """dlib's chip_details in pixel-index coordinates: rect (left, top, right, bottom), angle
    (radians), and the chip size."""

    rect: tuple
    angle: float
    size: int


def five_points_from_68(landmarks_68) -> np.ndarray:
    """(..., 5, 2) dlib 5-point layout from (..., 68, 2) iBUG-68 points (float64)."""
    points = np.asarray(landmarks_68, np.float64)
    if points.ndim < 2 or points.shape[-2:] != (68, 2):
        raise ValueError(f"five_points_from_68: expected (..., 68, 2) iBUG points, got shape "
                         f"{points.shape}")
    return points[..., list(DLIB_FIVE_FROM_IBUG68), :]


def chip_template(count: int, *, size: int = 150, padding: float = 0.25) -> np.ndarray:
    """The template positions dlib fits, in its chip coordinates ((5, 2) or (33, 2)).

    count 5: the 5-point template; count 68: the mean face at `DLIB_68_FIT_INDICES`.
    """
    if count == 5:
        unit = DLIB_FIVE_TEMPLATE
    elif count == 68:
        unit = DLIB_MEAN_FACE_17_67[np.asarray(DLIB_68_FIT_INDICES) - 17]
    else:
        raise ValueError(f"dlib's chip alignment takes 5 or 68 points, got {count}")
    return (padding + unit) / (2.0 * padding + 1.0) * size


def _check_points(points) -> np.ndarray:
    points = np.asarray(points, np.float64)
    if points.shape not in ((5, 2), (68, 2)):
        raise ValueError(f"dlib's chip alignment takes (5, 2) dlib-layout or (68, 2) iBUG "
                         f"points, got shape {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("dlib chip alignment: points hold NaN or infinite values")
    return points


def _check_convention(pixel_centers: str):
    if pixel_centers not in PIXEL_CENTERS:
        raise ValueError(f"pixel_centers must be one of {PIXEL_CENTERS}, got {pixel_centers!r}")


def face_chip_details(points, *, size: int = 150, padding: float = 0.25,
                      pixel_centers: str = "integer") -> ChipDetails:
    """dlib's get_face_chip_details for (5, 2) or (68, 2) points (see the module docstring).

    rect is in dlib's pixel-index coordinates (compare with `dlib.get_face_chip_details`);
    `pixel_centers` says which convention `points` are in.
    """
    _check_convention(pixel_centers)
    points = _check_points(points)
    if size < 2 or not padding >= 0:
        raise ValueError(f"need size >= 2 and padding >= 0, got size={size}, padding={padding}")
    if pixel_centers == "half":
        points = points - 0.5
    if len(points) == 68:
        points = points[list(DLIB_68_FIT_INDICES)]
    template = chip_template(5 if len(points) == 5 else 68, size=size, padding=padding)
    fitted = similarity.fit_similarity(template, points)  # chip template -> image
    linear, shift = fitted[:, :2], fitted[:, 2]
    angle = float(np.arctan2(linear[1, 0], linear[0, 0]))
    scale = float(np.hypot(linear[0, 0], linear[1, 0]))
    center = linear @ np.array([size / 2.0, size / 2.0]) + shift
    half = (size * scale - 1.0) / 2.0  # dlib's centered_drect(p, w, h) spans w - 1
    rect = (center[0] - half, center[1] - half, center[0] + half, center[1] + half)
    return ChipDetails(tuple(float(v) for v in rect), angle, int(size))


def chip_to_image_matrix(details: ChipDetails) -> np.ndarray:
    """(2, 3) chip pixel index -> image pixel index, as dlib's extract_image_chip samples."""
    left, top, right, bottom = details.rect
    center = np.array([(left + right) / 2.0, (top + bottom) / 2.0])
    step = np.array([(right - left) / (details.size - 1), (bottom - top) / (details.size - 1)])
    c, s = np.cos(details.angle), np.sin(details.angle)
    rotation = np.array([[c, -s], [s, c]])
    linear = rotation @ np.diag(step)
    # chip (0, 0) -> rotate(center, (left, top), angle)
    shift = center + rotation @ (np.array([left, top]) - center)
    return np.concatenate([linear, shift[:, None]], axis=1)


def dlib_chip_matrix(points, *, size: int = 150, padding: float = 0.25,
                     pixel_centers: str = "half") -> np.ndarray:
    """(2, 3) float64 similarity from image pixels to chip pixels, as dlib.get_face_chip maps.

    points: (5, 2) in dlib's 5-point layout (`five_points_from_68`) or (68, 2) iBUG points,
    x right, y down. pixel_centers: "half" (project convention, pixel centres at +0.5; the
    default) or "integer" (dlib's / OpenCV's pixel indices). See the module docstring.
    """
    _check_convention(pixel_centers)
    details = face_chip_details(points, size=size, padding=padding,
                                pixel_centers=pixel_centers)
    matrix = similarity.invert(chip_to_image_matrix(details))
    return similarity.shift_pixel_centres(matrix, 0.5) if pixel_centers == "half" else matrix


__all__ = [
    "DLIB_68_FIT_INDICES", "DLIB_FIVE_FROM_IBUG68", "DLIB_FIVE_TEMPLATE",
    "DLIB_MEAN_FACE_17_67", "PIXEL_CENTERS", "ChipDetails", "chip_template",
    "chip_to_image_matrix", "dlib_chip_matrix", "face_chip_details",
    "five_points_from_68",
]
