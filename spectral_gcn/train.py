"""Training of the CoMA autoencoder and its side-by-side evaluation against PCA.

`train_and_evaluate(config, workdir)` (called by `train.py --config configs/coma.py`):
  1. mesh hierarchy of the FLAME template (cached), training and held-out meshes
     (synthetic FLAME heads by default, or a folder of FLAME-topology registrations);
  2. per-vertex normalisation statistics of the training meshes, stored in the model variables;
  3. Adam on the L1 loss of the normalised coordinates (CoMA's loss), one jitted step;
  4. JSONL metrics (`workdir/metrics.jsonl`), tqdm progress bar, orbax checkpoint
     (`workdir/checkpoints`) with the statistics, hierarchy and config;
  5. mean per-vertex Euclidean error (mm) on the held-out meshes of the autoencoder and of PCA
     with as many components as the latent size, fitted on the same training meshes
     (`workdir/evaluation.json`).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from flax import struct

from spectral_gcn import checkpoint as checkpoint_lib
from spectral_gcn import data as data_lib
from spectral_gcn import mesh as mesh_lib
from spectral_gcn.mesh import MeshHierarchy
from spectral_gcn.models import AutoEncoder, CoMAConfig

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """steps, batch size, Adam learning rate (cosine decay to lr * final_lr_fraction)."""

    steps: int
    batch_size: int
    learning_rate: float
    final_lr_fraction: float
    log_every: int
    checkpoint_every: int
    eval_batch_size: int


@struct.dataclass
class TrainState:
    step: Array
    params: Any
    stats: Any
    opt_state: Any


def l1_normalized(prediction: Array, target: Array, std: Array) -> Array:
    """Per-example CoMA loss: mean |prediction - target| / std over vertices and coordinates.

    prediction, target: (B, N, 3) metres; std: (N, 3) metres. Returns (B,).
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ")
    return jnp.mean(jnp.abs(prediction - target) / std, axis=(1, 2))


def vertex_error_mm(prediction: Array, target: Array) -> Array:
    """Per-example mean Euclidean vertex distance in millimetres; (B, N, 3) metres -> (B,)."""
    return 1000.0 * jnp.mean(jnp.linalg.norm(prediction - target, axis=-1), axis=1)


def make_optimizer(optim: OptimConfig) -> optax.GradientTransformation:
    schedule = optax.cosine_decay_schedule(optim.learning_rate, max(optim.steps, 1),
                                           alpha=optim.final_lr_fraction)
    return optax.adam(schedule)


def make_train_step(model: AutoEncoder, optimizer: optax.GradientTransformation):
    """jitted train_step(state, hierarchy, batch (B, N, 3)) -> (state, metrics)."""

    def loss_fn(params, stats, hierarchy, batch):
        prediction = model.apply({"params": params, "stats": stats}, batch, hierarchy)
        per_example = l1_normalized(prediction, batch, stats["encoder"]["std"])
        return per_example.mean(), prediction

    def train_step(state: TrainState, hierarchy: MeshHierarchy, batch: Array):
        (loss, prediction), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.stats, hierarchy, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "error_mm": vertex_error_mm(prediction, batch).mean(),
                   "grad_norm": optax.tree.norm(grads)}
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return jax.jit(train_step, donate_argnums=(0,))


def make_reconstruct(model: AutoEncoder):
    """jitted reconstruct(variables, hierarchy, batch) -> (B, N, 3) metres."""
    return jax.jit(lambda variables, hierarchy, batch: model.apply(variables, batch, hierarchy))


def pca_fit(train: np.ndarray, num_components: int) -> Tuple[np.ndarray, np.ndarray]:
    """PCA of (M, N, 3) meshes: (mean (N * 3,), components (num_components, N * 3)), float64."""
    flat = np.asarray(train, np.float64).reshape(train.shape[0], -1)
    mean = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    return mean, vt[:num_components]


