"""A linear read-out of the frozen pretrained network: the baseline the trained regressor must
beat, measured in the same run on the same data.

`ridge_baseline(...)` fits a ridge regression from the pretrained backbone's own embedding
(dlib's 128-d descriptor, ArcFace's 512-d embedding; the weights as imported, not the run's
fine-tuned ones) of every training-pool image to its subject's neutral mesh, chooses the ridge
penalty on the last tenth of the training subjects, refits on all of them, and scores the
held-out subjects' images with the same errors as the model (`evaluation.mesh_errors`:
rigid-aligned whole head, face region, similarity-aligned). Features are standardised with the
training statistics; the closed form runs in float64 on the host.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from recon.training.regressor.evaluation import ERROR_NAMES, mesh_errors

PENALTIES = (1e-1, 1e0, 1e1, 1e2, 1e3, 1e4, 1e5)
VALIDATION_FRACTION = 0.1


def _fit(features: np.ndarray, targets: np.ndarray, penalty: float):
    """(weights (F, T), mean_feature, std_feature, mean_target) of a ridge regression."""
    mean, std = features.mean(0), features.std(0) + 1e-8
    z = (features - mean) / std
    target_mean = targets.mean(0)
    gram = z.T @ z + penalty * np.eye(z.shape[1])
    weights = np.linalg.solve(gram, z.T @ (targets - target_mean))
    return weights, mean, std, target_mean


def _predict(model, features: np.ndarray) -> np.ndarray:
    weights, mean, std, target_mean = model
    return ((features - mean) / std) @ weights + target_mean


def ridge_baseline(train_embeddings: np.ndarray, train_subjects: np.ndarray,
                   train_vertices: np.ndarray, held_out_embeddings: np.ndarray,
                   held_out_vertices: np.ndarray, face_vertices: np.ndarray,
                   penalties: Sequence[float] = PENALTIES) -> dict:
    """{ridge_<error name>: mm, ridge_penalty}.

    train_embeddings: (N, F) per image; train_subjects: (N,) subject ids (the validation split
    takes whole subjects); train_vertices: (N, V, 3) metres; held_out_*: the same for the
    held-out images; face_vertices: (F,) indices of the face region.
    """
    train_embeddings = np.asarray(train_embeddings, np.float64)
    targets = np.asarray(train_vertices, np.float64).reshape(len(train_embeddings), -1)
    subjects = np.unique(train_subjects)
    validation = np.isin(train_subjects, subjects[-max(1, int(len(subjects)
                                                          * VALIDATION_FRACTION)):])
    best = None
    for penalty in penalties:
        model = _fit(train_embeddings[~validation], targets[~validation], penalty)
        error = np.mean(np.abs(_predict(model, train_embeddings[validation])
                               - targets[validation]))
        if best is None or error < best[0]:
            best = (error, penalty)
    model = _fit(train_embeddings, targets, best[1])
    predicted = _predict(model, np.asarray(held_out_embeddings, np.float64)).reshape(
        held_out_vertices.shape)
    errors = jax.device_get(jax.jit(mesh_errors)(
        jnp.asarray(predicted, jnp.float32), jnp.asarray(held_out_vertices, jnp.float32),
        jnp.asarray(face_vertices, jnp.int32)))
    result = {f"ridge_{name}": float(np.mean(errors[name])) for name in ERROR_NAMES}
    result["ridge_penalty"] = float(best[1])
    return result


def embed_batches(embed: Callable, batches) -> np.ndarray:
    """(N, F) float64: `embed` over an iterable of input batches."""
    return np.concatenate([np.asarray(embed(inputs), np.float64) for inputs in batches])
