"""Face boxes and iBUG-68 landmarks from MediaPipe: what the crop of a photo is built from.

Detection (the `photo` extra: `pip install 'facerecon-jax[photo]'`, mediapipe 0.10.14, whose
wheel ships the BlazeFace and face-mesh `.tflite` models, so nothing is downloaded):
  1. BlazeFace full-range detection (`mp.solutions.face_detection`, model_selection=1) gives the
     face boxes (brows to chin, cheek to cheek), largest first.
  2. For each box, the face mesh (`FaceMesh(static_image_mode=True, refine_landmarks=True)`, 478
     points) runs on the box's 1.6x square crop, so every landmark set belongs to its box.
  3. `MEDIAPIPE_TO_IBUG68` picks the 68 iBUG points from the 478 (indices are facts about the
     two layouts, as in the public mediapipe -> 68 tables; we checked each one by plotting it on
     scikit-image's astronaut, and tests/test_detect.py checks their iBUG order on that photo).

Alternative not built here: dlib (`dlib-bin` + `face-recognition-models`) gives the iBUG-68 points
directly (HOG detector, frontal faces only; its 68-point weights are for non-commercial use).

Jaw contour: iBUG's 17 contour points lie on the face's outline as seen in the image, and FLAME's
dynamic contour embedding follows the same silhouette-like curve for the head's yaw. MediaPipe's
face oval is a fixed set of surface vertices, which for a frontal face lies on the outline too but
starts higher (temple level rather than the ear's top) and slides off the silhouette when the head
turns. We therefore use them, but `CONTOUR_WEIGHT` (0.5) down-weights them in the fit relative to
the 51 inner points (see `landmark_weights`).

Image conventions: RGB uint8 (H, W, 3) arrays (`recon.image.read_image`); continuous pixel
coordinates (x right, y down), pixel (row i, column j) covers [j, j+1) x [i, i+1) as in
`recon.image.crop` and `recon.render.camera`.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional

import numpy as np

from recon.image import crop as crop_lib

PHOTO_EXTRA_HINT = "pip install 'facerecon-jax[photo]'"

# MediaPipe face-mesh vertex id of each iBUG-68 point (0-based iBUG order; "right" = subject's
# right, image left).
MEDIAPIPE_TO_IBUG68 = np.asarray(
    [127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356,  # contour
     70, 63, 105, 66, 107,            # right brow 17-21
     336, 296, 334, 293, 300,         # left brow 22-26
     168, 197, 5, 4,                  # nose bridge 27-30
     75, 97, 2, 326, 305,             # nostrils 31-35
     33, 160, 158, 133, 153, 144,     # right eye 36-41
     362, 385, 387, 263, 373, 380,    # left eye 42-47
     61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,  # outer lips 48-59
     78, 82, 13, 312, 308, 317, 14, 87],                   # inner lips 60-67
    np.int32)
LANDMARK_SET = "ibug68_from_mediapipe478"
NUM_CONTOUR = 17
CONTOUR_WEIGHT = 0.5
# The face mesh runs on this square around each BlazeFace box (1.6 x its larger side).
MESH_CROP = crop_lib.CropSpec(anchor="box", scale=1.6, box_side="max", size=256)


class PhotoExtraMissing(ImportError):
    """mediapipe (the `photo` extra) is not installed."""


@dataclasses.dataclass(frozen=True)
class Face:
    """One detected face in image pixels.

    box: (4,) float [x0, y0, x1, y1] BlazeFace box.
    score: detection confidence in [0, 1].
    landmarks_68: (68, 2) float32 iBUG-68 points (x, y).
    landmarks_478: (478, 2) float32 all MediaPipe face-mesh points (x, y).
    """

    box: np.ndarray
    score: float
    landmarks_68: np.ndarray
    landmarks_478: np.ndarray

    @property
    def box_size(self) -> float:
        """sqrt(width * height) of the box, pixels (the scale errors are reported against)."""
        x0, y0, x1, y1 = self.box
        return float(np.sqrt(max(x1 - x0, 0.0) * max(y1 - y0, 0.0)))


def landmark_weights(contour_weight: float = CONTOUR_WEIGHT) -> np.ndarray:
    """(68,) float32 fitting weights: `contour_weight` for the 17 contour points, 1 elsewhere."""
    weights = np.ones(68, np.float32)
    weights[:NUM_CONTOUR] = contour_weight
    return weights


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3) RGB, got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    return image


def box_iou(a, b) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


def _mediapipe():
    try:
        import mediapipe  # noqa: PLC0415 - optional extra, imported only when detecting
    except ImportError as error:
        raise PhotoExtraMissing(
            f"face detection needs mediapipe, the optional 'photo' extra: {PHOTO_EXTRA_HINT} "
            f"({error})") from error
    return mediapipe


class FaceDetector:
    """MediaPipe face detection + face mesh; a context manager (closes the graphs).

        with FaceDetector() as detector:
            faces = detector(image)        # list of `Face`, largest box first
    """

    def __init__(self, *, min_score: float = 0.5, max_faces: int = 8):
        mp = _mediapipe()
        self._detection = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_score)
        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, refine_landmarks=True, max_num_faces=1,
            min_detection_confidence=min_score)
        self.max_faces = max_faces

    def close(self) -> None:
        self._detection.close()
        self._mesh.close()

    def __enter__(self) -> "FaceDetector":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def boxes(self, image: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """[(box [x0, y0, x1, y1] float64 pixels, score)], largest box first."""
        image = _check_image(image)
        height, width = image.shape[:2]
        result = self._detection.process(np.ascontiguousarray(image))
        boxes = []
        for detection in result.detections or []:
            rel = detection.location_data.relative_bounding_box
            box = np.asarray([rel.xmin * width, rel.ymin * height,
                              (rel.xmin + rel.width) * width, (rel.ymin + rel.height) * height])
            if rel.width > 0 and rel.height > 0:
                boxes.append((box, float(detection.score[0])))
        boxes.sort(key=lambda item: -(item[0][2] - item[0][0]) * (item[0][3] - item[0][1]))
        return boxes[: self.max_faces]

    def landmarks(self, image: np.ndarray, box) -> Optional[np.ndarray]:
        """(478, 2) float32 face-mesh points (image pixels) of the face in `box`, or None.

        The mesh runs on the box's 1.6x square crop (`MESH_CROP`) at 192..512 px, so that a
        small face in a big photo gets the mesh model's working resolution.
        """
        side = MESH_CROP.scale * max(box[2] - box[0], box[3] - box[1])
        spec = MESH_CROP.resized(int(np.clip(round(side), 192, 512)))
        crop = crop_lib.crop_image(image, spec, box=box)
        pixels = np.round(np.clip(crop.image, 0.0, 1.0) * 255.0).astype(np.uint8)
        result = self._mesh.process(np.ascontiguousarray(pixels))
        if not result.multi_face_landmarks:
            return None
        points = np.asarray([[p.x * spec.size, p.y * spec.size]
                             for p in result.multi_face_landmarks[0].landmark], np.float64)
        return crop.to_image(points).astype(np.float32)

    def __call__(self, image: np.ndarray) -> List[Face]:
        """All faces with a box and a landmark set, largest box first."""
        faces = []
        for box, score in self.boxes(image):
            points = self.landmarks(image, box)
            if points is not None:
                faces.append(Face(box=box, score=score,
                                  landmarks_68=points[MEDIAPIPE_TO_IBUG68],
                                  landmarks_478=points))
        return faces
