"""2-D similarity transforms as (2, 3) matrices [A | t] (x -> A x + t): the one least-squares
fit (Umeyama 1991, reflection excluded: what skimage's SimilarityTransform, insightface and dlib's
find_similarity_transform compute), inverse, composition, point mapping and scale."""

from __future__ import annotations

import numpy as np


class SimilarityError(ValueError):
    """Points from which no similarity can be fitted (the message says why)."""


def check_points(points, count, what: str, error: type = SimilarityError) -> np.ndarray:
    """(N, 2) float64 finite points (N = count unless None); `error` naming `what` otherwise."""
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or (count is not None and len(points) != count):
        want = f"({count}, 2)" if count is not None else "(N, 2)"
        raise error(f"{what}: expected {want} points, got shape {points.shape}")
    if not np.all(np.isfinite(points)):
        raise error(f"{what}: points hold NaN or infinite values")
    return points


def fit_similarity(source, target) -> np.ndarray:
    """(2, 3) least-squares similarity (rotation, uniform scale, shift) taking source to target.

    source, target: (N, 2) points, N >= 2.
    """
    source = check_points(source, None, "fit_similarity source")
    target = check_points(target, len(source), "fit_similarity target")
    if len(source) < 2:
        raise SimilarityError("fit_similarity needs at least 2 points")
    mean_s, mean_t = source.mean(0), target.mean(0)
    src, dst = source - mean_s, target - mean_t
    variance = (src ** 2).sum() / len(source)
    if variance <= 1e-12:
        raise SimilarityError("fit_similarity: the source points coincide")
    covariance = dst.T @ src / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    sign = np.ones(2)
    if np.linalg.det(covariance) < 0:
        sign[-1] = -1.0
    rotation = u @ np.diag(sign) @ vt
    scale = (singular * sign).sum() / variance
    shift = mean_t - scale * rotation @ mean_s
    return np.concatenate([scale * rotation, shift[:, None]], axis=1)


def invert(matrix) -> np.ndarray:
    """(2, 3) inverse of an invertible 2 x 3 affine map."""
    matrix = np.asarray(matrix, np.float64)
    linear = np.linalg.inv(matrix[:, :2])
    return np.concatenate([linear, -linear @ matrix[:, 2:]], axis=1)


def compose(outer, inner) -> np.ndarray:
    """(2, 3) map x -> outer(inner(x))."""
    outer, inner = np.asarray(outer, np.float64), np.asarray(inner, np.float64)
    return np.concatenate([outer[:, :2] @ inner[:, :2],
                           outer[:, :2] @ inner[:, 2:] + outer[:, 2:]], axis=1)


def transform_points(matrix, points) -> np.ndarray:
    """(N, 2) points mapped by a (2, 3) matrix (float64)."""
    points = np.asarray(points, np.float64)
    matrix = np.asarray(matrix, np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def similarity_scale(matrix) -> float:
    """The uniform scale of a similarity."""
    matrix = np.asarray(matrix, np.float64)
    return float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))


def shift_pixel_centres(matrix, offset: float) -> np.ndarray:
    """The same map in coordinates shifted by `offset` on both sides:
    M'(p) = M(p - offset) + offset (offset 0.5 turns a map between OpenCV/dlib pixel-index
    coordinates, centres at integers, into one between continuous coordinates, centres at
    +0.5, and -0.5 back)."""
    matrix = np.asarray(matrix, np.float64)
    linear = matrix[:, :2]
    shift = matrix[:, 2] - linear @ np.array([offset, offset]) + offset
    return np.concatenate([linear, shift[:, None]], axis=1)
