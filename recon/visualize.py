"""PNG grids for looking at a regressor's predictions (host numpy + OpenCV, not differentiable).

One row per example: input crop | shaded render on grey | render composited over the input with
the predicted (red) and ground-truth (green) 68 landmarks.
"""

from __future__ import annotations

import pathlib

import cv2
import numpy as np

from flame_jax.fileio import atomic_write

PREDICTED_COLOR = (255, 40, 40)   # RGB
TRUTH_COLOR = (40, 220, 40)


def to_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) float in [0, 1] (clipped) -> uint8."""
    return np.round(np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def draw_landmarks(image: np.ndarray, landmarks_px: np.ndarray, color, *,
                   weights: np.ndarray | None = None, radius: int = 1) -> np.ndarray:
    """Copy of uint8 `image` (H, W, 3) with (68, 2) pixel landmarks (u, v) drawn as dots.

    Landmarks with weight 0 or non-finite coordinates are skipped.
    """
    canvas = np.ascontiguousarray(image.copy())
    for index, (u, v) in enumerate(np.asarray(landmarks_px, np.float64)):
        if weights is not None and weights[index] <= 0:
            continue
        if not (np.isfinite(u) and np.isfinite(v)):
            continue
        # Pixel centres are at +0.5 (recon.render.camera): pixel column floor(u), row floor(v).
        cv2.circle(canvas, (int(np.floor(u)), int(np.floor(v))), radius, color, -1,
                   lineType=cv2.LINE_AA)
    return canvas


def prediction_rows(images: np.ndarray, render_images: np.ndarray, alphas: np.ndarray,
                    predicted_landmarks: np.ndarray, true_landmarks: np.ndarray,
                    landmark_weights: np.ndarray | None = None) -> np.ndarray:
    """One (H, 3 W, 3) uint8 row per example, stacked: (B * H, 3 W, 3).

    images, render_images: (B, H, W, 3) float [0, 1]; alphas: (B, H, W) coverage;
    landmarks: (B, 68, 2) pixels of the same H x W image. Renders of another size are resized.
    """
    images = np.asarray(images, np.float32)
    height, width = images.shape[1:3]
    rows = []
    for b in range(images.shape[0]):
        render_image = np.asarray(render_images[b], np.float32)
        alpha = np.asarray(alphas[b], np.float32)
        if render_image.shape[:2] != (height, width):
            render_image = cv2.resize(render_image, (width, height), interpolation=cv2.INTER_LINEAR)
            alpha = cv2.resize(alpha, (width, height), interpolation=cv2.INTER_LINEAR)
        alpha = alpha[..., None]
        shaded = alpha * render_image + (1.0 - alpha) * 0.5
        overlay = to_uint8(alpha * render_image + (1.0 - alpha) * images[b])
        weights = None if landmark_weights is None else np.asarray(landmark_weights[b])
        overlay = draw_landmarks(overlay, true_landmarks[b], TRUTH_COLOR, weights=weights)
        overlay = draw_landmarks(overlay, predicted_landmarks[b], PREDICTED_COLOR)
        rows.append(np.concatenate([to_uint8(images[b]), to_uint8(shaded), overlay], axis=1))
    return np.concatenate(rows, axis=0)


def write_png(path, image: np.ndarray) -> pathlib.Path:
    """Write an RGB uint8 image atomically (`flame_jax.fileio.atomic_write`), creating its folder."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(np.asarray(image, np.uint8), cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"OpenCV could not encode an image of shape {np.shape(image)} as PNG")
    return atomic_write(path, encoded.tobytes())


def plot_evaluation(history, path) -> pathlib.Path:
    """PNG of the held-out errors against the step: the whole head and the face region (rigid
    alignment) and the whole head after a similarity alignment, each beside its mean-face
    (zero-skill) level and, when the run measured it, the ridge baseline's; then the landmark
    error, and the NoW validation median when the run scored NoW.

    history: the entries of `evaluation_history.json` ({"step", "vertex_error_mm", ...}).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = sorted(history, key=lambda entry: entry["step"])
    steps = [entry["step"] for entry in entries]
    has_now = all("now_median_mm" in entry for entry in entries)
    figure, axes = plt.subplots(1, 3 if has_now else 2, figsize=(15 if has_now else 10, 3.8))
    for key, label, colour in (("vertex_error_mm", "whole head", "C0"),
                               ("face_vertex_error_mm", "face region", "C2"),
                               ("scaled_vertex_error_mm", "whole head, with scale", "C1")):
        if not all(key in entry for entry in entries):
            continue
        axes[0].plot(steps, [entry[key] for entry in entries], "o-", color=colour,
                     label=f"model, {label}")
        axes[0].plot(steps, [entry[f"mean_face_{key}"] for entry in entries], "--",
                     color=colour, label=f"mean face, {label}")
        if all(f"ridge_{key}" in entry for entry in entries):
            axes[0].plot(steps, [entry[f"ridge_{key}"] for entry in entries], ":",
                         color=colour, label=f"ridge on the frozen embedding, {label}")
    axes[0].set(xlabel="step", ylabel="mm", title="held-out neutral-mesh error")
    axes[0].legend(fontsize=7)
    if all("landmark_error_px" in entry for entry in entries):
        axes[1].plot(steps, [entry["landmark_error_px"] for entry in entries], "o-")
    axes[1].set(xlabel="step", ylabel="px", title="held-out landmark error")
    if has_now:
        axes[2].plot(steps, [entry["now_median_mm"] for entry in entries], "o-",
                     label="model")
        if all("now_mean_face_median_mm" in entry for entry in entries):
            axes[2].plot(steps, [entry["now_mean_face_median_mm"] for entry in entries], "--",
                         label="mean face")
        axes[2].set(xlabel="step", ylabel="mm", title="NoW validation median (non-metrical)")
        axes[2].legend(fontsize=7)
    for axis in axes:
        axis.grid(True, alpha=0.3)
    figure.tight_layout()
    path = pathlib.Path(path)
    atomic_write(path, lambda stream: figure.savefig(stream, format="png", dpi=100))
    plt.close(figure)
    return path
