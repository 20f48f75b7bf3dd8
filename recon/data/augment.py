"""Host-side (numpy + OpenCV) randomisation of synthetic images: backgrounds, occluders, and the
degradations of real photos (blur, noise, JPEG, colour jitter).

Every function takes a `numpy.random.Generator` and is deterministic for it. Images are float32
RGB in [0, 1], (H, W, 3); masks float32 (H, W) in [0, 1]. The aim is breadth, not realism: a
regressor trained on our renderer's faces must not learn the renderer's clean look, so the
backgrounds have structure at many scales, occluders cover parts of the face (and are removed
from the skin mask), and the final image goes through the losses of a cheap camera.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import cv2
import numpy as np

# Skin tones (linear-ish RGB in [0, 1]) from light to dark, for hand-like occluders.
_SKIN_TONES = np.asarray([[0.92, 0.76, 0.66], [0.85, 0.64, 0.52], [0.74, 0.53, 0.40],
                          [0.58, 0.40, 0.29], [0.42, 0.28, 0.20], [0.30, 0.20, 0.15]], np.float32)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and ranges of the host-side randomisation (all per image).

    occluder_probability: chance of at least one occluder; a second one follows with half that.
    occluder_size: occluder extent as a fraction of the face box side (min, max).
    background_blur_probability: defocus of the background (sigma 1..4 px at 224).
    blur_probability, blur_sigma_px: Gaussian blur of the whole image (sigma in px at 224).
    motion_blur_probability: a short linear motion kernel (3..9 px).
    downscale_probability, downscale_range: resolution loss (down then up, factor range).
    noise_probability, noise_std_max: additive Gaussian noise, std ~ U(0, max), per pixel.
    jpeg_probability, jpeg_quality: JPEG re-encoding (cv2.imencode) with quality ~ U(range).
    grayscale_probability: the image becomes grey (old/IR photos).
    brightness, contrast, saturation, gamma: multiplicative jitter ranges; channel_gain_std:
      per-channel white-balance error.
    """

    occluder_probability: float = 0.35
    occluder_size: Tuple[float, float] = (0.15, 0.5)
    background_blur_probability: float = 0.4
    blur_probability: float = 0.25
    blur_sigma_px: Tuple[float, float] = (0.3, 1.6)
    motion_blur_probability: float = 0.08
    downscale_probability: float = 0.15
    downscale_range: Tuple[float, float] = (0.3, 0.8)
    noise_probability: float = 0.5
    noise_std_max: float = 0.03
    jpeg_probability: float = 0.5
    jpeg_quality: Tuple[int, int] = (30, 95)
    grayscale_probability: float = 0.05
    brightness: Tuple[float, float] = (0.75, 1.25)
    contrast: Tuple[float, float] = (0.75, 1.25)
    saturation: Tuple[float, float] = (0.6, 1.3)
    gamma: Tuple[float, float] = (0.8, 1.25)
    channel_gain_std: float = 0.05

    @classmethod
    def clean(cls) -> "AugmentConfig":
        """No occluders and no degradations (debugging, figures); backgrounds stay random."""
        return cls(occluder_probability=0.0, background_blur_probability=0.0,
                   blur_probability=0.0, motion_blur_probability=0.0, downscale_probability=0.0,
                   noise_probability=0.0, jpeg_probability=0.0, grayscale_probability=0.0,
                   brightness=(1.0, 1.0), contrast=(1.0, 1.0), saturation=(1.0, 1.0),
                   gamma=(1.0, 1.0), channel_gain_std=0.0)

    @classmethod
    def occluders_only(cls) -> "AugmentConfig":
        """Occluders at their usual rate and sizes, no photo degradations: faces partly hidden
        (hands, objects) in otherwise clean renders."""
        return dataclasses.replace(cls.clean(), occluder_probability=cls.occluder_probability)


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour, biased away from pure saturation (HSV sampling)."""
    hsv = np.asarray([[[rng.uniform(0, 180), rng.uniform(0, 200), rng.uniform(30, 255)]]],
                     np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0


def value_noise(rng: np.random.Generator, size: Tuple[int, int], *, octaves: int = 5,
                base_cells: int = 2, persistence: float = 0.55) -> np.ndarray:
    """(H, W) fractal value noise ('Perlin-ish'): bicubic-upsampled random grids, octaves
    doubling in frequency with amplitude persistence**octave; normalised to [0, 1]."""
    height, width = size
    total = np.zeros((height, width), np.float32)
    amplitude = 1.0
    for octave in range(octaves):
        cells = base_cells * 2 ** octave
        grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
        total += amplitude * cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
        amplitude *= persistence
    total -= total.min()
    return total / max(float(total.max()), 1e-6)


def _palette(rng: np.random.Generator, field: np.ndarray) -> np.ndarray:
    """Map a (H, W) field in [0, 1] through a random 2- or 3-colour ramp -> (H, W, 3)."""
    count = int(rng.integers(2, 4))
    colours = np.stack([_colour(rng) for _ in range(count)])
    position = field * (count - 1)
    low = np.clip(np.floor(position).astype(np.int32), 0, count - 2)
    frac = (position - low)[..., None]
    return (1 - frac) * colours[low] + frac * colours[low + 1]


def background(rng: np.random.Generator, size: Tuple[int, int],
               config: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """(H, W, 3) float32 random background: flat, gradient, fractal noise, random shapes or
    stripes/checks, optionally defocused."""
    height, width = size
    kind = rng.choice(["flat", "gradient", "noise", "shapes", "stripes"],
                      p=[0.1, 0.2, 0.3, 0.3, 0.1])
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "flat":
        image = np.broadcast_to(_colour(rng), (height, width, 3)).copy()
    elif kind == "gradient":
        if rng.random() < 0.7:
            angle = rng.uniform(0, 2 * np.pi)
            t = np.cos(angle) * xs / width + np.sin(angle) * ys / height
        else:
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            t = np.hypot(xs - cx, ys - cy) / np.hypot(width, height)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        image = _palette(rng, t)
    elif kind == "noise":
        field = value_noise(rng, size, base_cells=int(rng.integers(1, 5)),
                            persistence=rng.uniform(0.35, 0.7))
        image = _palette(rng, field)
        if rng.random() < 0.5:  # a second field in another channel mix for colour structure
            image = 0.6 * image + 0.4 * _palette(rng, value_noise(rng, size))
    elif kind == "shapes":
        image = _palette(rng, value_noise(rng, size, octaves=2))
        canvas = np.ascontiguousarray(image)
        scale = max(height, width)
        for _ in range(int(rng.integers(5, 30))):
            colour = tuple(float(c) for c in _colour(rng))
            centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            extent = int(rng.uniform(0.03, 0.35) * scale) + 1
            shape = rng.integers(0, 4)
            if shape == 0:
                corner = (centre[0] + int(rng.integers(-extent, extent)),
                          centre[1] + int(rng.integers(-extent, extent)))
                cv2.rectangle(canvas, centre, corner, colour, -1)
            elif shape == 1:
                cv2.circle(canvas, centre, extent, colour, -1, cv2.LINE_AA)
            elif shape == 2:
                end = (centre[0] + int(rng.integers(-2 * extent, 2 * extent)),
                       centre[1] + int(rng.integers(-2 * extent, 2 * extent)))
                cv2.line(canvas, centre, end, colour, int(rng.integers(1, 8)), cv2.LINE_AA)
            else:
                points = _polygon(rng, centre, extent, int(rng.integers(3, 7)))
                cv2.fillPoly(canvas, [points], colour, cv2.LINE_AA)
        image = canvas
    else:
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.03, 0.3) * max(height, width)
        u = (np.cos(angle) * xs + np.sin(angle) * ys) / period
        if rng.random() < 0.5:
            t = 0.5 + 0.5 * np.sin(2 * np.pi * u)
        else:
            v = (-np.sin(angle) * xs + np.cos(angle) * ys) / period
            t = ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
        image = _palette(rng, t)
    image = np.asarray(image, np.float32)
    if rng.random() < config.background_blur_probability:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(1.0, 4.0) * max(height, width) / 224)
    return np.clip(image, 0.0, 1.0)


def _polygon(rng: np.random.Generator, centre, radius: float, count: int) -> np.ndarray:
    """(count, 2) int32 star-shaped polygon around `centre` (sorted angles, jittered radii)."""
    angles = np.sort(rng.uniform(0, 2 * np.pi, count))
    radii = radius * rng.uniform(0.4, 1.0, count)
    points = np.stack([centre[0] + radii * np.cos(angles), centre[1] + radii * np.sin(angles)], 1)
    return np.round(points).astype(np.int32)


def _fill(rng: np.random.Generator, size: Tuple[int, int]) -> np.ndarray:
    """(H, W, 3) fill of an occluder: a colour, a shaded colour or a noise texture."""
    height, width = size
    kind = rng.integers(0, 3)
    if kind == 0:
        return np.broadcast_to(_colour(rng), (height, width, 3)).astype(np.float32)
    if kind == 1:
        ramp = np.linspace(rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0), width, dtype=np.float32)
        return _colour(rng)[None, None] * ramp[None, :, None] * np.ones((height, 1, 1), np.float32)
    return _palette(rng, value_noise(rng, size, base_cells=int(rng.integers(2, 8)))).astype(
        np.float32)


def _hand(rng: np.random.Generator, mask: np.ndarray, centre, extent: float) -> np.ndarray:
    """Draw a hand-like blob (palm ellipse + finger capsules) into `mask`; returns its colour
    layer (a skin tone with a shading ramp)."""
    height, width = mask.shape
    direction = rng.uniform(0, 2 * np.pi)
    palm_axes = (max(int(extent * 0.45), 2), max(int(extent * 0.35), 2))
    cv2.ellipse(mask, centre, palm_axes, np.degrees(direction), 0, 360, 255, -1, cv2.LINE_AA)
    fingers = int(rng.integers(3, 6))
    spread = rng.uniform(0.5, 1.1)
    for k in range(fingers):
        angle = direction + spread * (k / max(fingers - 1, 1) - 0.5)
        start = (int(centre[0] + np.cos(angle) * palm_axes[0] * 0.7),
                 int(centre[1] + np.sin(angle) * palm_axes[0] * 0.7))
        length = extent * rng.uniform(0.45, 0.8)
        end = (int(start[0] + np.cos(angle) * length), int(start[1] + np.sin(angle) * length))
        cv2.line(mask, start, end, 255, max(int(extent * rng.uniform(0.1, 0.16)), 2), cv2.LINE_AA)
    tone = _SKIN_TONES[rng.integers(0, len(_SKIN_TONES))] * rng.uniform(0.85, 1.1, 3)
    ramp = np.linspace(rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0), height, dtype=np.float32)
    return np.clip(tone[None, None] * ramp[:, None, None] * np.ones((1, width, 1)), 0, 1)


def occluders(rng: np.random.Generator, size: Tuple[int, int], face_box: np.ndarray,
              config: AugmentConfig = AugmentConfig()) -> Tuple[np.ndarray, np.ndarray]:
    """Random occluders over the face: polygons, ellipses, bars and hand-like blobs.

    Args:
      size: (H, W).
      face_box: (4,) [left, top, right, bottom] pixels of the face (from its landmarks).
    Returns:
      colour (H, W, 3) float32 and alpha (H, W) float32 in [0, 1] (anti-aliased edges); alpha
      is zero everywhere when no occluder was drawn.
    """
    height, width = size
    colour = np.zeros((height, width, 3), np.float32)
    alpha = np.zeros((height, width), np.float32)
    count = 0
    if rng.random() < config.occluder_probability:
        count = 1 + int(rng.random() < 0.5)
    left, top, right, bottom = [float(v) for v in face_box]
    side = max(right - left, bottom - top, 1.0)
    for _ in range(count):
        mask = np.zeros((height, width), np.uint8)
        extent = side * rng.uniform(*config.occluder_size)
        # Centre inside the face box widened a little, so most occluders overlap the face.
        centre = (int(rng.uniform(left - 0.1 * side, right + 0.1 * side)),
                  int(rng.uniform(top - 0.1 * side, bottom + 0.1 * side)))
        kind = rng.choice(["polygon", "ellipse", "bar", "hand"], p=[0.3, 0.25, 0.15, 0.3])
        if kind == "hand":
            layer = _hand(rng, mask, centre, 1.3 * extent)
        else:
            if kind == "polygon":
                cv2.fillPoly(mask, [_polygon(rng, centre, extent, int(rng.integers(3, 9)))], 255,
                             cv2.LINE_AA)
            elif kind == "ellipse":
                axes = (max(int(extent * rng.uniform(0.3, 1.0)), 2),
                        max(int(extent * rng.uniform(0.2, 0.7)), 2))
                cv2.ellipse(mask, centre, axes, rng.uniform(0, 180), 0, 360, 255, -1, cv2.LINE_AA)
            else:
                angle = rng.uniform(0, np.pi)
                half = np.asarray([np.cos(angle), np.sin(angle)]) * 1.5 * extent
                cv2.line(mask, (int(centre[0] - half[0]), int(centre[1] - half[1])),
                         (int(centre[0] + half[0]), int(centre[1] + half[1])), 255,
                         max(int(extent * rng.uniform(0.08, 0.3)), 2), cv2.LINE_AA)
            layer = _fill(rng, size)
        layer_alpha = mask.astype(np.float32) / 255.0
        colour = layer_alpha[..., None] * layer + (1 - layer_alpha[..., None]) * colour
        alpha = layer_alpha + (1 - layer_alpha) * alpha
    return colour.astype(np.float32), alpha.astype(np.float32)


def jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    """Round trip through cv2's JPEG codec (RGB in, RGB out, float [0, 1])."""
    bgr = cv2.cvtColor(np.clip(np.round(image * 255), 0, 255).astype(np.uint8), cv2.COLOR_RGB2BGR)
    ok, encoded = cv2.imencode(".jpg", bgr, [int(cv2.IMWRITE_JPEG_QUALITY), int(quality)])
    if not ok:
        raise RuntimeError("cv2.imencode failed to encode a JPEG")
    decoded = cv2.imdecode(encoded, cv2.IMREAD_COLOR)
    return cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0


