"""The face crop: one 2 x 3 similarity from image pixels to crop pixels, built by a `CropSpec`.

Every path that gives the regressor an image goes through here: synthetic training data
(`recon.data.synthetic` renders straight into the crop that `crop_matrix` defines), MICA-format
data (`recon.data.mica` checks that its stored crops are this spec's), NoW (`recon.now.predict`)
and photos (`recon.predict`). The spec is part of a run's config (`data.crop`), stored with its
checkpoints and read back by `recon.inference.load_predictor`, so a model is only ever asked to
predict from the crop it was trained on.

Coordinates: continuous pixels, x right and y down, pixel (row i, column j) covers
[j, j + 1) x [i, i + 1) and its centre is (j + 0.5, i + 0.5) (`recon.render.camera`'s
convention). A crop of `size` pixels covers [0, size)^2. `matrix` (2, 3) maps image points to
crop points, `invert(matrix)` maps crop points (landmarks, overlays) back to the photo.

Anchors (what the similarity is fitted to):
  "box":                a face box (x0, y0, x1, y1): the square of `scale` x the box side
                        (`box_side` "mean" of width and height as DECA's and MICA's NoW crops,
                        or "max") centred on the box centre; no rotation.
  "dlib_five_points":   dlib's `get_face_chip` alignment (`recon.image.dlib_align`) of the 5
                        points (eye corners, nose bottom) taken from iBUG-68 landmarks, with
                        dlib's `padding`; 0.25 at 150 px is the chip of dlib's face network.
  "arcface_five_points": insightface's `norm_crop`: the least-squares similarity of the 5
                        points (eye centres, nose tip, mouth corners) from iBUG-68 landmarks onto
                        ArcFace's 112 template scaled by size / 112 (MICA's `arcface_input`
                        crops are this anchor at 224).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np

from recon.image import dlib_align
from recon.image.similarity import (SimilarityError, check_points, compose, fit_similarity,
                                    invert, shift_pixel_centres, similarity_scale,
                                    transform_points)

ANCHORS = ("box", "dlib_five_points", "arcface_five_points")
BOX_SIDES = ("mean", "max")

# insightface `arcface_dst` in OpenCV pixel-index coordinates of the 112 x 112 aligned image:
# left eye, right eye, nose tip, left and right mouth corners ("left" = image left).
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], np.float64)
# How far a detector's box top sits above the 68-landmark box (a fraction of its height): face
# detectors box the forehead, landmarks stop at the brows. Used wherever a detector-like box is
# made from landmarks (the built-in NoW split, box-anchored synthetic training).
BOX_FOREHEAD_FRACTION = 0.15


class CropError(SimilarityError):
    """A crop cannot be made from what was given (missing or degenerate box or landmarks)."""


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """How the regressor's face crop is cut from a photo (see the module docstring).

      anchor: "box", "dlib_five_points" or "arcface_five_points".
      size: the crop's side in pixels (the image the backbone input and the 2D losses come
        from).
      scale: box anchor: crop side / box side.
      box_side: box anchor: "mean" (DECA, MICA, NoW) or "max" of the box's width and height.
      padding: dlib anchor: dlib's padding (the chip spans 1 + 2 padding template units).
    """

    anchor: str = "box"
    size: int = 224
    scale: float = 1.6
    box_side: str = "mean"
    padding: float = 0.25

    def __post_init__(self):
        if self.anchor not in ANCHORS:
            raise ValueError(f"crop anchor must be one of {ANCHORS}, got {self.anchor!r}")
        if self.box_side not in BOX_SIDES:
            raise ValueError(f"crop box_side must be one of {BOX_SIDES}, got {self.box_side!r}")
        if int(self.size) != self.size or self.size < 8:
            raise ValueError(f"crop size must be an integer >= 8, got {self.size!r}")
        if not self.scale > 0 or not np.isfinite(self.scale):
            raise ValueError(f"crop scale must be > 0, got {self.scale!r}")
        if not (self.padding >= 0) or not np.isfinite(self.padding):
            raise ValueError(f"crop padding must be >= 0, got {self.padding!r}")

    @property
    def needs_landmarks(self) -> bool:
        """True when the crop is fitted to landmarks (a face box is not enough)."""
        return self.anchor != "box"

    def resized(self, size: int) -> "CropSpec":
        """The same window at another resolution."""
        return dataclasses.replace(self, size=int(size))


# ------------------------------------------------------------------------------------ matrices


def _check_points(points, count: Optional[int], what: str) -> np.ndarray:
    return check_points(points, count, what, error=CropError)


def check_box(box) -> np.ndarray:
    """(4,) float64 [x0, y0, x1, y1] with x1 > x0 and y1 > y0, finite; CropError otherwise."""
    box = np.asarray(box, np.float64).reshape(-1)
    if box.shape != (4,) or not np.all(np.isfinite(box)):
        raise CropError(f"face box must be 4 finite numbers [x0, y0, x1, y1], got {box}")
    if not (box[2] > box[0] and box[3] > box[1]):
        raise CropError(f"face box must have x1 > x0 and y1 > y0, got {box.tolist()}")
    return box


def box_matrix(box, *, size: int, scale: float, box_side: str = "mean") -> np.ndarray:
    """(2, 3): the square of `scale` x the box side around the box centre onto [0, size)^2."""
    x0, y0, x1, y1 = check_box(box)
    sides = (x1 - x0, y1 - y0)
    side = scale * (np.mean(sides) if box_side == "mean" else max(sides))
    zoom = size / side
    centre = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
    return np.array([[zoom, 0.0, size / 2.0 - zoom * centre[0]],
                     [0.0, zoom, size / 2.0 - zoom * centre[1]]])


def arcface_five_points(landmarks_68) -> np.ndarray:
    """(5, 2) insightface points from iBUG-68: eye centres (mean of each eye's 6 points, image
    left first), nose tip (30), mouth corners (48, 54)."""
    points = _check_points(landmarks_68, 68, "landmarks")
    return np.stack([points[36:42].mean(0), points[42:48].mean(0), points[30], points[48],
                     points[54]])


def arcface_matrix(landmarks_68, *, size: int) -> np.ndarray:
    """(2, 3) insightface `norm_crop` similarity at `size`: `estimate_norm` scales the template
    by size / 112 in OpenCV pixel-index coordinates, which +0.5 turns into ours."""
    template = ARCFACE_TEMPLATE_112 * (size / 112.0) + 0.5
    return fit_similarity(arcface_five_points(landmarks_68), template)


def crop_matrix(spec: CropSpec, *, box=None, landmarks=None) -> np.ndarray:
    """(2, 3) float64 similarity from image pixels to `spec`'s crop pixels.

    box: (4,) [x0, y0, x1, y1] face box (box anchor). landmarks: (68, 2) iBUG-68 points (the
    five-point anchors). Raises CropError naming what is missing or degenerate.
    """
    if spec.anchor == "box":
        if box is None:
            raise CropError("a box-anchored crop needs a face box")
        return box_matrix(box, size=spec.size, scale=spec.scale, box_side=spec.box_side)
    if landmarks is None:
        raise CropError(f"a {spec.anchor!r} crop needs 68 landmarks (a face box is not enough)")
    if spec.anchor == "dlib_five_points":
        five = dlib_align.five_points_from_68(_check_points(landmarks, 68, "landmarks"))
        return dlib_align.dlib_chip_matrix(five, size=spec.size, padding=spec.padding)
    return arcface_matrix(landmarks, size=spec.size)


def box_from_landmarks(landmarks_68, forehead: float = BOX_FOREHEAD_FRACTION) -> np.ndarray:
    """(4,) a face-detector-like box from landmarks: their bounding box, its top raised by
    `forehead` x its height (detectors box the forehead)."""
    points = _check_points(landmarks_68, None, "landmarks")
    low, high = points.min(0), points.max(0)
    return np.array([low[0], low[1] - forehead * (high[1] - low[1]), high[0], high[1]])


@dataclasses.dataclass(frozen=True)
class BoxRelation:
    """Where a split's face boxes sit on the boxes of their detected landmarks
    (`box_from_landmarks`), in units of the landmark box's mean side: NoW's box side = `scale` x
    the landmark box's; its centre = the landmark box's centre + `shift` x that side. The
    default (1, (0, 0)) takes NoW's box as the landmark box itself."""

    scale: float = 1.0
    shift: tuple = (0.0, 0.0)


