"""The regressor's state, optimizer and one `train_step(state, assets, batch) -> (state, metrics)`.

The step is jitted once (`jit_train_step`) with the batch sharded on the mesh's `data` axis, the
state and the assets (FLAME, the frozen CoMA encoder, the recognition network) replicated and
passed as arguments, the state donated, the RNG folded from the step, and a non-finite guard
inside (`recon.training.guard`). Freezing is the optimizer's (`optax.multi_transform` over the
labels of `recon.model.build.trainable_labels`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Tuple

import jax
import jax.numpy as jnp
import optax
from flax import struct

from recon import objective as objective_lib
from recon.render.rasterizer import RasterSettings
from recon.training import guard, sharding
from recon.training.regressor.options import OptimOptions
from recon.types import Batch, split_code

Array = jax.Array


@struct.dataclass
class TrainState:
    """Everything that changes during training (replicated over the mesh; saved in checkpoints).

      step: () int32, number of updates applied.
      params: regressor parameters ({"backbone", "head"}).
      batch_stats: BatchNorm running statistics of the backbone ({} when it has none).
      opt_state: the optimizer's state (frozen leaves hold optax.set_to_zero's empty state).
      first_nonfinite_step: () int32, the first step whose loss was not finite, -1 = none
        (`recon.training.guard`: such a step leaves params/opt_state unchanged).
    """

    step: Array
    params: Any
    batch_stats: Any
    opt_state: Any
    first_nonfinite_step: Array


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What the jitted step needs besides its arguments (static, hashable).

      weights: `recon.objective.LossWeights` (a zero weight removes its term at trace time).
      images_per_subject: K consecutive rows per subject (shape consistency).
      image_size: (H, W) of the batch images = the render size of the 2D losses.
      sigma: soft-rasterizer temperature in pixels.
      seed: base of the per-step RNG, `fold_in(key(seed), step)`: the same stream for any
        device count and across restarts.
    """

    weights: Any
    images_per_subject: int
    image_size: tuple
    sigma: float = 0.5
    seed: int = 0

    def render_settings(self) -> RasterSettings:
        return RasterSettings(height=int(self.image_size[0]), width=int(self.image_size[1]))


def uses_batch_stats(model) -> bool:
    """Whether the model updates BatchNorm statistics in training (backbone parts listed in
    `batch_norm_train_parts`, or the head's input BatchNorm)."""
    return (bool(getattr(model.backbone, "batch_norm_train_parts", ()))
            or getattr(model, "feature_norm", "l2") == "batch")  # "data": fixed statistics


