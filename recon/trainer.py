"""Training of the regressor: one sharded, jitted step, grain input, resume, logs, evaluation.

`train_and_evaluate(config, workdir)` (called by `python train.py --config configs/default.py`):
  1. the frozen CoMA encoder of the 3D-ID loss: `config.coma.checkpoint_dir`, else the cached
     one for this config and mesh hierarchy, else trained now (`recon.coma_trainer`) and cached;
  2. the regressor (`recon.regressor`), its optimizer (frozen parts through the optimizer), the
     objective's assets (FLAME model, frozen encoder, ...) replicated over a `data` mesh;
  3. `train_step(state, assets, batch) -> (state, metrics)` jitted once with the batch sharded
     on `data`, the state replicated and donated, the RNG folded from the step, a non-finite
     guard inside; grain input with per-host shards, data-wait measured per step;
  4. `workdir/metrics.jsonl` + tqdm, orbax checkpoints with the data iterator state (re-running
     the command resumes exactly), PNG grids in `workdir/images/`, and `workdir/evaluation.json`
     on held-out subjects (every `eval_every` steps and at the end).

`load_predictor(workdir)` rebuilds the trained regressor for photos and NoW export.

`jax.jit` with shardings is today's form of both "jit" and "pmap": the same program runs on one
CPU, several GPUs or a TPU slice; with several processes (`jax.distributed`) each host feeds its
own shard of the global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import flame_jax
import spectral_gcn
from flame_jax.fileio import atomic_write
from recon import backbone as backbone_lib
from recon import evaluation as evaluation_lib
from recon import objective as objective_lib
from recon import regressor as regressor_lib
from recon import visualize
from recon.rasterizer import RasterSettings
from recon.training import checkpoints as checkpoints_lib
from recon.training import guard, sharding
from recon.training.config import to_dataclass
from recon.training.metrics import MetricsWriter
from recon.types import Batch, Code, split_code

Array = jax.Array
CONFIG_FILE = "config.json"
# Config keys that do not change what is computed: they may differ when a run is resumed.
RESUME_IGNORED_KEYS = ("cache_dir", "coma.cache_dir", "log_every", "eval_every", "image_every",
                       "max_checkpoints")
CHECKPOINT_DIR = "checkpoints"


# ----------------------------------------------------------------------------------------------
# Options: the ConfigDict is read here once; no library function below sees it.


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """The regressor: IResNet stages/width/embedding, the MICA head, what trains.

    trainable: "all" (every backbone stage; right for random initialisation) or "last_stage"
    (the paper's and MICA's: last stage + output BN/FC + head; right for imported ArcFace).
    arcface_path: imported backbone weights ('' = random initialisation).
    batch_norm: "running": every BatchNorm normalises with its running statistics, which never
      change (the paper's/MICA's frozen ArcFace statistics; `recon.regressor`'s behaviour).
      "batch": the trainable parts' BatchNorms use batch statistics in training and update
      their running averages (used at evaluation); needed to train a backbone from random
      initialisation, whose running statistics (0, 1) describe nothing.
    """

    stages: tuple = (1, 1, 1, 1)
    width: int = 16
    embedding_size: int = 512
    head_hidden_size: int = 300
    head_num_hidden: int = 3
    trainable: str = "all"
    arcface_path: str = ""
    batch_norm: str = "running"

    def __post_init__(self):
        if self.trainable not in ("all", "last_stage"):
            raise ValueError(f"model.trainable must be 'all' or 'last_stage', got "
                             f"{self.trainable!r}")
        if self.batch_norm not in ("running", "batch"):
            raise ValueError(f"model.batch_norm must be 'running' or 'batch', got "
                             f"{self.batch_norm!r}")


@dataclasses.dataclass(frozen=True)
class OptimOptions:
    """AdamW with linear warm-up and cosine decay; optional global-norm clipping (0 = off)."""
    learning_rate: float = 1e-4
    weight_decay: float = 2e-4
    warmup_steps: int = 0
    final_lr_fraction: float = 1.0
    grad_clip_norm: float = 0.0


@dataclasses.dataclass(frozen=True)
class SceneOptions:
    """How wide the synthetic images vary (the `recon.data.synthetic.SyntheticConfig` fields
    of the same names; angles in degrees). The defaults are SyntheticConfig's (wide: made for
    models that must also work on photos); configs/default.py narrows them so that a small
    network trained from scratch on a 2-core CPU can learn identity in minutes.

    degradations: "full" (`AugmentConfig()`: occluders, blur, noise, JPEG, colour jitter) or
      "clean" (`AugmentConfig.clean()`: none of them; backgrounds stay random).
    """

    shape_std: float = 1.0
    max_yaw_deg: float = 40.0
    max_pitch_deg: float = 20.0
    max_roll_deg: float = 12.0
    box_scale_jitter: float = 0.12
    box_shift_jitter: float = 0.07
    perspective_probability: float = 0.5
    lambert_probability: float = 0.4
    specular_probability: float = 0.5
    degradations: str = "full"

    def __post_init__(self):
        if self.degradations not in ("full", "clean"):
            raise ValueError(f"data.scene.degradations must be 'full' or 'clean', got "
                             f"{self.degradations!r}")
        if self.shape_std <= 0:
            raise ValueError(f"data.scene.shape_std must be > 0, got {self.shape_std}")


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Where batches come from and how big they are (global batch = subjects x images).

    source: "synthetic" (`recon.data.synthetic`, subjects 0..num_train_subjects-1) or "mica"
      (`recon.data.mica.MicaDataset(root, names)`).
    image_size: the square crop of the 2D losses (the renderer draws at this size).
    pool: synthetic only: render the num_train_subjects subjects once, cache them (8-bit
      images) under the cache folder, and serve them from memory; False renders every subject
      when it is read (endless variety, but on a CPU the renderer then competes with training).
    num_eval_subjects: held-out synthetic subjects (`HELDOUT_SUBJECTS`) of the evaluation.
    num_workers: grain worker processes (0: reader threads in the training process).
    seed: the data seed (identities, images, shuffling).
    scene: how widely the synthetic images vary (`SceneOptions`).
    """

    source: str = "synthetic"
    root: str = ""
    names: tuple = ()
    image_size: int = 224
    batch_subjects: int = 4
    images_per_subject: int = 2
    num_train_subjects: int = 4096
    pool: bool = False
    num_eval_subjects: int = 32
    num_workers: int = 0
    seed: int = 0
    scene: SceneOptions = SceneOptions()

    def __post_init__(self):
        if self.source not in ("synthetic", "mica"):
            raise ValueError(f"data.source must be 'synthetic' or 'mica', got {self.source!r}")

    @property
    def global_batch_size(self) -> int:
        return self.batch_subjects * self.images_per_subject