def centre_and_side(box) -> tuple[np.ndarray, float]:
    """(centre (2,), mean side) of a box [x0, y0, x1, y1]."""
    box = np.asarray(box, np.float64)
    return (box[:2] + box[2:]) / 2.0, float((box[2] - box[0]) + (box[3] - box[1])) / 2.0


def place_on_box(points: np.ndarray, box, relation: BoxRelation = BoxRelation()) -> np.ndarray:
    """(68, 2) `points` scaled about their landmark box's centre and shifted (no rotation)
    until `box` [x0, y0, x1, y1] sits on their landmark box as `relation` says."""
    points = np.asarray(points, np.float64)
    centre, side = centre_and_side(box_from_landmarks(points))
    box_centre, box_side = centre_and_side(check_box(box))
    new_side = box_side / relation.scale
    new_centre = box_centre - np.asarray(relation.shift) * new_side
    return (points - centre) * (new_side / side) + new_centre


def reference_points(points_3d, pixels_per_metre: float = 1000.0) -> np.ndarray:
    """(N, 2) image points of model-frame points (N, 3) (metres, y up) in the reference photo
    frame of `crop_camera`: u = k x, v = -k y (k = pixels_per_metre; orthographic)."""
    points = np.asarray(points_3d, np.float64)
    return np.stack([pixels_per_metre * points[:, 0], -pixels_per_metre * points[:, 1]], -1)