def batch_loss(model, variables: dict, assets, batch: Batch, options: StepOptions, rng: Array,
               *, train: bool) -> Tuple[Array, Tuple[dict, Any]]:
    """(loss, (metrics, batch_stats)) of the regressor on one batch: code -> FLAME/render ->
    objective. batch_stats: updated running statistics when the model uses batch statistics,
    else the given ones."""
    if train and uses_batch_stats(model):
        vector, updates = model.apply(variables, batch.backbone_inputs, train=True,
                                      mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
    else:
        vector = model.apply(variables, batch.backbone_inputs, train=train)
        batch_stats = variables["batch_stats"]
    code = split_code(vector)
    settings = (options.render_settings() if objective_lib.needs_render(options.weights)
                else None)
    loss, metrics = objective_lib.code_objective(
        code, batch, assets, options.weights, images_per_subject=options.images_per_subject,
        render_settings=settings, sigma=options.sigma, rng=rng)
    return loss, (metrics, batch_stats)


def make_train_step(model, optimizer: optax.GradientTransformation, options: StepOptions,
                    trainable: Any) -> Callable:
    """`train_step(state, assets, batch) -> (state, metrics)` for `jit_train_step`.

    model: the `recon.model.regressor.Regressor` module (static; with `input_kind="features"`
    when the run caches its trunk). assets: `ObjectiveAssets`, an argument, never a constant.
    trainable: tree like params of "trainable"/"frozen" labels: the gradient norm is taken over
    the trainable leaves only, so XLA can still drop the gradients of frozen parts. metrics:
    {name: () float32}: `loss`, every loss term of `recon.objective.objective`, `grad_norm`.
    """
    trainable_leaves = [label == "trainable" for label in jax.tree.leaves(trainable)]

    def loss_fn(params, state: TrainState, assets, batch: Batch, rng: Array):
        variables = {"params": params, "batch_stats": state.batch_stats}
        return batch_loss(model, variables, assets, batch, options, rng, train=True)

    def train_step(state: TrainState, assets, batch: Batch):
        rng = jax.random.fold_in(jax.random.key(options.seed), state.step)
        (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state, assets, batch, rng)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        proposed = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                                 batch_stats=batch_stats)
        # Finite trainable gradients <=> finite norm; the frozen ones are never computed.
        grad_norm = optax.tree.norm(
            [g for g, keep in zip(jax.tree.leaves(grads), trainable_leaves) if keep])
        new_state = guard.guarded_update(state, proposed, loss, state.step + 1,
                                         also_check=grad_norm)
        metrics = {name: jnp.asarray(value, jnp.float32) for name, value in metrics.items()}
        metrics["loss"] = jnp.asarray(loss, jnp.float32)
        metrics["grad_norm"] = grad_norm
        return new_state, metrics

    return train_step


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """Jit once for `mesh`: state and assets replicated, batch sharded on `data`, state donated."""
    replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    return jax.jit(train_step, in_shardings=(replicated, replicated, data),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


def jit_eval_step(eval_step: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """Jit an evaluation step: state/assets replicated, batch on `data`, outputs replicated."""
    replicated = sharding.replicated(mesh)
    return jax.jit(eval_step, in_shardings=(replicated, replicated, sharding.data_sharding(mesh)),
                   out_shardings=replicated)


def make_schedule(optim: OptimOptions, steps: int, scale: float = 1.0) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to peak * final_lr_fraction (all x scale)."""
    peak = optim.learning_rate * scale
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if optim.warmup_steps else peak, peak_value=peak,
        warmup_steps=optim.warmup_steps, decay_steps=max(steps, optim.warmup_steps + 1),
        end_value=peak * optim.final_lr_fraction)


def make_optimizer(labels: Any, optim: OptimOptions, steps: int,
                   *, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8
                   ) -> optax.GradientTransformation:
    """AdamW (warm-up + cosine schedule) on the "trainable" leaves of `labels` (the backbone's
    at `optim.backbone_lr_scale` times the head's rate), `optax.set_to_zero()` on the "frozen"
    ones (they stay bit-identical; inside a jitted step their gradients are unused and XLA drops
    their computation); optional global-norm clipping of the trainable gradients first."""
    def adamw(scale):
        return optax.adamw(make_schedule(optim, steps, scale), b1=b1, b2=b2, eps=eps,
                           weight_decay=optim.weight_decay)

    groups = jax.tree_util.tree_map_with_path(
        lambda path, label: label if label == "frozen" else (
            "backbone" if getattr(path[0], "key", None) == "backbone" else "head"), labels)
    update = optax.multi_transform({"head": adamw(1.0),
                                    "backbone": adamw(optim.backbone_lr_scale),
                                    "frozen": optax.set_to_zero()}, groups)
    if not optim.grad_clip_norm:
        return update
    # Clip the trainable gradients' global norm (the frozen ones are zeroed first).
    mask = jax.tree.map(lambda label: label != "frozen", labels)
    return optax.chain(optax.masked(optax.clip_by_global_norm(optim.grad_clip_norm), mask),
                       update)


def create_state(variables: dict, optimizer: optax.GradientTransformation) -> TrainState:
    """The initial TrainState (host arrays; `sharding.replicate` it onto the mesh)."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=optimizer.init(variables["params"]),
                      first_nonfinite_step=jnp.full((), -1, jnp.int32))


def to_batch(host_batch: dict) -> Batch:
    """Host dict of `Batch` fields -> `Batch` of numpy arrays (no device transfer here)."""
    import numpy as np

    return Batch(**{field.name: np.asarray(host_batch[field.name])
                    for field in dataclasses.fields(Batch)})
