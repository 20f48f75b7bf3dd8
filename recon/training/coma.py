"""Training of the CoMA autoencoder (the frozen encoder of the 3D-ID loss), and its evaluation
against PCA. Called by `python train.py --config configs/coma.py` (`config.task == "coma"`).

`train_and_evaluate(config, workdir)`:
  1. the FLAME mesh hierarchy (cached), training and held-out meshes (synthetic FLAME heads by
     default, or a folder of FLAME-topology registrations read with trimesh);
  2. per-vertex normalisation statistics of the training meshes (stored in the variables);
  3. Adam with cosine decay on CoMA's L1 loss of the normalised coordinates: one jitted,
     donated `train_step(state, hierarchy, batch)` over a device mesh (batch split on `data`,
     the rest replicated), every step guarded against non-finite losses;
  4. `workdir/metrics.jsonl` + a tqdm bar, `workdir/checkpoints/<step>/` (the training state,
     the config, the data order, and the encoder items `spectral_gcn.load_encoder` reads),
     `workdir/metrics.png`;
  5. mean per-vertex error (mm) on the held-out meshes of the autoencoder, of PCA with as many
     components as the latent size, and of the mean training mesh (`workdir/evaluation.json`).

Resume: running again with the same config and workdir continues from the latest checkpoint
(state, optimizer, position in the data order) and ends with the same parameters and metrics
as an uninterrupted run; another config fails naming the differing keys.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import spectral_gcn
from flame_jax.fileio import atomic_write
from recon.training import checkpoints, guard, metrics as metrics_lib, sharding
from recon.options import to_dataclass
from spectral_gcn import data as data_lib
from spectral_gcn.mesh import MeshHierarchy
from spectral_gcn.models import AutoEncoder, CoMAConfig

# Config keys that do not change what is computed, so they may differ when a run is resumed.
RESUME_IGNORED_KEYS = ("cache_dir", "log_every", "eval_batch_size")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the meshes come from (configs/coma.py documents each key)."""

    source: str = "synthetic"
    folder: str = ""
    scale: float = 1.0
    test_fraction: float = 0.1
    num_train: int = 2048
    num_test: int = 256
    seed: int = 0
    shape_std: float = 1.0
    expression_std: float = 1.0
    jaw_open_max: float = 0.25


@dataclasses.dataclass(frozen=True)
class ComaTrainConfig:
    """The whole CoMA run (the frozen form of configs/coma.py)."""

    task: str = "coma"
    seed: int = 0
    cache_dir: str = ""
    factors: Tuple[int, ...] = (4, 4, 4, 4)
    model: CoMAConfig = CoMAConfig()
    data: DataConfig = DataConfig()
    steps: int = 600
    batch_size: int = 16
    learning_rate: float = 1e-3
    final_lr_fraction: float = 0.05
    log_every: int = 10
    checkpoint_every: int = 200
    max_to_keep: int = 3
    eval_batch_size: int = 32


@struct.dataclass
class TrainState:
    """step: () int32 updates applied; params/opt_state: AutoEncoder params and Adam state;
    stats: {"encoder": {"mean", "std"}} (N, 3) metres, fixed; first_nonfinite_step: () int32,
    -1 = none (see recon.training.guard)."""

    step: jax.Array
    params: Any
    stats: Any
    opt_state: Any
    first_nonfinite_step: jax.Array


# ---------------------------------------------------------------------------- losses, PCA


def l1_normalized(prediction: jax.Array, target: jax.Array, std: jax.Array) -> jax.Array:
    """Per-example CoMA loss: mean |prediction - target| / std over vertices and coordinates.

    prediction, target: (B, N, 3) metres; std: (N, 3) metres. Returns (B,).
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {prediction.shape} and target {target.shape} differ")
    return jnp.mean(jnp.abs(prediction - target) / std, axis=(1, 2))


def vertex_error_mm(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Per-example mean Euclidean vertex distance in millimetres; (B, N, 3) metres -> (B,)."""
    return 1000.0 * jnp.mean(jnp.linalg.norm(prediction - target, axis=-1), axis=1)


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


# ---------------------------------------------------------------------------- data