def template_points(flame) -> np.ndarray:
    """(68, 2) the FLAME template's landmarks (zero code) in the reference photo frame
    (`recon.image.crop.reference_points`: orthographic, 1000 px per metre)."""
    import flame_jax

    params = flame_jax.FlameParams.zeros(1, flame)
    landmarks = np.asarray(flame_jax.forward(flame, params).landmarks[0], np.float64)
    return reference_points(landmarks)


def crop_camera(matrix, size: int, pixels_per_metre: float = 1000.0
                ) -> tuple[float, tuple[float, float, float]]:
    """(roll, camera) that draws the crop of the reference photo frame directly.

    The reference frame maps model points (metres, y up) to u = k x, v = -k y. For a similarity
    `matrix` from that frame to a crop of `size` pixels, returns roll (radians, a rotation of the
    model about its z axis, counter-clockwise seen from the camera) and camera (s, tx, ty) of
    `recon.render.camera` such that projecting the rolled points with the camera lands every
    point where `matrix` puts its reference image point: rendering at `size` with them IS the
    crop, with no resampling.
    """
    matrix = np.asarray(matrix, np.float64)
    a, b = matrix[0, 0], matrix[1, 0]
    zoom = float(np.hypot(a, b))
    roll = -float(np.arctan2(b, a))
    scale = 2.0 * zoom * pixels_per_metre / size
    tx = (matrix[0, 2] - size / 2.0) * 2.0 / (size * scale)
    ty = -(matrix[1, 2] - size / 2.0) * 2.0 / (size * scale)
    return roll, (scale, tx, ty)


def template_camera(spec: CropSpec, flame) -> tuple:
    """(s, tx, ty) that puts the FLAME template where `spec` puts a face (the regressor head's
    starting camera). The template's landmarks (and, for box crops, the detector-like box around
    them, `box_from_landmarks`) define the crop as they would for a photo; the template is
    frontal, so the fitted roll is ~0 and dropped."""
    points = template_points(flame)
    matrix = crop_matrix(spec, box=box_from_landmarks(points), landmarks=points)
    _, camera = crop_camera(matrix, spec.size)
    return tuple(round(float(value), 6) for value in camera)


# ------------------------------------------------------------------------------------ warping


def _area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    import cv2

    height, width = image.shape[:2]
    new = (max(1, width // factor), max(1, height // factor))
    trimmed = image[:new[1] * factor, :new[0] * factor]
    return cv2.resize(trimmed, new, interpolation=cv2.INTER_AREA)


def warp(image: np.ndarray, matrix, size: int) -> np.ndarray:
    """(size, size, 3) float32 crop of an (H, W, 3) image under `matrix` (image -> crop).

    Bilinear sampling at each crop pixel's centre; outside the image is black. When the crop
    shrinks the image by more than 2x, the image is first box-averaged by the integer factor
    that keeps the remaining shrink within 2x (a one-level pyramid, as dlib's chip extraction
    does), so small crops of big photos are not aliased. uint8 input gives values in [0, 1],
    float input keeps its range.
    """
    import cv2

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"warp: expected an (H, W, 3) image, got shape {image.shape}")
    pixels = image.astype(np.float32) / np.float32(255.0) if image.dtype == np.uint8 \
        else image.astype(np.float32)
    matrix = np.asarray(matrix, np.float64)
    zoom = similarity_scale(matrix)
    if zoom <= 0 or not np.isfinite(zoom):
        raise CropError(f"warp: degenerate crop matrix {matrix.tolist()}")
    factor = int(np.floor(0.5 / zoom + 1e-6)) if zoom < 0.5 else 1
    if factor > 1:
        pixels = _area_downsample(pixels, factor)
        # Continuous coordinates of the reduced image are the original ones divided by factor.
        matrix = compose(matrix, np.array([[factor, 0.0, 0.0], [0.0, factor, 0.0]]))
    # OpenCV samples pixel centres at integer coordinates: the map in its coordinates.
    inverse = shift_pixel_centres(invert(matrix), -0.5)
    return cv2.warpAffine(pixels, inverse, (int(size), int(size)),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0.0, 0.0, 0.0))


@dataclasses.dataclass(frozen=True)
class Crop:
    """A face crop: image (size, size, 3) float32 and matrix (2, 3) image -> crop pixels."""

    image: np.ndarray
    matrix: np.ndarray

    def to_image(self, points) -> np.ndarray:
        """Crop points (N, 2) -> image points."""
        return transform_points(invert(self.matrix), points)

    def to_crop(self, points) -> np.ndarray:
        """Image points (N, 2) -> crop points."""
        return transform_points(self.matrix, points)


def crop_image(image: np.ndarray, spec: CropSpec, *, box=None, landmarks=None) -> Crop:
    """The `spec` crop of an (H, W, 3) image (uint8, or float in [0, 1])."""
    matrix = crop_matrix(spec, box=box, landmarks=landmarks)
    return Crop(image=warp(image, matrix, spec.size), matrix=matrix)
