"""Images -> the backbone's input: (112, 112, 3) float32 RGB, (pixel - 127.5) / 127.5.

Default path (training, NoW boxes, photos): `backbone_input_from_crop`, the 224 x 224 face crop
downsampled to 112 with cv2.INTER_AREA (an exact 2 x 2 box average). `backbone_input_from_crop_jax`
is the same on device (for rendered composites inside a jitted step).
Option when 5 landmarks exist: `align_five_points`, insightface's similarity alignment to the
ArcFace template (`ARCFACE_TEMPLATE_112`; least-squares similarity, Umeyama 1991, as
skimage.transform.SimilarityTransform which insightface uses). Channel order is whatever comes in
(pass RGB: insightface's ONNX models were trained on RGB); pixel values are 0..255 unless
`max_value` says otherwise.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

BACKBONE_SIZE = 112

# insightface `arcface_dst`: left eye, right eye, nose tip, left and right mouth corners (pixels
# of the 112 x 112 aligned image; "left" = image left).
ARCFACE_TEMPLATE_112 = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                                 [41.5493, 92.3655], [70.7299, 92.2041]], np.float32)


def normalize_pixels(image, *, max_value: float = 255.0) -> np.ndarray:
    """(x * 255 / max_value - 127.5) / 127.5 as float32 (ArcFace's input normalisation)."""
    image = np.asarray(image, np.float32)
    if max_value != 255.0:
        image = image * np.float32(255.0 / max_value)
    return (image - np.float32(127.5)) / np.float32(127.5)


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"{what}: expected an (H, W, 3) image, got shape {image.shape}")
    if not np.all(np.isfinite(image)):
        raise ValueError(f"{what}: image holds non-finite values")
    return image


def backbone_input_from_crop(crop, *, max_value: float = 255.0) -> np.ndarray:
    """(H, W, 3) or (B, H, W, 3) face crop (224 x 224 by default) -> (..., 112, 112, 3) input.

    cv2.resize INTER_AREA to 112 (for 224 an exact 2 x 2 average), then normalisation.
    uint8 or float input with values 0..max_value; channels kept (pass RGB).
    """
    import cv2

    crop = np.asarray(crop)
    if crop.ndim == 4:
        return np.stack([backbone_input_from_crop(c, max_value=max_value) for c in crop])
    # float before resizing: no rounding back to uint8, so host and device paths agree.
    crop = _check_image(crop, "backbone_input_from_crop").astype(np.float32)
    if crop.shape[:2] != (BACKBONE_SIZE, BACKBONE_SIZE):
        crop = cv2.resize(crop, (BACKBONE_SIZE, BACKBONE_SIZE), interpolation=cv2.INTER_AREA)
    return normalize_pixels(crop, max_value=max_value)


def backbone_input_from_crop_jax(crops: jax.Array, *, max_value: float = 255.0) -> jax.Array:
    """(B, H, W, 3) crops on device -> (B, 112, 112, 3), differentiable.

    H, W multiples of 112 (224: the default crop): box average over (H/112 x W/112), which is
    what cv2.INTER_AREA computes for integer factors; other sizes use antialiased linear resize.
    """
    batch, height, width, channels = crops.shape
    crops = crops.astype(jnp.float32)
    if height % BACKBONE_SIZE == 0 and width % BACKBONE_SIZE == 0:
        fy, fx = height // BACKBONE_SIZE, width // BACKBONE_SIZE
        small = crops.reshape(batch, BACKBONE_SIZE, fy, BACKBONE_SIZE, fx, channels).mean((2, 4))
    else:
        small = jax.image.resize(crops, (batch, BACKBONE_SIZE, BACKBONE_SIZE, channels),
                                 "linear", antialias=True)
    return (small * (255.0 / max_value) - 127.5) / 127.5


def similarity_umeyama(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(2, 3) least-squares similarity (rotation, uniform scale, shift) taking source to target.

    source, target: (N, 2) points, N >= 2. Umeyama (1991), eq. 40-42, reflection excluded.
    """
    source = np.asarray(source, np.float64)
    target = np.asarray(target, np.float64)
    if source.shape != target.shape or source.ndim != 2 or source.shape[1] != 2 or len(
            source) < 2:
        raise ValueError(f"similarity_umeyama: need matching (N>=2, 2) points, got "
                         f"{source.shape} and {target.shape}")
    mean_s, mean_t = source.mean(0), target.mean(0)
    src, dst = source - mean_s, target - mean_t
    covariance = dst.T @ src / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(covariance) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    variance = (src ** 2).sum() / len(source)
    if variance <= 0:
        raise ValueError("similarity_umeyama: source points coincide")
    scale = (singular * sign).sum() / variance
    shift = mean_t - scale * rotation @ mean_s
    return np.concatenate([scale * rotation, shift[:, None]], axis=1)


def arcface_alignment_matrix(points_5) -> np.ndarray:
    """(2, 3) similarity from image pixels to the 112 ArcFace template, for (5, 2) points.

    Points in pixel coordinates (x right, y down) in insightface's order: left eye, right eye,
    nose tip, left mouth corner, right mouth corner.
    """
    points = np.asarray(points_5, np.float64)
    if points.shape != (5, 2) or not np.all(np.isfinite(points)):
        raise ValueError(f"arcface_alignment_matrix: expected finite (5, 2) points, got "
                         f"{points.shape}")
    return similarity_umeyama(points, ARCFACE_TEMPLATE_112)


def align_five_points(image, points_5, *, max_value: float = 255.0) -> np.ndarray:
    """(H, W, 3) image + (5, 2) pixel landmarks -> (112, 112, 3) normalised backbone input.

    insightface's `norm_crop`: similarity to `ARCFACE_TEMPLATE_112`, cv2.warpAffine (bilinear,
    black border), then (x - 127.5) / 127.5. Channels kept (pass RGB).
    """
    import cv2

    image = _check_image(image, "align_five_points")
    if image.dtype != np.uint8:
        image = image.astype(np.float32)
    matrix = arcface_alignment_matrix(points_5)
    warped = cv2.warpAffine(image, matrix, (BACKBONE_SIZE, BACKBONE_SIZE), flags=cv2.INTER_LINEAR,
                            borderValue=0.0)
    return normalize_pixels(warped, max_value=max_value)