def pca_reconstruct(meshes: np.ndarray, mean: np.ndarray, components: np.ndarray) -> np.ndarray:
    """Project (M, N, 3) meshes on the PCA subspace and back; returns (M, N, 3)."""
    flat = np.asarray(meshes, np.float64).reshape(meshes.shape[0], -1) - mean
    return ((flat @ components.T) @ components + mean).reshape(meshes.shape)


def load_meshes(data_config, topology_faces: np.ndarray, num_vertices: int):
    """(train (M, N, 3), test (T, N, 3), description) float32 metres from the data config."""
    if data_config.source == "synthetic":
        import flame_jax

        model = flame_jax.synthetic()
        distribution = data_lib.SyntheticMeshConfig(
            shape_std=data_config.shape_std, expression_std=data_config.expression_std,
            jaw_open_max=data_config.jaw_open_max)
        train = data_lib.synthetic_meshes(model, data_config.num_train, data_config.seed,
                                          distribution)
        test = data_lib.synthetic_meshes(model, data_config.num_test, data_config.seed + 1,
                                         distribution)
        return train, test, f"synthetic FLAME ({dataclasses.asdict(distribution)})"
    if data_config.source == "folder":
        if not data_config.folder:
            raise ValueError("config.data.folder must name a folder when data.source='folder'")
        meshes, paths = data_lib.load_mesh_folder(data_config.folder, num_vertices,
                                                  topology_faces, data_config.scale)
        num_test = max(1, int(round(len(paths) * data_config.test_fraction)))
        if num_test >= len(paths):
            raise ValueError(f"{data_config.folder}: {len(paths)} meshes are too few to hold out "
                             f"{num_test} for testing")
        # The last files in sorted order are held out, so the split is reproducible.
        return meshes[:-num_test], meshes[-num_test:], f"{len(paths)} meshes from " \
            f"{data_config.folder}"
    raise ValueError(f"unknown data.source {data_config.source!r}; use 'synthetic' or 'folder'")


def evaluate(reconstruct, variables, hierarchy, test: np.ndarray, batch_size: int) -> float:
    """Mean per-vertex error (mm) of the autoencoder over `test` (batches padded to one size)."""
    errors = []
    for start in range(0, test.shape[0], batch_size):
        batch = test[start:start + batch_size]
        count = batch.shape[0]
        if count < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
        prediction = reconstruct(variables, hierarchy, jnp.asarray(batch))
        errors.append(np.asarray(vertex_error_mm(prediction, jnp.asarray(batch)))[:count])
    return float(np.concatenate(errors).mean())


def _model_config(config) -> CoMAConfig:
    return CoMAConfig(num_vertices=int(config.model.num_vertices),
                      filters=tuple(int(f) for f in config.model.filters),
                      order=int(config.model.order), latent_size=int(config.model.latent_size),
                      method=str(config.model.method))


def _optim_config(config) -> OptimConfig:
    return OptimConfig(steps=int(config.steps), batch_size=int(config.batch_size),
                       learning_rate=float(config.learning_rate),
                       final_lr_fraction=float(config.final_lr_fraction),
                       log_every=int(config.log_every),
                       checkpoint_every=int(config.checkpoint_every),
                       eval_batch_size=int(config.eval_batch_size))


