"""Predict NoW meshes from images: DECA/MICA crop from the detected-face box, a `predict`
callable, and the NoW predictions layout.

    predict_split(root, entries, predict, faces, out_dir)
      -> <out_dir>/<subject>/<challenge>/<image>.obj (metres) + <image>.npy (7 x 3 metres)

`predict(images (B, 224, 224, 3) float32 in [0, 1]) -> (vertices (B, V, 3), landmarks7 (B, 7, 3))`
in metres, e.g. the one `recon.trainer.load_predictor(workdir)` returns.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable, Sequence

import numpy as np

from recon.now import io as now_io

CROP_SCALE = 1.6  # DECA / MICA NoW crop: 1.6 x the mean side of the detected box
CROP_SIZE = 224


def crop_square(box: dict, *, scale: float = CROP_SCALE) -> tuple[float, float, float]:
    """(centre_x, centre_y, side) in pixels of the square crop around a detected-face box.

    side = int(scale * ((right - left) + (bottom - top)) / 2) and the centre is the box centre,
    as DECA's NoW loader does (its `int` truncation included).
    """
    width, height = box["right"] - box["left"], box["bottom"] - box["top"]
    centre_x = box["right"] - width / 2.0
    centre_y = box["bottom"] - height / 2.0
    side = float(int((width + height) / 2.0 * scale))
    return centre_x, centre_y, side


def crop_image(image: np.ndarray, box: dict, *, size: int = CROP_SIZE,
               scale: float = CROP_SCALE) -> np.ndarray:
    """(size, size, 3) float32 crop (bilinear) of an (H, W, 3) image; outside pixels are 0.

    Same mapping as DECA's skimage similarity warp: the square's top-left corner goes to pixel
    (0, 0) and its far corner to (size - 1, size - 1).
    """
    import scipy.ndimage

    image = np.asarray(image, np.float32)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got {image.shape}")
    centre_x, centre_y, side = crop_square(box, scale=scale)
    step = side / (size - 1)
    grid = np.arange(size, dtype=np.float64) * step
    rows = (centre_y - side / 2.0) + grid
    cols = (centre_x - side / 2.0) + grid
    coords = np.stack(np.meshgrid(rows, cols, indexing="ij"))
    channels = [scipy.ndimage.map_coordinates(image[..., c], coords, order=1, mode="constant",
                                              cval=0.0) for c in range(3)]
    return np.stack(channels, axis=-1).astype(np.float32)


def read_image(path: os.PathLike) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    path = pathlib.Path(path)
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"), np.float32) / 255.0
    except FileNotFoundError as exc:
        raise now_io.NowFileError(f"{path}: file not found") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise now_io.NowFileError(f"{path}: cannot read the image ({exc})") from exc


def load_crop(root: os.PathLike, entry: now_io.ImageEntry) -> np.ndarray:
    """(224, 224, 3) network input of one NoW image."""
    root = pathlib.Path(root)
    image = read_image(root / now_io.IMAGES_DIR / entry.subject / entry.challenge / entry.image)
    box = now_io.read_face_box(root / now_io.FACE_BOXES_DIR / entry.relative(".npy"))
    return crop_image(image, box)


def predict_split(root: os.PathLike, entries: Sequence[now_io.ImageEntry],
                  predict: Callable, faces: np.ndarray, out_dir: os.PathLike, *,
                  batch_size: int = 16, progress: bool = True) -> list[str]:
    """Crop, predict and write every entry; returns the written keys."""
    from tqdm import tqdm

    faces = np.asarray(faces, np.int64)
    written = []
    with tqdm(total=len(entries), desc="NoW predict", unit="image", disable=not progress) as bar:
        for start in range(0, len(entries), batch_size):
            chunk = list(entries[start:start + batch_size])
            images = np.stack([load_crop(root, entry) for entry in chunk])
            vertices, landmarks = predict(images)
            vertices, landmarks = np.asarray(vertices), np.asarray(landmarks)
            if vertices.shape[:1] != (len(chunk),) or vertices.shape[2:] != (3,):
                raise ValueError(f"predict returned vertices of shape {vertices.shape} for "
                                 f"{len(chunk)} images (expected (B, V, 3))")
            if landmarks.shape != (len(chunk), 7, 3):
                raise ValueError(f"predict returned landmarks of shape {landmarks.shape} "
                                 f"(expected ({len(chunk)}, 7, 3))")
            for entry, mesh, points in zip(chunk, vertices, landmarks):
                now_io.write_prediction(out_dir, entry, mesh, faces, points)
                written.append(entry.key)
            bar.update(len(chunk))
    return written


class MeshPredictor:
    """images (B, 224, 224, 3) -> (neutral vertices (B, V, 3) m, landmarks7 (B, 7, 3) m).

    Wraps `recon.trainer.Predictor` (images -> Code, `.mesh(code, neutral=True)`): NoW scores
    the identity, so the mesh has zero expression and pose (as DECA's and MICA's NoW exports).
    `faces` is the trained FLAME model's triangles.
    """

    def __init__(self, predictor):
        self.predictor = predictor
        self.faces = np.asarray(predictor.flame.faces)

    def __call__(self, images):
        vertices, landmarks = self.predictor.mesh(self.predictor(images), neutral=True)
        return np.asarray(vertices), np.asarray(landmarks)


def load_checkpoint_predictor(workdir: os.PathLike) -> Callable:
    """`recon.trainer.load_predictor(workdir)` as a `MeshPredictor`, imported lazily with a
    clear error if this checkout lacks it."""
    try:
        from recon.trainer import load_predictor
    except ImportError as exc:
        raise RuntimeError(
            "predicting from a checkpoint needs recon.trainer.load_predictor(workdir), which "
            f"this checkout does not provide ({exc}); score an existing folder with "
            "--predictions instead") from exc
    predictor = load_predictor(workdir)
    if hasattr(predictor, "mesh") and hasattr(predictor, "flame"):
        return MeshPredictor(predictor)
    return predictor  # already images -> (vertices, landmarks7)