@dataclasses.dataclass(frozen=True)
class LoopOptions:
    """Step counts of the host loop (0 switches a periodic action off)."""
    steps: int
    log_every: int
    checkpoint_every: int
    eval_every: int
    image_every: int
    eval_batch_size: int
    max_checkpoints: int = 3


# ----------------------------------------------------------------------------------------------
# The frozen CoMA encoder: given, cached, or trained now.


def default_cache_dir() -> pathlib.Path:
    """$FACERECON_CACHE_DIR or ~/.cache/facerecon_jax (shared with the mesh hierarchy cache)."""
    return pathlib.Path(os.environ.get("FACERECON_CACHE_DIR")
                        or pathlib.Path.home() / ".cache" / "facerecon_jax")


def coma_cache_key(coma_config: dict, hierarchy_key: str) -> str:
    """Hash of the CoMA training config (JSON, sorted keys; its `cache_dir` left out) and the
    mesh hierarchy key."""
    config = {key: value for key, value in coma_config.items() if key != "cache_dir"}
    text = json.dumps({"config": config, "hierarchy": hierarchy_key}, sort_keys=True,
                      default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def ensure_coma_encoder(coma_config, *, checkpoint_dir: str = "", cache_dir: str = "",
                        log: Callable[[str], None] = print) -> spectral_gcn.FrozenEncoder:
    """The frozen CoMA encoder of the 3D-ID loss.

    checkpoint_dir: a trained CoMA checkpoint folder, used as is (errors name it).
    Otherwise `coma_config` (a configs/coma.py ConfigDict) is hashed with the FLAME mesh
    hierarchy key; `<cache>/coma/<hash>/checkpoints` is loaded when present, else CoMA is trained
    now (`recon.coma_trainer`) into a temporary folder that is renamed into the cache only when
    training finished, so a killed run leaves no half-written entry.
    """
    coma_config = coma_config.copy_and_resolve_references()
    with coma_config.unlocked():
        coma_config.cache_dir = cache_dir
    hierarchy = spectral_gcn.flame_hierarchy(tuple(coma_config.factors),
                                             cache_dir=cache_dir or None)
    if checkpoint_dir:
        return spectral_gcn.load_encoder(pathlib.Path(checkpoint_dir),
                                         expected_hierarchy=hierarchy)
    root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    key = coma_cache_key(coma_config.to_dict(), hierarchy.key)
    entry = root / "coma" / key
    if (entry / CHECKPOINT_DIR).is_dir():
        log(f"CoMA encoder: cached in {entry}")
        return spectral_gcn.load_encoder(entry / CHECKPOINT_DIR, expected_hierarchy=hierarchy)
    from recon import coma_trainer  # only needed when nothing is cached

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
    log(f"CoMA encoder: training it ({coma_config.steps} steps), then caching it in {entry}")
    try:
        coma_trainer.train_and_evaluate(coma_config, staging)
        try:
            os.replace(staging, entry)
        except OSError:
            if not (entry / CHECKPOINT_DIR).is_dir():  # not a concurrent run that finished first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return spectral_gcn.load_encoder(entry / CHECKPOINT_DIR, expected_hierarchy=hierarchy)


# ----------------------------------------------------------------------------------------------
# State and the step.


@struct.dataclass
class TrainState:
    """Everything that changes during training (replicated over the mesh; saved in checkpoints).

      step: () int32, number of updates applied.
      params: regressor parameters (backbone + head).
      batch_stats: BatchNorm running statistics of the backbone.
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


def batch_loss(model, variables: dict, assets, batch: Batch, options: StepOptions, rng: Array,
               *, train: bool) -> Tuple[Array, Tuple[dict, Any]]:
    """(loss, (metrics, batch_stats)) of the regressor on one batch: code -> FLAME/render ->
    objective. batch_stats: updated running statistics when the model uses batch statistics,
    else the given ones."""
    if uses_batch_stats(model):
        vector, updates = model.apply(variables, batch.backbone_images, train=train,
                                      mutable=["batch_stats"])
        batch_stats = updates["batch_stats"]
    else:
        vector = model.apply(variables, batch.backbone_images, train=train)
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

    model: the `recon.regressor.Regressor` module (static). assets: `ObjectiveAssets` (FLAME
    model, frozen CoMA encoder, recognition network variables), an argument, never a constant.
    trainable: tree like params of "trainable"/"frozen" labels (`regressor.trainable_labels`):
    the gradient norm is taken over the trainable leaves only, so XLA can still drop the
    gradients of frozen parts. metrics: {name: () float32}: `loss`, every loss term of
    `recon.objective.objective`, `grad_norm`.
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


def jit_eval_step(eval_step: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """Jit the evaluation step: state/assets replicated, batch on `data`, outputs replicated."""
    replicated = sharding.replicated(mesh)
    return jax.jit(eval_step, in_shardings=(replicated, replicated, sharding.data_sharding(mesh)),
                   out_shardings=replicated)


def jit_train_step(train_step: Callable, mesh: jax.sharding.Mesh) -> Callable:
    """Jit once for `mesh`: state and assets replicated, batch sharded on `data`, state donated."""
    replicated, data = sharding.replicated(mesh), sharding.data_sharding(mesh)
    return jax.jit(train_step, in_shardings=(replicated, replicated, data),
                   out_shardings=(replicated, replicated), donate_argnums=(0,))


# ----------------------------------------------------------------------------------------------
# Multi-host start-up.


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when the environment describes a multi-process job.

    Triggers: JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES / JAX_PROCESS_ID), or
    FACERECON_DISTRIBUTED=1 for clusters whose variables jax detects itself (SLURM, Cloud TPU,
    Open MPI). A single process never calls it, so laptops and one-GPU runs need nothing.
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("FACERECON_DISTRIBUTED") == "1":
        jax.distributed.initialize()


# ----------------------------------------------------------------------------------------------
# Model, parameters and optimizer.


class BatchStatsIResNet(backbone_lib.IResNet):
    """`recon.backbone.IResNet` whose BatchNorms in `batch_norm_train_parts` use batch
    statistics whenever `use_batch_stats` is True, whatever `train` its caller passes.

    `recon.regressor.Regressor` always calls its backbone with train=False (frozen statistics,
    right for imported ArcFace); a backbone trained from random initialisation needs batch
    statistics, so the training model carries use_batch_stats=True and the evaluation model
    False. Parameter paths are the IResNet's.
    """

    use_batch_stats: bool = False

    def __call__(self, images: Array, train: bool = False) -> Array:
        return super().__call__(images, train=self.use_batch_stats)


def build_model(options: ModelOptions, *, training: bool = False):
    """(Regressor module, imported backbone variables or None).

    training: the module used inside the training step (with `batch_norm="batch"` its
    BatchNorms use and update batch statistics); False: the evaluation/prediction module.
    """
    imported = None
    if options.arcface_path:
        path = pathlib.Path(options.arcface_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.arcface_path {path} does not exist: bring ArcFace weights (insightface "
                f"glintr100.onnx / w600k_r50.onnx or an arcface_torch backbone.pth)")
        backbone, imported = backbone_lib.import_arcface(path)
        if tuple(backbone.stages) != tuple(options.stages):
            raise ValueError(f"{path} holds an IResNet with stages {tuple(backbone.stages)}, but "
                             f"config model.stages is {tuple(options.stages)}; set "
                             f"--config.model.stages to match the file")
        architecture = dict(stages=tuple(backbone.stages), width=backbone.width,
                            embedding_size=backbone.embedding_size, dtype=backbone.dtype,
                            precision=backbone.precision)
    else:
        architecture = dict(stages=tuple(options.stages), width=options.width,
                            embedding_size=options.embedding_size)
        backbone = backbone_lib.IResNet(**architecture)
    if options.batch_norm == "batch":
        backbone = BatchStatsIResNet(**architecture,
                                     batch_norm_train_parts=trainable_prefixes(options),
                                     use_batch_stats=training)
    model = regressor_lib.Regressor(backbone=backbone, hidden_size=options.head_hidden_size,
                                    num_hidden=options.head_num_hidden)
    return model, imported


def evaluation_model(model):
    """The same regressor with running BatchNorm statistics (for evaluation and prediction)."""
    if uses_batch_stats(model):
        return model.clone(backbone=model.backbone.clone(use_batch_stats=False))
    return model


def uses_batch_stats(model) -> bool:
    """Whether `model.apply` in training must mutate `batch_stats`."""
    return bool(getattr(model.backbone, "use_batch_stats", False))


def trainable_prefixes(options: ModelOptions) -> tuple:
    """Backbone parts that train: every part, or the paper's last stage + output."""
    if options.trainable == "all":
        return tuple(backbone_lib.PART_NAMES)
    return tuple(backbone_lib.TRAINABLE_PREFIXES)


def init_variables(model, imported, seed: int) -> dict:
    """{'params', 'batch_stats'} of the regressor; imported backbone variables replace the
    random ones (their shapes must agree)."""

    size = backbone_lib.INPUT_SIZE
    variables = evaluation_model(model).init(jax.random.key(seed),
                                             jnp.zeros((1, size, size, 3), jnp.float32))
    variables = {"params": variables["params"],
                 "batch_stats": variables.get("batch_stats", {})}
    if imported is not None:
        for collection in ("params", "batch_stats"):
            expected = jax.tree.map(jnp.shape, variables[collection]["backbone"])
            found = jax.tree.map(jnp.shape, imported[collection])
            if expected != found:
                raise ValueError(f"imported ArcFace {collection} do not fit the backbone "
                                 f"(shapes differ)")
            variables[collection] = {**variables[collection],
                                     "backbone": jax.tree.map(jnp.asarray, imported[collection])}
    return variables


def make_schedule(optim: OptimOptions, steps: int) -> optax.Schedule:
    """Linear warm-up to the peak, then cosine decay to peak * final_lr_fraction."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if optim.warmup_steps else optim.learning_rate,
        peak_value=optim.learning_rate, warmup_steps=optim.warmup_steps,
        decay_steps=max(steps, optim.warmup_steps + 1),
        end_value=optim.learning_rate * optim.final_lr_fraction)


def make_optimizer(params, model_options: ModelOptions, optim: OptimOptions, steps: int):

    return regressor_lib.make_optimizer(
        params, learning_rate=make_schedule(optim, steps), weight_decay=optim.weight_decay,
        max_grad_norm=optim.grad_clip_norm or None,
        trainable_prefixes=trainable_prefixes(model_options))


def create_state(model, imported, optimizer_fn, seed: int) -> TrainState:
    """The initial TrainState (host arrays; `jax.device_put` it with the replicated sharding)."""
    variables = init_variables(model, imported, seed)
    optimizer = optimizer_fn(variables["params"])
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"],
                      opt_state=optimizer.init(variables["params"]),
                      first_nonfinite_step=jnp.full((), -1, jnp.int32))


# ----------------------------------------------------------------------------------------------
# Evaluation on held-out subjects and the PNG grid.


def make_eval_step(model, options: StepOptions) -> Callable:
    """`eval_step(state, assets, batch) -> (metrics, per_example)`.

    metrics: the objective's batch means with the training weights (fixed RNG; renders only
    when an image term is on); per_example: {vertex_error_mm, mean_face_vertex_error_mm} (B,)
    after a rigid alignment (`recon.evaluation`).
    """

    def eval_step(state: TrainState, assets, batch: Batch):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        code = split_code(model.apply(variables, batch.backbone_images, train=False))
        settings = (options.render_settings() if objective_lib.needs_render(options.weights)
                    else None)
        prediction = objective_lib.predict(code, assets, batch, render_settings=settings,
                                           sigma=options.sigma)
        _, metrics = objective_lib.objective(
            prediction, batch, assets, options.weights,
            images_per_subject=options.images_per_subject, render_settings=settings,
            sigma=options.sigma, rng=jax.random.key(options.seed))
        template = jnp.broadcast_to(assets.flame.v_template, batch.vertices.shape)
        predicted = prediction.neutral_vertices
        per_example = {
            "vertex_error_mm": evaluation_lib.vertex_error_mm(predicted, batch.vertices),
            "mean_face_vertex_error_mm": evaluation_lib.vertex_error_mm(template,
                                                                        batch.vertices),
            "scaled_vertex_error_mm": evaluation_lib.vertex_error_mm(
                predicted, batch.vertices, with_scale=True),
            "mean_face_scaled_vertex_error_mm": evaluation_lib.vertex_error_mm(
                template, batch.vertices, with_scale=True)}
        return metrics, per_example

    return eval_step


def make_image_step(model, options: StepOptions) -> Callable:
    """`image_step(state, assets, batch) -> {render, alpha, landmarks_2d}` for the PNG grid."""
    def image_step(state: TrainState, assets, batch: Batch):
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        code = split_code(model.apply(variables, batch.backbone_images, train=False))
        prediction = objective_lib.predict(code, assets, batch,
                                           render_settings=options.render_settings(),
                                           sigma=options.sigma)
        return {"render": prediction.render.image, "alpha": prediction.render.alpha,
                "landmarks_2d": prediction.landmarks_2d}

    return image_step


def evaluate(eval_step: Callable, state: TrainState, assets, batches, mesh) -> dict:
    """Held-out summary over `batches` (host numpy dicts of this process's rows).

    Returns {vertex_error_mm, vertex_error_mm_median, mean_face_vertex_error_mm, the same two
    after a similarity (scaled) alignment (scaled_vertex_error_mm,
    mean_face_scaled_vertex_error_mm), every loss term (mean over batches), num_examples}. The
    3D errors are means over examples (every batch has the same size).
    """
    sums, per_example = {}, {}
    for host_batch in batches:
        batch = sharding.shard_batch(_to_batch(host_batch), mesh)
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


# ----------------------------------------------------------------------------------------------
# The run.


TOP_LEVEL_KEYS = ("task", "seed", "cache_dir", "flame", "model", "recognition_arcface_path",
                  "optim", "loss", "data", "coma_checkpoint_dir", "coma", "steps", "log_every",
                  "checkpoint_every", "eval_every", "image_every", "eval_batch_size",
                  "max_checkpoints")


def _read_options(config) -> dict:
    """The ConfigDict -> frozen dataclasses, once (unknown keys raise naming them)."""
    unknown = sorted(set(config.keys()) - set(TOP_LEVEL_KEYS))
    if unknown:
        raise ValueError(f"config keys {unknown} are not read by the regressor trainer "
                         f"(known: {sorted(TOP_LEVEL_KEYS)})")

    loop_keys = ("steps", "log_every", "checkpoint_every", "eval_every", "image_every",
                 "eval_batch_size", "max_checkpoints")
    loop = to_dataclass({key: config[key] for key in loop_keys}, LoopOptions)
    options = {
        "loop": loop,
        "model": to_dataclass(config.model, ModelOptions, prefix="model"),
        "optim": to_dataclass(config.optim, OptimOptions, prefix="optim"),
        "data": to_dataclass(config.data, DataOptions, prefix="data"),
        "weights": to_dataclass(config.loss, objective_lib.LossWeights, prefix="loss"),
        "flame": to_dataclass(config.flame, FlameOptions, prefix="flame"),
    }
    data = options["data"]
    if loop.eval_batch_size % data.images_per_subject:
        raise ValueError(f"eval_batch_size {loop.eval_batch_size} must be a multiple of "
                         f"data.images_per_subject {data.images_per_subject} (whole subjects)")
    if (data.num_eval_subjects * data.images_per_subject) % loop.eval_batch_size:
        raise ValueError(f"data.num_eval_subjects x images_per_subject = "
                         f"{data.num_eval_subjects * data.images_per_subject} held-out images "
                         f"must fill whole eval batches of {loop.eval_batch_size}")
    return options


def _due(step: int, every: int, last: int) -> bool:
    """Periodic action at `step` (every `every` steps, 0 = never) or at the last step."""
    return step == last or (every > 0 and step % every == 0)


def train_and_evaluate(config, workdir) -> Dict[str, Any]:
    """Train the regressor described by `config` (configs/default.py) in `workdir`, resuming
    from its latest checkpoint, and return the final evaluation (also `evaluation.json`)."""
    maybe_initialize_distributed()
    started = time.perf_counter()
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    options = _read_options(config)
    loop, data_options = options["loop"], options["data"]
    log = print if jax.process_index() == 0 else (lambda *_: None)

    check_inputs(config)
    cache_dir = config.cache_dir
    flame = load_flame(options["flame"])
    encoder = None
    if options["weights"].on("id_3d"):
        encoder = ensure_coma_encoder(config.coma, checkpoint_dir=config.coma_checkpoint_dir,
                                      cache_dir=cache_dir, log=log)
    assets_host = make_objective_assets(flame, encoder, options["weights"],
                                        config.recognition_arcface_path)
    model, imported = build_model(options["model"], training=True)
    optimizer_fn = functools.partial(make_optimizer, model_options=options["model"],
                                     optim=options["optim"], steps=loop.steps)

    mesh = sharding.make_mesh()
    sharding.host_batch_size(data_options.global_batch_size, mesh)  # raises when it cannot
    sharding.host_batch_size(loop.eval_batch_size, mesh)
    state = create_state(model, imported, optimizer_fn, config.seed)
    optimizer = optimizer_fn(state.params)
    labels = regressor_lib.trainable_labels(
        state.params, trainable_prefixes=trainable_prefixes(options["model"]))
    step_options = StepOptions(weights=options["weights"],
                               images_per_subject=data_options.images_per_subject,
                               image_size=(data_options.image_size, data_options.image_size),
                               seed=int(config.seed))
    train_step = jit_train_step(make_train_step(model, optimizer, step_options, labels), mesh)
    eval_step = jit_eval_step(make_eval_step(evaluation_model(model), step_options), mesh)
    image_step = jit_eval_step(make_image_step(evaluation_model(model), step_options), mesh)
    assets = sharding.replicate(assets_host, mesh)

    config_dict = checkpoints_lib.plain_config(config)
    if jax.process_index() == 0:
        write_json(workdir / CONFIG_FILE, config_dict)
    checkpointer = checkpoints_lib.RunCheckpointer(
        workdir / CHECKPOINT_DIR, config=config_dict, max_to_keep=loop.max_checkpoints,
        ignore_keys=RESUME_IGNORED_KEYS)
    latest = checkpointer.latest_step()
    evaluation_history = _read_json(workdir / "evaluation_history.json", default=[])
    stored = [entry for entry in evaluation_history if entry["step"] == loop.steps]
    if latest == loop.steps and stored:  # a finished run: its stored evaluation, no data loaded
        log(f"{workdir} is finished (step {loop.steps}); its evaluation.json stands")
        checkpointer.close()
        return stored[-1]
    loader = make_train_loader(make_train_source(flame, data_options, cache_dir), data_options)
    start_step = 0
    if latest is not None:
        state, extra = checkpointer.restore(latest, state)
        loader.set_state(extra["data"].encode())
        start_step = int(latest)
        log(f"resuming from {workdir / CHECKPOINT_DIR} step {start_step}")
    state = sharding.replicate(state, mesh)
    eval_batches = make_eval_batches(flame, data_options, loop.eval_batch_size, cache_dir)

    def write_grid(name: str, step: int, state: TrainState, host_batch: dict, batch) -> None:
        images = jax.device_get(image_step(state, assets, batch))
        if jax.process_index() == 0:
            write_prediction_grid(workdir / "images" / f"{name}_{step:06d}.png", host_batch,
                                  images)

    def run_evaluation(step: int, state: TrainState) -> dict:
        summary = {"step": step, **evaluate(eval_step, state, assets, eval_batches, mesh),
                   "wall_time_s": round(time.perf_counter() - started, 1)}
        if jax.process_index() == 0:
            write_json(workdir / "evaluation.json", summary)
            history = [entry for entry in evaluation_history if entry["step"] < step]
            evaluation_history[:] = history + [summary]
            write_json(workdir / "evaluation_history.json", evaluation_history)
            visualize.plot_evaluation(evaluation_history, workdir / "evaluation.png")
        if loop.image_every > 0:
            write_grid("eval", step, state, eval_batches[0],
                       sharding.shard_batch(_to_batch(eval_batches[0]), mesh))
        log(f"step {step}: held-out vertex error {summary['vertex_error_mm']:.3f} mm (mean "
            f"face {summary['mean_face_vertex_error_mm']:.3f} mm); with scale "
            f"{summary['scaled_vertex_error_mm']:.3f} mm (mean face "
            f"{summary['mean_face_scaled_vertex_error_mm']:.3f} mm)")
        return summary

    if start_step == 0 and loop.eval_every > 0:
        run_evaluation(0, state)
    writer = MetricsWriter(workdir, total_steps=loop.steps, initial_step=start_step,
                           desc="regressor", postfix=("loss", "vertex_mm", "data_wait_fraction"))
    summary = None
    try:
        interval_wait, interval_steps, interval_start = 0.0, 0, time.perf_counter()
        for step in range(start_step + 1, loop.steps + 1):
            waited = time.perf_counter()
            host_batch = next(loader)
            batch = sharding.shard_batch(_to_batch(host_batch), mesh)
            interval_wait += time.perf_counter() - waited
            interval_steps += 1
            state, metrics = train_step(state, assets, batch)
            if _due(step, loop.log_every, loop.steps):
                metrics = jax.device_get(metrics)
                guard.raise_if_nonfinite(state)
                elapsed = time.perf_counter() - interval_start
                metrics["data_wait_s"] = interval_wait / interval_steps
                metrics["data_wait_fraction"] = interval_wait / max(elapsed, 1e-9)
                writer.write(step, metrics)
                interval_wait, interval_steps, interval_start = 0.0, 0, time.perf_counter()
            if _due(step, loop.checkpoint_every, loop.steps):
                guard.raise_if_nonfinite(state)
                checkpointer.save(step, state, extra={"data": loader.get_state().decode()})
            if _due(step, loop.eval_every, loop.steps):
                summary = run_evaluation(step, state)
            if loop.image_every > 0 and step % loop.image_every == 0:
                write_grid("train", step, state, host_batch, batch)
    finally:
        writer.close()
        checkpointer.close()
    if summary is None:  # resumed at the last step: evaluate the restored state
        summary = run_evaluation(loop.steps, state)
    return summary


# ----------------------------------------------------------------------------------------------
# Helpers of the run.


def write_json(path, value) -> None:
    """JSON file written atomically (indent 2)."""
    atomic_write(pathlib.Path(path), json.dumps(value, indent=2, sort_keys=True) + "\n")


def _read_json(path, default):
    path = pathlib.Path(path)
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


@dataclasses.dataclass(frozen=True)
class FlameOptions:
    """The FLAME model: path '' = the built-in `flame_jax.synthetic()`; else `flame_jax.load`
    of path (FLAME 2020 generic_model.pkl, flame2023_Open.pkl or our .npz) with the optional
    masks (FLAME_masks.pkl: the vertex loss's regions) and texture (FLAME_texture.npz: the
    albedo the 2D losses render) files."""

    path: str = ""
    masks: str = ""
    texture: str = ""


def load_flame(options: FlameOptions) -> flame_jax.FlameModel:
    """The FLAME model of `options` (errors name the file)."""
    if not options.path:
        if options.masks or options.texture:
            raise ValueError("flame.masks / flame.texture need flame.path (the built-in model "
                             "has its own)")
        return flame_jax.synthetic()
    return flame_jax.load(options.path, masks=options.masks or None,
                          texture=options.texture or None)


def check_inputs(config) -> None:
    """Fail before any work when files the config needs are not given or do not exist.

    Raises FileNotFoundError listing every missing entry with the config key that names it.
    """
    missing = []

    def need_file(key: str, value: str, what: str) -> None:
        if not value:
            missing.append(f"{key} is not set: {what}")
        elif not pathlib.Path(value).exists():
            missing.append(f"{key} = {value!r} does not exist: {what}")

    model, data, loss = config.model, config.data, config.loss
    if model.trainable == "last_stage" or model.arcface_path:
        need_file("model.arcface_path", model.arcface_path,
                  "ArcFace weights (insightface glintr100.onnx / w600k_r50.onnx or an "
                  "arcface_torch backbone.pth); the paper trains only the last stage of them")
    if loss.identity > 0 and loss.w2d > 0:
        need_file("recognition_arcface_path", config.recognition_arcface_path,
                  "the frozen face-recognition network of the identity loss (ArcFace weights), "
                  "or switch the term off with --config.loss.identity=0.0")
    if data.source == "mica":
        need_file("data.root", data.root, "the MICA-format dataset root (PAPER.md, 'Data')")
        if not data.names:
            missing.append("data.names is empty: the dataset names under data.root, e.g. "
                           "'(\"FaceWarehouse\", \"LYHM\")'")
        need_file("flame.path", config.flame.path,
                  "MICA's registrations are FLAME 2020 meshes: FLAME 2020 generic_model.pkl")
    for key in ("path", "masks", "texture"):
        value = config.flame[key]
        if value and not pathlib.Path(value).exists():
            missing.append(f"flame.{key} = {value!r} does not exist")
    if config.flame.path and not config.flame.masks and not str(config.flame.path).endswith(
            ".npz"):
        missing.append("flame.masks is not set: the vertex loss's face/eye/ear regions "
                       "(FLAME_masks.pkl)")
    renders = (loss.photometric > 0 or loss.identity > 0) and loss.w2d > 0
    if (config.flame.path and renders and not config.flame.texture
            and not str(config.flame.path).endswith(".npz")):
        missing.append("flame.texture is not set: the 2D losses render the albedo "
                       "(FLAME_texture.npz)")
    if config.coma_checkpoint_dir and not pathlib.Path(config.coma_checkpoint_dir).is_dir():
        missing.append(f"coma_checkpoint_dir = {config.coma_checkpoint_dir!r} does not exist")
    if missing:
        raise FileNotFoundError("the config needs files that are not here:\n  - "
                                + "\n  - ".join(missing))


def make_objective_assets(flame, encoder, weights, recognition_arcface_path: str):
    """`ObjectiveAssets`: FLAME, frozen CoMA encoder, and the frozen recognition network of the
    identity loss (imported ArcFace; required when `weights.identity` > 0)."""

    recognition = None
    if weights.on("identity"):
        if not recognition_arcface_path:
            raise ValueError(
                "loss.identity > 0 needs a pretrained face-recognition network: set "
                "recognition_arcface_path (ArcFace .onnx/.pth) or --config.loss.identity=0.0")
        if not pathlib.Path(recognition_arcface_path).is_file():
            raise FileNotFoundError(f"recognition_arcface_path {recognition_arcface_path} does "
                                    f"not exist: bring ArcFace weights")
        recognition = backbone_lib.import_arcface(recognition_arcface_path)
    return objective_lib.make_assets(flame, encoder=encoder, recognition=recognition)


def _to_batch(host_batch: dict) -> Batch:
    """Host dict of `Batch` fields -> `Batch` of numpy arrays (no device transfer here)."""
    return Batch(**{field.name: np.asarray(host_batch[field.name])
                    for field in dataclasses.fields(Batch)})


# ----------------------------------------------------------------------------------------------
# Data: grain loaders over synthetic subjects (rendered on the fly or from a cached pool) or
# MICA-format datasets; held-out synthetic subjects for the evaluation.

POOL_FORMAT = "recon.trainer.pool/1"
_POOL_UINT8 = ("images", "skin_masks")


def synthetic_config(options: DataOptions):
    from recon.data import augment, synthetic

    scene = dataclasses.asdict(options.scene)
    degradations = scene.pop("degradations")
    return synthetic.SyntheticConfig(
        image_size=options.image_size, **scene,
        augment=augment.AugmentConfig.clean() if degradations == "clean"
        else augment.AugmentConfig())


def _subjects_to_arrays(subjects: list) -> dict:
    """[subject dicts with (K, ...) fields] -> {field: (N, K, ...)}, 8-bit images and masks."""
    arrays = {name: np.stack([subject[name] for subject in subjects]) for name in subjects[0]}
    for name in _POOL_UINT8:
        arrays[name] = np.round(np.clip(arrays[name], 0.0, 1.0) * 255.0).astype(np.uint8)
    arrays.pop("backbone_images")  # recomputed from the 8-bit image when a record is read
    return arrays


class PoolSource:
    """A grain random-access source over pre-rendered subjects held in memory.

    Record i: subject i's K examples (the `Batch` fields with a leading (K,) axis). Images
    and skin masks are stored with 8 bits and the backbone input is recomputed from the 8-bit
    image (`recon.backbone.backbone_input_from_crop`), as for a photo.
    """

    def __init__(self, arrays: dict, name: str):
        self.arrays = arrays
        self.name = name
        self.images_per_subject = int(arrays["images"].shape[1])

    def __repr__(self) -> str:
        # grain checks a restored iterator against repr(source): it must name the content.
        return (f"PoolSource({self.name}, subjects={len(self)}, "
                f"images_per_subject={self.images_per_subject})")

    def __len__(self) -> int:
        return int(self.arrays["images"].shape[0])

    def __getitem__(self, record_key: int) -> dict:
        index = int(record_key)
        record = {name: np.array(value[index]) for name, value in self.arrays.items()}
        images = record["images"]
        record["images"] = images.astype(np.float32) / np.float32(255.0)
        record["skin_masks"] = record["skin_masks"].astype(np.float32) / np.float32(255.0)
        record["backbone_images"] = backbone_lib.backbone_input_from_crop(images)
        return record


def render_subjects(flame, options: DataOptions, subjects: range, *, desc: str,
                    show_progress: bool = True) -> list:
    """The synthetic subjects `subjects` (each with K images), rendered now, tqdm bar."""
    import tqdm

    from recon.data import synthetic

    config = synthetic_config(options)
    host = synthetic.HostModel.from_model(flame)
    return [synthetic.make_subject(flame, config, subject, range(options.images_per_subject),
                                   options.seed, host)
            for subject in tqdm.tqdm(subjects, desc=desc, disable=not show_progress,
                                     dynamic_ncols=True)]


def cached_subjects(flame, options: DataOptions, subjects: range, *, desc: str,
                    cache_dir: str = "") -> PoolSource:
    """`PoolSource` of synthetic `subjects` ({field: (N, K, ...)}), rendered once and cached.

    The cache file is keyed by the FLAME model's template/bases checksum, the synthetic
    config, the subject range, K and the seed: `<cache>/synthetic/<key>.npz` (atomic write).
    """
    digest = hashlib.sha256()
    for array in (flame.v_template, flame.shapedirs, flame.exprdirs, flame.albedo_mean):
        digest.update(np.ascontiguousarray(np.asarray(array, np.float32)).tobytes())
    description = {"format": POOL_FORMAT, "config": repr(synthetic_config(options)),
                   "subjects": [subjects.start, subjects.stop, subjects.step],
                   "images_per_subject": options.images_per_subject, "seed": options.seed,
                   "model": digest.hexdigest()}
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]
    root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / "synthetic" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return PoolSource({name: stored[name] for name in stored.files}, key)
    arrays = _subjects_to_arrays(render_subjects(flame, options, subjects, desc=desc,
                                                 show_progress=jax.process_index() == 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda stream: np.savez(stream, **arrays))
    return PoolSource(arrays, key)


def make_train_source(flame, options: DataOptions, cache_dir: str = ""):
    """The training source: one record per subject with its K images."""
    from recon.data import synthetic

    if options.source == "mica":
        from recon.data import mica

        return mica.MicaDataset(options.root, tuple(options.names), model=flame)
    subjects = range(synthetic.TRAIN_SUBJECTS.start,
                     synthetic.TRAIN_SUBJECTS.start + options.num_train_subjects)
    if options.pool:
        return cached_subjects(flame, options, subjects, desc="training pool",
                               cache_dir=cache_dir)
    return synthetic.SyntheticSource(flame, synthetic_config(options), subjects=subjects,
                                     images_per_subject=options.images_per_subject,
                                     seed=options.seed)


def make_train_loader(source, options: DataOptions):
    """grain iterator of this host's share of each global batch (subject-major)."""
    from recon.data import pipeline

    return pipeline.make_loader(
        source, batch_subjects=options.batch_subjects,
        images_per_subject=options.images_per_subject, seed=options.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        num_workers=options.num_workers)


def make_eval_batches(flame, options: DataOptions, eval_batch_size: int,
                      cache_dir: str = "") -> list:
    """Held-out synthetic subjects as host batches of `eval_batch_size` rows (whole subjects);
    with several processes each keeps its own contiguous share of every batch."""
    from recon.data import synthetic

    subjects = range(synthetic.HELDOUT_SUBJECTS.start,
                     synthetic.HELDOUT_SUBJECTS.start + options.num_eval_subjects)
    source = cached_subjects(flame, options, subjects, desc="held-out subjects",
                             cache_dir=cache_dir)
    rows = [source[i] for i in range(len(source))]
    flat = {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
    per_process = eval_batch_size // jax.process_count()
    batches = []
    for start in range(0, flat["images"].shape[0], eval_batch_size):
        offset = start + jax.process_index() * per_process
        batches.append({name: value[offset:offset + per_process] for name, value in flat.items()})
    return batches


# ----------------------------------------------------------------------------------------------
# The trained regressor for photos and NoW export.

# iBUG-68 indices of NoW's 7 scan landmarks (right-eye outer/inner, left-eye inner/outer, nose
# bottom, right/left mouth corner) = static-51 indices [19, 22, 25, 28, 16, 31, 37] + 17.
NOW_LANDMARKS_68 = (36, 39, 42, 45, 33, 48, 54)


def code_to_mesh(flame: flame_jax.FlameModel, code: Code, *, neutral: bool = True
                 ) -> Tuple[Array, Array]:
    """(vertices (B, V, 3), landmarks7 (B, 7, 3)) in metres of a `Code` through FLAME.

    neutral: the identity with zero pose and expression (what NoW scores and what the 3D losses
    train), else the posed head of the image. landmarks7: NoW's 7 points (`NOW_LANDMARKS_68`) on
    that mesh.
    """
    params = code.neutral_flame_params() if neutral else code.flame_params()
    output = flame_jax.forward(flame, params)
    return output.vertices, output.landmarks[:, list(NOW_LANDMARKS_68)]


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A trained regressor: `predictor(images_224) -> Code`.

    images_224: (B, 224, 224, 3) float32 RGB in [0, 1], the face crop (NoW/DECA crop: 1.6 x
    the detector box around its centre, `recon.photo`); resized to the backbone's 112 x 112
    (2 x 2 box average) and ArcFace-normalised inside. `mesh(code)` gives (vertices,
    landmarks7) through `code_to_mesh`. flame: the FLAME model the run trained with; step: the
    checkpoint's step; workdir: where it came from.
    """

    apply: Callable
    variables: dict
    flame: flame_jax.FlameModel
    step: int
    workdir: str

    def __call__(self, images_224) -> Code:
        images = jnp.asarray(images_224)
        if images.ndim != 4 or images.shape[1:] != (224, 224, 3):
            raise ValueError(f"predict expects (B, 224, 224, 3) images in [0, 1], got shape "
                             f"{images.shape}")
        if not jnp.issubdtype(images.dtype, jnp.floating):
            raise ValueError(f"predict expects float images in [0, 1], got dtype {images.dtype}")
        return self.apply(self.variables, images.astype(jnp.float32))

    def mesh(self, code: Code, *, neutral: bool = True) -> Tuple[Array, Array]:
        return _code_to_mesh_jit(self.flame, code, neutral=neutral)


_code_to_mesh_jit = jax.jit(code_to_mesh, static_argnames="neutral")


def load_predictor(workdir, *, step: Optional[int] = None) -> Predictor:
    """The regressor of a training workdir (its latest checkpoint, or `step`).

    Raises FileNotFoundError naming the workdir when it holds no checkpoint or no config.json.
    """
    workdir = pathlib.Path(workdir)
    checkpoint_dir = workdir / CHECKPOINT_DIR
    steps = sorted(int(path.name) for path in checkpoint_dir.iterdir()
                   if path.name.isdigit()) if checkpoint_dir.is_dir() else []
    if not steps:
        raise FileNotFoundError(
            f"{workdir} holds no regressor checkpoint (expected {checkpoint_dir}/<step>/, "
            f"written by `python train.py --config configs/default.py --workdir {workdir}`)")
    config_path = workdir / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: the workdir's checkpoints cannot be "
                                f"read without the config of the run that wrote them")
    import ml_collections

    config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    config = ml_collections.ConfigDict(config_dict)
    options = _read_options(config)
    # The architecture only: the weights come from the checkpoint, not from arcface_path.
    model_options = dataclasses.replace(options["model"], arcface_path="")
    model, _ = build_model(model_options)
    optimizer_fn = functools.partial(make_optimizer, model_options=model_options,
                                     optim=options["optim"], steps=options["loop"].steps)
    target = create_state(model, None, optimizer_fn, int(config.seed))
    with checkpoints_lib.RunCheckpointer(checkpoint_dir, config=config_dict,
                                         ignore_keys=RESUME_IGNORED_KEYS) as checkpointer:
        step = checkpointer.latest_step() if step is None else int(step)
        state, _ = checkpointer.restore(step, target)
    variables = {"params": state.params, "batch_stats": state.batch_stats}

    @jax.jit
    def apply(variables, images):
        backbone_images = backbone_lib.backbone_input_from_crop_jax(images, max_value=1.0)
        return split_code(model.apply(variables, backbone_images, train=False))

    return Predictor(apply=apply, variables=variables, flame=load_flame(options["flame"]),
                     step=int(step), workdir=str(workdir))
