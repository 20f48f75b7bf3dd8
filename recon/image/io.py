"""The one image reader: a file -> (H, W, 3) uint8 RGB, or `ImageReadError` naming the file.

Pillow decodes (JPEG, PNG, BMP, TIFF, WebP, ...); greyscale, palette, 16-bit and alpha images
become 8-bit RGB (alpha dropped). EXIF orientation is NOT applied unless asked: NoW's detected
boxes and MICA's crops were made on the stored pixel order, while phone photos given to
`python -m recon.predict` are turned upright (`apply_exif_orientation=True`) before detection.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np


class ImageReadError(ValueError):
    """A file that is missing or is not a readable image (the message names the file)."""


def read_image(path: os.PathLike, *, apply_exif_orientation: bool = False) -> np.ndarray:
    """Image file -> (H, W, 3) uint8 RGB.

    Raises ImageReadError naming the file when it does not exist, cannot be decoded, is
    truncated, or has fewer than 2 rows or columns.
    """
    from PIL import Image, ImageOps

    path = pathlib.Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such image file")
    try:
        with Image.open(path) as image:
            image.load()
            if apply_exif_orientation:
                image = ImageOps.exif_transpose(image)
            if image.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit greyscale: Pillow's RGB conversion would clip; scale to 8 bits.
                pixels = np.asarray(image, np.float64)
                peak = 65535.0 if pixels.max() > 255 else 255.0
                grey = np.round(np.clip(pixels / peak, 0, 1) * 255).astype(np.uint8)
                rgb = np.repeat(grey[..., None], 3, axis=-1)
            else:
                rgb = np.asarray(image.convert("RGB"))
    except Exception as error:  # Pillow raises several types (UnidentifiedImageError, OSError)
        raise ImageReadError(f"{path}: not a readable image ({type(error).__name__}: {error})") \
            from error
    if rgb.ndim != 3 or rgb.shape[2] != 3 or min(rgb.shape[:2]) < 2:
        raise ImageReadError(f"{path}: image has unusable shape {rgb.shape}")
    return np.ascontiguousarray(rgb)


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float32 in [0, 1]; float input is checked to be finite and returned
    as float32."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    image = image.astype(np.float32)
    if not np.all(np.isfinite(image)):
        raise ValueError("image holds NaN or infinite values")
    return image
