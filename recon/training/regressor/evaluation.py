"""Held-out evaluation of the regressor during and after training, and the PNG grids.

`make_eval_step(model, options)` runs the whole network on the held-out crops (whatever the
training step reads) and returns the objective's terms and per-example 3D errors:
  vertex_error_mm             mean per-vertex error of the predicted neutral mesh after a rigid
                              alignment (whole head: face, scalp, neck, ears, eyeballs);
  face_vertex_error_mm        the same on FLAME's face region, aligned on that region (what NoW
                              scores);
  scaled_vertex_error_mm      whole head after a similarity alignment;
and the mean face's (zero skill) value of each under `mean_face_<name>`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from recon import evaluation as evaluation_lib
from recon import objective as objective_lib
from recon import visualize
from recon.training import sharding
from recon.training.regressor.step import StepOptions, TrainState, to_batch
from recon.types import Batch, split_code

ERROR_NAMES = ("vertex_error_mm", "face_vertex_error_mm", "scaled_vertex_error_mm")


def mesh_errors(predicted: jax.Array, target: jax.Array, face_vertices: jax.Array) -> dict:
    """{name: (B,) mm} of `ERROR_NAMES` for neutral meshes (B, V, 3) metres; face_vertices:
    (F,) int32 indices of FLAME's face region."""
    face_predicted = jnp.take(predicted, face_vertices, axis=1)
    face_target = jnp.take(target, face_vertices, axis=1)
    return {"vertex_error_mm": evaluation_lib.vertex_error_mm(predicted, target),
            "face_vertex_error_mm": evaluation_lib.vertex_error_mm(face_predicted, face_target),
            "scaled_vertex_error_mm": evaluation_lib.vertex_error_mm(predicted, target,
                                                                     with_scale=True)}


def make_eval_step(model, options: StepOptions) -> Callable:
    """`eval_step(state, assets, batch) -> (metrics, per_example)`.

    model: the regressor on backbone images (`input_kind="pixels"`). metrics: the objective's
    batch means with the training weights (fixed RNG; renders only when an image term is on);
    per_example: `mesh_errors` of the prediction and of the mean face, (B,) each.
    """

    def eval_step(state: TrainState, assets, batch: Batch):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        code = split_code(model.apply(variables, batch.backbone_inputs, train=False))
        settings = (options.render_settings() if objective_lib.needs_render(options.weights)
                    else None)
        prediction = objective_lib.predict(code, assets, batch, render_settings=settings,
                                           sigma=options.sigma)
        _, metrics = objective_lib.objective(
            prediction, batch, assets, options.weights,
            images_per_subject=options.images_per_subject, render_settings=settings,
            sigma=options.sigma, rng=jax.random.key(options.seed))
        template = jnp.broadcast_to(assets.flame.v_template, batch.vertices.shape)
        per_example = mesh_errors(prediction.neutral_vertices, batch.vertices,
                                  assets.face_vertices)
        per_example.update({f"mean_face_{name}": value for name, value in
                            mesh_errors(template, batch.vertices, assets.face_vertices).items()})
        return metrics, per_example

    return eval_step


def make_image_step(model, options: StepOptions) -> Callable:
    """`image_step(state, assets, batch) -> {render, alpha, landmarks_2d}` for the PNG grid."""

    def image_step(state: TrainState, assets, batch: Batch):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        code = split_code(model.apply(variables, batch.backbone_inputs, train=False))
        prediction = objective_lib.predict(code, assets, batch,
                                           render_settings=options.render_settings(),
                                           sigma=options.sigma)
        return {"render": prediction.render.image, "alpha": prediction.render.alpha,
                "landmarks_2d": prediction.landmarks_2d}

    return image_step


def evaluate(eval_step: Callable, state: TrainState, assets, batches, mesh) -> dict:
    """Held-out summary over `batches` (host numpy dicts of this process's rows).

    Returns every error of `ERROR_NAMES` and its `mean_face_` twin (means over examples;
    every batch has the same size), `vertex_error_mm_median`, every loss term (mean over
    batches) and `num_examples`.
    """
    sums, per_example = {}, {}
    for host_batch in batches:
        batch = sharding.shard_batch(to_batch(host_batch), mesh)
        metrics, errors = jax.device_get(eval_step(state, assets, batch))
        for name, value in metrics.items():
            sums[name] = sums.get(name, 0.0) + float(value)
        for name, value in errors.items():
            per_example.setdefault(name, []).append(np.asarray(value))
    per_example = {name: np.concatenate(values) for name, values in per_example.items()}
    summary = {name: value / len(batches) for name, value in sorted(sums.items())}
    summary.update({name: float(values.mean()) for name, values in per_example.items()})
    summary["vertex_error_mm_median"] = float(np.median(per_example["vertex_error_mm"]))
    summary["num_examples"] = int(per_example["vertex_error_mm"].size)
    return summary


def write_prediction_grid(path, host_batch: dict, images: dict, max_rows: int = 4) -> None:
    """PNG: input | shaded render | render over input with predicted/true landmarks."""
    rows = min(max_rows, int(np.shape(host_batch["images"])[0]))
    grid = visualize.prediction_rows(
        np.asarray(host_batch["images"][:rows]), images["render"][:rows],
        images["alpha"][:rows], images["landmarks_2d"][:rows],
        np.asarray(host_batch["landmarks"][:rows]),
        np.asarray(host_batch["landmark_weights"][:rows]))
    visualize.write_png(path, grid)