class EpochSampler:
    """Batches of indices in a fresh permutation per epoch (the last partial batch is dropped).

    The permutation of epoch e is `default_rng([seed, e])`, so the order is a function of
    (seed, epoch, position) only: `get_state()` -> {"epoch", "position"} goes into the
    checkpoint and `set_state` continues exactly there.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int):
        if batch_size > num_examples:
            raise ValueError(f"{num_examples} training meshes are fewer than the batch size "
                             f"{batch_size}")
        self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
        self.epoch, self.position = 0, 0

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)

    def next_indices(self) -> np.ndarray:
        if self.position + self.batch_size > self.num_examples:
            self.epoch, self.position = self.epoch + 1, 0
        indices = self._order()[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def get_state(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def set_state(self, state: Dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def load_meshes(data: DataConfig, topology_faces: np.ndarray, num_vertices: int, flame=None):
    """(train (M, N, 3), test (T, N, 3), description) float32 metres.

    flame: the FLAME model whose identity (and expression) space the "synthetic" source draws
    heads from (default `flame_jax.synthetic()`): the 3D-ID loss's encoder must know the meshes
    of the regressor's own FLAME.
    """
    if data.source == "synthetic":
        import flame_jax

        model = flame_jax.synthetic() if flame is None else flame
        distribution = data_lib.SyntheticMeshConfig(
            shape_std=data.shape_std, expression_std=data.expression_std,
            jaw_open_max=data.jaw_open_max)
        train = data_lib.synthetic_meshes(model, data.num_train, data.seed, distribution)
        test = data_lib.synthetic_meshes(model, data.num_test, data.seed + 1, distribution)
        return train, test, f"synthetic FLAME ({dataclasses.asdict(distribution)})"
    if data.source == "folder":
        if not data.folder:
            raise ValueError("config.data.folder must name a folder when data.source='folder'")
        meshes, paths = data_lib.load_mesh_folder(data.folder, num_vertices, topology_faces,
                                                  data.scale)
        num_test = max(1, int(round(len(paths) * data.test_fraction)))
        if num_test >= len(paths):
            raise ValueError(f"{data.folder}: {len(paths)} meshes are too few to hold out "
                             f"{num_test} for testing")
        # The last files in sorted order are held out, so the split is reproducible.
        return (meshes[:-num_test], meshes[-num_test:],
                f"{len(paths)} meshes from {data.folder}")
    raise ValueError(f"unknown data.source {data.source!r}; use 'synthetic' or 'folder'")


# ---------------------------------------------------------------------------- the step


def make_optimizer(*, learning_rate: float, steps: int,
                   final_lr_fraction: float) -> optax.GradientTransformation:
    """Adam, learning rate cosine-decayed to learning_rate * final_lr_fraction at `steps`."""
    schedule = optax.cosine_decay_schedule(learning_rate, max(steps, 1), alpha=final_lr_fraction)
    return optax.adam(schedule)


def make_train_step(model: AutoEncoder, optimizer: optax.GradientTransformation):
    """train_step(state, hierarchy, batch (B, N, 3) metres) -> (state, metrics), not jitted."""

    def loss_fn(params, stats, hierarchy, batch):
        prediction = model.apply({"params": params, "stats": stats}, batch, hierarchy)
        return l1_normalized(prediction, batch, stats["encoder"]["std"]).mean(), prediction

    def train_step(state: TrainState, hierarchy: MeshHierarchy, batch: jax.Array):
        (loss, prediction), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.stats, hierarchy, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        proposed = state.replace(step=state.step + 1,
                                 params=optax.apply_updates(state.params, updates),
                                 opt_state=opt_state)
        new_state = guard.guarded_update(state, proposed, loss, state.step + 1,
                                         also_check=grads)
        metrics = {"loss": loss, "error_mm": vertex_error_mm(prediction, batch).mean(),
                   "grad_norm": optax.tree.norm(grads)}
        return new_state, metrics

    return train_step


@functools.lru_cache(maxsize=8)
def _compiled(model_config: CoMAConfig, learning_rate: float, steps: int,
              final_lr_fraction: float, mesh: jax.sharding.Mesh):
    """(init, train_step, reconstruct) jitted once per (architecture, schedule, mesh), so runs
    repeated in one process (evaluation sweeps, tests, a resume) reuse the compiled code."""
    model = AutoEncoder(model_config)
    optimizer = make_optimizer(learning_rate=learning_rate, steps=steps,
                               final_lr_fraction=final_lr_fraction)
    replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    init = jax.jit(model.init, out_shardings=replicated)
    train_step = jax.jit(make_train_step(model, optimizer),
                         in_shardings=(replicated, replicated, data),
                         out_shardings=(replicated, replicated), donate_argnums=(0,))
    reconstruct = jax.jit(lambda variables, hierarchy, batch: model.apply(
        variables, batch, hierarchy), in_shardings=(replicated, replicated, data))
    return model, optimizer, init, train_step, reconstruct


def evaluate(reconstruct, variables, hierarchy, test: np.ndarray, batch_size: int,
             mesh: jax.sharding.Mesh) -> float:
    """Mean per-vertex error (mm) of the autoencoder over `test` (batches padded to one size)."""
    errors = []
    for start in range(0, test.shape[0], batch_size):
        batch = test[start:start + batch_size]
        count = batch.shape[0]
        if count < batch_size:
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - count, axis=0)])
        prediction = np.asarray(reconstruct(variables, hierarchy,
                                            sharding.shard_batch(batch, mesh)))
        errors.append(1000.0 * np.linalg.norm(prediction - batch, axis=-1).mean(axis=1)[:count])
    return float(np.concatenate(errors).mean())


def plot_metrics(records, path, names=("loss", "error_mm")) -> None:
    """PNG of the named metrics against the step (log scale), one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 3.5))
    for axis, name in zip(np.atleast_1d(axes), names):
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), float)]
        if points:
            steps, values = zip(*points)
            axis.semilogy(steps, values)
        axis.set_xlabel("step")
        axis.set_title(name)
        axis.grid(True, alpha=0.3)
    figure.tight_layout()

    def write(stream):
        figure.savefig(stream, format="png", dpi=100)

    atomic_write(path, write)
    plt.close(figure)


