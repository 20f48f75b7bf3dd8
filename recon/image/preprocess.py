"""The backbone's input from a face crop: one resize, one normalisation, on host and on device.

    inputs = backbone_input(crops, "dlib")          # numpy, host (data pipeline, NoW, photos)
    inputs = backbone_input_jax(crops, "dlib")      # jax, inside jitted steps (rendered images)

The two are the same computation: the resize is a pair of fixed matrices (`resize_weights`:
exact area averaging when shrinking, as OpenCV's INTER_AREA; bilinear with half-pixel centres and
clamped borders when enlarging, as INTER_LINEAR; the identity at equal sizes) applied by one
einsum, so host and device agree to float rounding at every size (tested).

Kinds (`BACKBONE_INPUT_SIZE`):
  "arcface": 112 x 112, (pixel - 127.5) / 127.5 on 0..255 values (insightface / arcface_torch;
             a 224 crop shrinks by an exact 2 x 2 average, which is also what MICA's
             `cv2.dnn.blobFromImages(..., (112, 112))` of a 224 crop computes).
  "dlib":    150 x 150, pixel values 0..255 (dlib's network subtracts its channel means and
             scales by 1/256 itself, `recon.model.dlib_resnet`).
Channels are passed through (give RGB).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

BACKBONE_INPUT_SIZE = {"arcface": 112, "dlib": 150}


def _check_kind(kind: str) -> int:
    if kind not in BACKBONE_INPUT_SIZE:
        raise ValueError(f"backbone input kind must be one of {sorted(BACKBONE_INPUT_SIZE)}, "
                         f"got {kind!r}")
    return BACKBONE_INPUT_SIZE[kind]


@functools.lru_cache(maxsize=64)
def resize_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out_size, in_size) float32 row weights of a 1-D resize (rows sum to 1).

    Shrinking: output pixel k averages the input over [k r, (k + 1) r), r = in / out, with
    fractional weights at the ends (INTER_AREA). Enlarging: bilinear at input position
    (k + 0.5) / r' - 0.5, r' = out / in, clamped to the first and last pixel (INTER_LINEAR).
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"resize sizes must be >= 1, got {in_size} -> {out_size}")
    weights = np.zeros((out_size, in_size), np.float64)
    if out_size == in_size:
        return np.eye(in_size, dtype=np.float32)
    if out_size < in_size:
        ratio = in_size / out_size
        for k in range(out_size):
            start, stop = k * ratio, (k + 1) * ratio
            for j in range(int(np.floor(start)), min(int(np.ceil(stop)), in_size)):
                weights[k, j] = min(stop, j + 1) - max(start, j)
        weights /= ratio
    else:
        for k in range(out_size):
            position = (k + 0.5) * in_size / out_size - 0.5
            position = min(max(position, 0.0), in_size - 1.0)
            low = int(np.floor(position))
            high = min(low + 1, in_size - 1)
            fraction = position - low
            weights[k, low] += 1.0 - fraction
            weights[k, high] += fraction
    return weights.astype(np.float32)


def _check_crops(crops, what: str) -> None:
    shape = np.shape(crops)
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{what}: expected (B, H, W, 3) crops, got shape {shape}")


def resize(images, size: int) -> np.ndarray:
    """(B, H, W, C) -> (B, size, size, C) float32 on the host (`resize_weights`; two BLAS
    products, as fast as OpenCV's resize here)."""
    images = np.asarray(images, np.float32)
    rows = resize_weights(images.shape[1], size)
    cols = resize_weights(images.shape[2], size)
    out = np.tensordot(rows, images, axes=([1], [1]))         # (size, B, W, C)
    out = np.tensordot(out, cols, axes=([2], [1]))            # (size, B, C, size)
    return np.ascontiguousarray(out.transpose(1, 0, 3, 2), dtype=np.float32)


def resize_jax(images: jax.Array, size: int) -> jax.Array:
    """The same resize on device (differentiable)."""
    images = jnp.asarray(images, jnp.float32)
    rows = jnp.asarray(resize_weights(int(images.shape[1]), size))
    cols = jnp.asarray(resize_weights(int(images.shape[2]), size))
    return jnp.einsum("oh,bhwc,pw->bopc", rows, images, cols,
                      precision=jax.lax.Precision.HIGHEST)


def _normalise(pixels_255, kind: str):
    if kind == "arcface":
        return (pixels_255 - 127.5) / 127.5
    return pixels_255


def backbone_input(crops, kind: str, *, max_value: float = 1.0) -> np.ndarray:
    """(B, H, W, 3) crops with values 0..max_value (uint8 with max_value=255, or float) ->
    (B, n, n, 3) float32 backbone input of `kind` (n = `BACKBONE_INPUT_SIZE[kind]`)."""
    size = _check_kind(kind)
    _check_crops(crops, "backbone_input")
    crops = np.asarray(crops, np.float32)
    if not np.all(np.isfinite(crops)):
        raise ValueError("backbone_input: crops hold NaN or infinite values")
    pixels = resize(crops, size) * np.float32(255.0 / max_value)
    return _normalise(pixels, kind).astype(np.float32)


def backbone_input_jax(crops: jax.Array, kind: str, *, max_value: float = 1.0) -> jax.Array:
    """`backbone_input` on device (differentiable; rendered images inside a jitted step)."""
    size = _check_kind(kind)
    _check_crops(crops, "backbone_input_jax")
    pixels = resize_jax(crops, size) * (255.0 / max_value)
    return _normalise(pixels, kind)