def train_and_evaluate(config, workdir) -> Dict[str, Any]:
    """Train the CoMA autoencoder, checkpoint it, and compare it with PCA on held-out meshes.

    config: the ConfigDict of `configs/coma.py`; workdir: output folder. Returns the evaluation
    dict also written to `workdir/evaluation.json`. Raises FloatingPointError naming the step
    when the loss is not finite.
    """
    workdir = pathlib.Path(workdir)
    checkpoint_dir = workdir / "checkpoints"
    if checkpoint_dir.is_dir() and any(checkpoint_dir.iterdir()):
        raise FileExistsError(f"{checkpoint_dir} already holds checkpoints; resuming is not "
                              f"supported, choose another --workdir or remove it")
    workdir.mkdir(parents=True, exist_ok=True)
    model_config, optim = _model_config(config), _optim_config(config)
    started = time.time()

    vertices, faces = mesh_lib.flame_topology()
    hierarchy = mesh_lib.build_hierarchy(vertices, faces, tuple(config.factors),
                                         cache_dir=config.cache_dir or None)
    train, test, data_description = load_meshes(config.data, faces, model_config.num_vertices)
    if train.shape[0] < optim.batch_size:
        raise ValueError(f"{train.shape[0]} training meshes are fewer than the batch size "
                         f"{optim.batch_size}")
    mean, std = data_lib.normalization_statistics(train)

    model = AutoEncoder(model_config)
    variables = model.init(jax.random.key(config.seed), jnp.asarray(train[:1]), hierarchy)
    stats = {"encoder": {"mean": jnp.asarray(mean), "std": jnp.asarray(std)}}
    optimizer = make_optimizer(optim)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"], stats=stats,
                       opt_state=optimizer.init(variables["params"]))
    train_step = make_train_step(model, optimizer)
    reconstruct = make_reconstruct(model)

    rng = np.random.default_rng(config.seed)
    order, cursor = rng.permutation(train.shape[0]), 0
    metrics_path = workdir / "metrics.jsonl"
    summary = {"data": data_description, "num_train": int(train.shape[0]),
               "num_test": int(test.shape[0])}
    with open(metrics_path, "w", encoding="utf-8") as log, \
            tqdm.trange(1, optim.steps + 1, desc="coma", dynamic_ncols=True) as progress:
        for step in progress:
            if cursor + optim.batch_size > order.size:
                order, cursor = rng.permutation(train.shape[0]), 0
            batch = jnp.asarray(train[order[cursor:cursor + optim.batch_size]])
            cursor += optim.batch_size
            state, metrics = train_step(state, hierarchy, batch)
            if step % optim.log_every == 0 or step == optim.steps:
                metrics = {name: float(value) for name, value in metrics.items()}
                if not np.isfinite(metrics["loss"]):
                    raise FloatingPointError(f"non-finite CoMA loss {metrics['loss']} at step "
                                             f"{step}")
                record = {"step": step, "time_s": round(time.time() - started, 2), **metrics}
                log.write(json.dumps(record) + "\n")
                log.flush()
                progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                                     err_mm=f"{metrics['error_mm']:.3f}")
            if step % optim.checkpoint_every == 0 and step != optim.steps:
                checkpoint_lib.save_checkpoint(
                    checkpoint_dir, step, {"params": state.params, "stats": state.stats},
                    hierarchy, model_config, config.factors, {"summary": summary})

    final_variables = {"params": state.params, "stats": state.stats}
    train_seconds = time.time() - started
    autoencoder_mm = evaluate(reconstruct, final_variables, hierarchy, test,
                              optim.eval_batch_size)
    pca_mean, components = pca_fit(train, model_config.latent_size)
    pca_mm = float(np.mean(1000.0 * np.linalg.norm(
        pca_reconstruct(test, pca_mean, components) - test, axis=-1)))
    evaluation = {**summary, "steps": optim.steps, "batch_size": optim.batch_size,
                  "latent_size": model_config.latent_size,
                  "autoencoder_error_mm": autoencoder_mm, "pca_error_mm": pca_mm,
                  "mean_mesh_error_mm": float(np.mean(1000.0 * np.linalg.norm(
                      test - train.mean(axis=0), axis=-1))),
                  "train_seconds": round(train_seconds, 1), "devices": str(jax.devices())}
    checkpoint_lib.save_checkpoint(checkpoint_dir, optim.steps, final_variables, hierarchy,
                                   model_config, config.factors, {"evaluation": evaluation})
    with open(workdir / "evaluation.json", "w", encoding="utf-8") as stream:
        json.dump(evaluation, stream, indent=2)
    with open(metrics_path, "a", encoding="utf-8") as log:
        log.write(json.dumps({"step": optim.steps, "eval": evaluation}) + "\n")
    return evaluation