# ---------------------------------------------------------------------------- the run


def initial_state(options: ComaTrainConfig, hierarchy: MeshHierarchy, mean: np.ndarray,
                  std: np.ndarray, mesh: jax.sharding.Mesh):
    """(state, train_step, reconstruct): the freshly initialised TrainState (replicated on
    `mesh`, normalisation statistics mean/std (N, 3) metres) and the jitted functions."""
    _, optimizer, init, train_step, reconstruct = _compiled(
        options.model, options.learning_rate, options.steps, options.final_lr_fraction, mesh)
    example = jnp.zeros((1, options.model.num_vertices, 3), jnp.float32)
    variables = init(jax.random.key(options.seed), example, hierarchy)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                       stats={"encoder": {"mean": mean, "std": std}},
                       opt_state=optimizer.init(variables["params"]),
                       first_nonfinite_step=guard.no_nonfinite_step())
    return sharding.replicate(state, mesh), train_step, reconstruct


def _frozen_config(config) -> Tuple[ComaTrainConfig, dict]:
    if isinstance(config, ComaTrainConfig):
        from recon.options import to_dict

        return config, to_dict(config)
    return to_dataclass(config, ComaTrainConfig), checkpoints.plain_config(config)


def train_and_evaluate(config, workdir, *, flame=None) -> Dict[str, Any]:
    """Train (or resume) the CoMA autoencoder in `workdir` and evaluate it against PCA.

    config: the ConfigDict of configs/coma.py (or a ComaTrainConfig); unknown keys fail.
    flame: the FLAME model of the synthetic heads (default `flame_jax.synthetic()`); its
    triangles must be FLAME's (the mesh hierarchy's).
    workdir: output folder; when it holds checkpoints of the same config the run continues
    from the latest one (ConfigMismatchError naming the keys for another config), and a
    finished run returns its stored evaluation. Returns the evaluation dict (also in
    `workdir/evaluation.json`). FloatingPointError names the first step with a non-finite
    loss; the checkpoints then hold only states from before it.
    """
    options, config_dict = _frozen_config(config)
    if options.task != "coma":
        raise ValueError(f"recon.training.coma runs config.task 'coma', got {options.task!r}")
    for name in ("steps", "batch_size", "log_every", "checkpoint_every", "eval_batch_size"):
        if getattr(options, name) < 1:
            raise ValueError(f"config.{name} must be >= 1, got {getattr(options, name)}")
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    mesh = sharding.make_mesh()
    sharding.host_batch_size(options.batch_size, mesh)  # fails early when it does not divide
    sharding.host_batch_size(options.eval_batch_size, mesh)
    if jax.process_count() > 1:
        raise NotImplementedError("the CoMA trainer loads every mesh in one process; run it "
                                  "on a single host")

    checkpointer = checkpoints.RunCheckpointer(
        workdir / "checkpoints", config=config_dict, max_to_keep=options.max_to_keep,
        ignore_keys=RESUME_IGNORED_KEYS)
    try:
        return _run(options, workdir, checkpointer, mesh, started, flame)
    finally:
        checkpointer.close()