def colour_jitter(rng: np.random.Generator, image: np.ndarray,
                  config: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """Brightness, contrast, saturation, gamma, white balance and grey conversion."""
    image = image * rng.uniform(*config.brightness)
    grey = image @ np.asarray([0.299, 0.587, 0.114], np.float32)
    mean = float(grey.mean())
    image = mean + (image - mean) * rng.uniform(*config.contrast)
    grey = (image @ np.asarray([0.299, 0.587, 0.114], np.float32))[..., None]
    image = grey + (image - grey) * rng.uniform(*config.saturation)
    image = image * (1.0 + rng.normal(0.0, config.channel_gain_std, 3)).astype(np.float32)
    image = np.clip(image, 0.0, 1.0) ** rng.uniform(*config.gamma)
    if rng.random() < config.grayscale_probability:
        image = np.repeat(image @ np.asarray([[0.299], [0.587], [0.114]], np.float32), 3, -1)
    return image.astype(np.float32)


def degrade(rng: np.random.Generator, image: np.ndarray,
            config: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """The losses of a cheap camera, in capture order: optics (blur), resolution, colour
    processing, sensor noise, JPEG. (H, W, 3) float32 [0, 1] -> same."""
    height, width = image.shape[:2]
    scale = max(height, width) / 224.0
    if rng.random() < config.blur_probability:
        image = cv2.GaussianBlur(image, (0, 0), rng.uniform(*config.blur_sigma_px) * scale)
    if rng.random() < config.motion_blur_probability:
        length = int(rng.integers(3, 10))
        kernel = np.zeros((length, length), np.float32)
        kernel[length // 2] = 1.0 / length
        rotation = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2),
                                           rng.uniform(0, 180), 1.0)
        kernel = cv2.warpAffine(kernel, rotation, (length, length))
        image = cv2.filter2D(image, -1, kernel / max(float(kernel.sum()), 1e-6))
    if rng.random() < config.downscale_probability:
        factor = rng.uniform(*config.downscale_range)
        small = cv2.resize(image, (max(int(width * factor), 8), max(int(height * factor), 8)),
                           interpolation=cv2.INTER_AREA)
        image = cv2.resize(small, (width, height), interpolation=cv2.INTER_LINEAR)
    image = colour_jitter(rng, image, config)
    if rng.random() < config.noise_probability:
        sigma = rng.uniform(0.0, config.noise_std_max)
        image = image + rng.normal(0.0, sigma, image.shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0)
    if rng.random() < config.jpeg_probability:
        image = jpeg(image, int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1)))
    return np.clip(image, 0.0, 1.0).astype(np.float32)