def _run(options: ComaTrainConfig, workdir: pathlib.Path,
         checkpointer: checkpoints.RunCheckpointer, mesh, started: float,
         flame=None) -> Dict[str, Any]:
    latest = checkpointer.latest_step()
    if latest is not None and latest >= options.steps:
        extra = checkpointer.restore_extra(latest)
        if "evaluation" in extra:  # the final step is saved together with the evaluation
            evaluation_path = workdir / "evaluation.json"
            if not evaluation_path.is_file():
                atomic_write(evaluation_path, json.dumps(extra["evaluation"], indent=2))
            print(f"{workdir}: the run finished (step {latest}); returning its evaluation")
            return extra["evaluation"]
    vertices, faces = spectral_gcn.flame_topology()
    if flame is not None and not np.array_equal(np.asarray(flame.faces), faces):
        raise ValueError("the FLAME model's triangles are not FLAME's topology (the CoMA mesh "
                         "hierarchy's)")
    hierarchy = spectral_gcn.build_hierarchy(vertices, faces, options.factors,
                                             cache_dir=options.cache_dir or None)
    train, test, description = load_meshes(options.data, faces, options.model.num_vertices,
                                           flame)
    sampler = EpochSampler(train.shape[0], options.batch_size, options.seed)
    mean, std = data_lib.normalization_statistics(train)
    hierarchy = sharding.replicate(hierarchy, mesh)
    state, train_step, reconstruct = initial_state(options, hierarchy, mean, std, mesh)
    summary = {"data": description, "num_train": int(train.shape[0]),
               "num_test": int(test.shape[0])}

    start = checkpointer.latest_step() or 0
    if start:
        state, extra = checkpointer.restore(start, state)
        if "data" not in extra:
            raise checkpoints.CheckpointRestoreError(
                f"{checkpointer.directory} step {start} has no data order state")
        sampler.set_state(extra["data"])
        print(f"{workdir}: resuming from step {start}")

    def encoder_items(state, extra_metadata):
        """spectral_gcn's own items, so `load_encoder(workdir / "checkpoints")` reads them."""
        variables = {"params": state.params, "stats": state.stats}
        return spectral_gcn.checkpoint_items(variables, hierarchy, options.model,
                                             options.factors, extra_metadata)

    with metrics_lib.MetricsWriter(workdir, total_steps=options.steps, initial_step=start,
                                   desc="coma", postfix=("loss", "error_mm")) as writer:
        for step in range(start + 1, options.steps + 1):
            batch = sharding.shard_batch(train[sampler.next_indices()], mesh)
            state, step_metrics = train_step(state, hierarchy, batch)
            if step % options.log_every == 0 or step == options.steps:
                guard.raise_if_nonfinite(state)
                writer.write(step, step_metrics)
            if step % options.checkpoint_every == 0 and step != options.steps:
                checkpointer.save(step, state, extra={"data": sampler.get_state()},
                                  items=encoder_items(state, {"summary": summary}))

        variables = {"params": state.params, "stats": state.stats}
        autoencoder_mm = evaluate(reconstruct, variables, hierarchy, test,
                                  options.eval_batch_size, mesh)
        pca_mean, components = pca_fit(train, options.model.latent_size)
        pca_mm = float(np.mean(1000.0 * np.linalg.norm(
            pca_reconstruct(test, pca_mean, components) - test, axis=-1)))
        evaluation = {**summary, "steps": options.steps, "batch_size": options.batch_size,
                      "latent_size": options.model.latent_size,
                      "autoencoder_error_mm": autoencoder_mm, "pca_error_mm": pca_mm,
                      "mean_mesh_error_mm": float(np.mean(1000.0 * np.linalg.norm(
                          test - train.mean(axis=0), axis=-1))),
                      "run_seconds": round(time.time() - started, 1),
                      "resumed_from_step": start, "devices": str(jax.devices())}
        checkpointer.save(options.steps, state,
                          extra={"data": sampler.get_state(), "evaluation": evaluation},
                          items=encoder_items(state, {"summary": summary,
                                                     "evaluation": evaluation}))
        writer.write(options.steps, {"evaluation": evaluation})
    checkpointer.wait()
    atomic_write(workdir / "evaluation.json", json.dumps(evaluation, indent=2))
    plot_metrics(metrics_lib.read_metrics(writer.path), workdir / "metrics.png")
    return evaluation
