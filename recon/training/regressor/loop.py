"""`train_and_evaluate(config, workdir)`: the regressor's run (`python train.py --config
configs/default.py`).

  1. Run state first: the workdir's checkpoints are opened with this config (a changed key is
     refused, naming it, before anything is written or computed); only then is
     `workdir/config.json` written. A finished run returns its stored evaluation.
  2. The FLAME model, the frozen CoMA encoder of the 3D-ID loss (`recon.training.coma_cache`),
     the recognition network of the identity loss, the regressor (`recon.model.build`) and its
     optimizer; everything the step reads besides the batch is an `ObjectiveAssets` argument,
     replicated over a `data` mesh.
  3. Data (`recon.data.sources`): the training source (with `model.trunk_cache`, a pool whose
     records hold the frozen trunk's features of each crop) and held-out synthetic subjects.
  4. The loop: the jitted `train_step`, `metrics.jsonl` + tqdm, orbax checkpoints with the data
     iterator state (re-running resumes exactly), PNG grids, and the held-out evaluation
     (`evaluation.json`, `evaluation_history.json`, `evaluation.png`) every `eval_every` steps
     and at the end; with `eval.now_root` also the NoW validation score (`recon.now`).
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import time
from typing import Any, Dict, Optional

import jax
import numpy as np

from flame_jax.fileio import atomic_write
from recon import objective as objective_lib
from recon import visualize
from recon.data import pool as pool_lib
from recon.data import sources
from recon.image import crop as crop_lib
from recon.model import build
from recon.training import checkpoints as checkpoints_lib
from recon.training import coma_cache, distributed, guard, sharding
from recon.training.metrics import MetricsWriter
from recon.training.regressor import evaluation as evaluation_lib
from recon.training.regressor import step as step_lib
from recon.training.regressor.options import (RESUME_IGNORED_KEYS, RunOptions, check_inputs,
                                              read_options)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
HISTORY_FILE = "evaluation_history.json"


def write_json(path, value) -> None:
    """JSON file written atomically (indent 2)."""
    atomic_write(pathlib.Path(path), json.dumps(value, indent=2, sort_keys=True) + "\n")


def read_json(path, default):
    path = pathlib.Path(path)
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


def _due(step: int, every: int, last: int) -> bool:
    """Periodic action at `step` (every `every` steps, 0 = never) or at the last step."""
    return step == last or (every > 0 and step % every == 0)


def tree_digest(tree: Any) -> str:
    """sha256 of a pytree's array bytes (structure and shapes included)."""
    hasher = hashlib.sha256()
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    hasher.update(str(treedef).encode())
    for leaf in leaves:
        leaf = np.asarray(leaf)
        hasher.update(f"{leaf.dtype}{leaf.shape}".encode())
        hasher.update(np.ascontiguousarray(leaf).tobytes())
    return hasher.hexdigest()


LANDMARK_TERMS = ("landmark", "eye_closure", "lip_distance")


def check_landmarks(host_batch: dict, weights, step: int) -> None:
    """Raise ValueError naming the landmark terms that are on when this host's batch holds no
    visible landmark (they would train on nothing and log 0, which looks perfect)."""
    terms = [name for name in LANDMARK_TERMS if weights.on(name)]
    if terms and not np.any(np.asarray(host_batch["landmark_weights"]) > 0):
        raise ValueError(
            f"loss terms {terms} are on but the batch of step {step} holds no visible landmark "
            f"(every landmark weight is 0): give the data landmarks (MICA-format data: "
            f"python -m recon.data.prepare_mica ROOT NAME) or set those weights to 0")


def make_recognition(options: RunOptions):
    """((module, variables), input kind) of the identity term's frozen network, or (None, ...)."""
    if not options.weights.on("identity"):
        return None, "arcface"
    network = options.recognition
    if network.network == "dlib":
        from recon.model.dlib_resnet import import_dlib_resnet

        return import_dlib_resnet(network.path or None), "dlib"
    from recon.model.arcface_import import import_arcface

    return import_arcface(network.path), "arcface"


def make_trunk(model, imported: Optional[dict], options: RunOptions) -> Optional[pool_lib.Trunk]:
    """The frozen trunk whose features the training pool caches (`model.trunk_cache`)."""
    if not options.model.trunk_cache:
        return None
    if imported is None:
        raise ValueError("model.trunk_cache needs imported backbone weights (a random trunk "
                         "would be cached as it is, untrained)")
    backbone = model.backbone
    trunk_end = options.model.trunk_end
    variables = {"params": imported["params"]}
    if imported.get("batch_stats"):
        variables["batch_stats"] = imported["batch_stats"]
    apply = jax.jit(lambda variables, inputs: backbone.apply(
        variables, inputs, until=trunk_end, method=type(backbone).features))
    key = f"{options.model.backbone}:{trunk_end}:{tree_digest(variables)[:20]}"
    return pool_lib.Trunk(apply=lambda inputs: apply(variables, inputs), key=key)


STATISTICS_SUBJECTS = 256


def statistics_batches(source, subjects: int = STATISTICS_SUBJECTS, per_batch: int = 16):
    """The backbone inputs of the source's first `subjects` records, in batches (the same on
    every host: records are read by index, not through the shuffled loader)."""
    count = min(len(source), subjects)
    for start in range(0, count, per_batch):
        records = [source[index] for index in range(start, min(count, start + per_batch))]
        yield np.concatenate([record["backbone_inputs"] for record in records])


def pretrained_embedding(options: RunOptions, model, imported: Optional[dict]):
    """(embed_features, embed_inputs): the pretrained backbone's own embedding (dlib's
    descriptor, ArcFace's embedding; the imported weights, not the run's) from trunk features
    and from backbone inputs, for the ridge baseline; None when the backbone is not pretrained."""
    if imported is None:
        return None
    backbone = model.backbone
    variables = {"params": imported["params"]}
    if imported.get("batch_stats"):
        variables["batch_stats"] = imported["batch_stats"]
    if options.model.backbone == "dlib":
        from recon.model.dlib_resnet import import_dlib_resnet

        backbone = backbone.clone(output="descriptor")
        variables = {"params": import_dlib_resnet(options.model.dlib_path or None)[1]["params"]}
    trunk_end = options.model.trunk_end
    from_features = jax.jit(lambda x: backbone.apply(variables, x, after=trunk_end,
                                                     method=type(backbone).from_features))
    from_inputs = jax.jit(lambda x: backbone.apply(variables, x))
    return from_features, from_inputs


def measure_baseline(options: RunOptions, model, imported, source, held_out,
                     face_vertices) -> dict:
    """The ridge baseline (`baseline.ridge_baseline`) on the pool's cached trunk features and
    the held-out images; {} when the run has no pretrained backbone or no feature pool."""
    embed = pretrained_embedding(options, model, imported)
    if embed is None or not getattr(source, "has_features", False):
        return {}
    from recon.training.regressor import baseline  # noqa: PLC0415

    from_features, from_inputs = embed
    records = [source[index] for index in range(len(source))]
    train = baseline.embed_batches(from_features, (
        np.concatenate([record["backbone_inputs"] for record in records[start:start + 16]])
        for start in range(0, len(records), 16)))
    subjects = np.concatenate([record["subject_ids"] for record in records])
    vertices = np.concatenate([record["vertices"] for record in records])
    held_out_records = [held_out[index] for index in range(len(held_out))]
    held_out_embeddings = baseline.embed_batches(from_inputs, (
        record["backbone_inputs"] for record in held_out_records))
    held_out_vertices = np.concatenate([record["vertices"] for record in held_out_records])
    return baseline.ridge_baseline(train, subjects, vertices, held_out_embeddings,
                                   held_out_vertices, np.asarray(face_vertices))


def train_and_evaluate(config, workdir) -> Dict[str, Any]:
    """Train the regressor described by `config` (configs/default.py) in `workdir`, resuming
    from its latest checkpoint, and return the final evaluation (also `evaluation.json`)."""
    distributed.maybe_initialize()
    started = time.perf_counter()
    workdir = pathlib.Path(workdir)
    options = read_options(config)
    check_inputs(options)
    loop, data = options.loop, options.data
    log = print if jax.process_index() == 0 else (lambda *_: None)
    primary = jax.process_index() == 0

    # 1. Run state: refuse another config before anything is written.
    workdir.mkdir(parents=True, exist_ok=True)
    config_dict = checkpoints_lib.plain_config(config)
    checkpointer = checkpoints_lib.RunCheckpointer(
        workdir / CHECKPOINT_DIR, config=config_dict, max_to_keep=loop.max_checkpoints,
        ignore_keys=RESUME_IGNORED_KEYS)
    try:
        if primary:
            write_json(workdir / CONFIG_FILE, config_dict)
        latest = checkpointer.latest_step()
        history = read_json(workdir / HISTORY_FILE, default=[])
        stored = [entry for entry in history if entry["step"] == loop.steps]
        if latest == loop.steps and stored:  # finished: its stored evaluation, nothing loaded
            log(f"{workdir} is finished (step {loop.steps}); its evaluation.json stands")
            return stored[-1]
        return _run(options, workdir, checkpointer, history, started, log)
    finally:
        checkpointer.close()


def _run(options: RunOptions, workdir: pathlib.Path, checkpointer, history: list,
         started: float, log) -> Dict[str, Any]:
    loop, data = options.loop, options.data
    primary = jax.process_index() == 0

    # 2. Model, assets, optimizer, state.
    flame = build.load_flame(options.flame)
    encoder = None
    if options.weights.on("id_3d"):
        encoder = coma_cache.ensure_coma_encoder(
            options.coma, flame, checkpoint_dir=options.coma_checkpoint_dir,
            cache_dir=options.cache_dir, log=log)
    recognition, recognition_kind = make_recognition(options)
    assets_host = objective_lib.make_assets(flame, encoder=encoder, recognition=recognition,
                                            recognition_input_kind=recognition_kind)
    camera = crop_lib.template_camera(data.crop, flame)
    model, imported = build.build_model(options.model, camera=camera)
    train_model = model
    if options.model.trunk_cache:
        train_model = model.clone(input_kind="features", trunk_end=options.model.trunk_end)
    # 3. Data (the training source first: a "data" feature normalisation is fitted to it).
    source = sources.make_train_source(flame, data, backbone_kind=options.model.input_kind,
                                       trunk=make_trunk(model, imported, options),
                                       cache_dir=options.cache_dir)
    variables = build.init_variables(model, imported, options.seed, options.model)
    if options.model.feature_norm == "data" and checkpointer.latest_step() is None:
        variables = build.set_feature_statistics(train_model, variables,
                                                 statistics_batches(source))
    labels = build.trainable_labels(variables["params"], options.model)
    optimizer = step_lib.make_optimizer(labels, options.optim, loop.steps)
    state = step_lib.create_state(variables, optimizer)

    mesh = sharding.make_mesh()
    sharding.host_batch_size(data.global_batch_size, mesh)  # raises when it cannot
    sharding.host_batch_size(loop.eval_batch_size, mesh)
    step_options = step_lib.StepOptions(weights=options.weights,
                                        images_per_subject=data.images_per_subject,
                                        image_size=(data.loss_size, data.loss_size),
                                        seed=options.seed)
    train_step = step_lib.jit_train_step(
        step_lib.make_train_step(train_model, optimizer, step_options, labels), mesh)
    eval_step = step_lib.jit_eval_step(evaluation_lib.make_eval_step(model, step_options), mesh)
    image_step = step_lib.jit_eval_step(evaluation_lib.make_image_step(model, step_options),
                                        mesh)
    assets = sharding.replicate(assets_host, mesh)

    loader = sources.make_train_loader(source, data)
    start_step = 0
    latest = checkpointer.latest_step()
    if latest is not None:
        state, _ = checkpointer.restore(latest, state, iterator=loader)
        start_step = int(latest)
        log(f"resuming from {workdir / CHECKPOINT_DIR} step {start_step}")
    state = sharding.replicate(state, mesh)
    eval_batches = sources.make_eval_batches(flame, data, loop.eval_batch_size,
                                             backbone_kind=options.model.input_kind,
                                             cache_dir=options.cache_dir)
    ridge = {}
    if start_step == 0 or not history:
        held_out = sources.eval_pool(flame, data, backbone_kind=options.model.input_kind,
                                     cache_dir=options.cache_dir)
        ridge = measure_baseline(options, model, imported, source, held_out,
                                 assets_host.face_vertices)
        if ridge:
            log(f"ridge baseline (frozen pretrained embedding, same pool and held-out "
                f"subjects): {ridge['ridge_vertex_error_mm']:.3f} mm, face region "
                f"{ridge['ridge_face_vertex_error_mm']:.3f} mm")
    elif history and "ridge_vertex_error_mm" in history[-1]:
        ridge = {key: value for key, value in history[-1].items() if key.startswith("ridge_")}
    now_evaluator = None
    if options.eval.now_root:
        from recon.training.regressor import now_eval  # noqa: PLC0415

        now_evaluator = now_eval.NowEvaluator(options, model, flame, workdir)

    def write_grid(name: str, step: int, state, host_batch: dict, batch) -> None:
        images = jax.device_get(image_step(state, assets, batch))
        if primary:
            evaluation_lib.write_prediction_grid(
                workdir / "images" / f"{name}_{step:06d}.png", host_batch, images)

    def run_evaluation(step: int, state) -> dict:
        summary = {"step": step, **evaluation_lib.evaluate(eval_step, state, assets,
                                                           eval_batches, mesh), **ridge}
        if now_evaluator is not None:
            summary.update(now_evaluator(step, state))
        summary["wall_time_s"] = round(time.perf_counter() - started, 1)
        if primary:
            write_json(workdir / "evaluation.json", summary)
            entries = [entry for entry in history if entry["step"] < step] + [summary]
            history[:] = entries
            if now_evaluator is not None:
                now_evaluator.mark_best(history)
            write_json(workdir / HISTORY_FILE, history)
            visualize.plot_evaluation(history, workdir / "evaluation.png")
        if loop.image_every > 0:
            write_grid("eval", step, state, eval_batches[0],
                       sharding.shard_batch(step_lib.to_batch(eval_batches[0]), mesh))
        log(f"step {step}: held-out vertex error {summary['vertex_error_mm']:.3f} mm (mean "
            f"face {summary['mean_face_vertex_error_mm']:.3f}); face region "
            f"{summary['face_vertex_error_mm']:.3f} mm (mean face "
            f"{summary['mean_face_face_vertex_error_mm']:.3f})")
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
            check_landmarks(host_batch, options.weights, step)
            batch = sharding.shard_batch(step_lib.to_batch(host_batch), mesh)
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
                checkpointer.save(step, state, iterator=loader)
            if _due(step, loop.eval_every, loop.steps):
                summary = run_evaluation(step, state)
            if loop.image_every > 0 and step % loop.image_every == 0 and not \
                    options.model.trunk_cache:
                write_grid("train", step, state, host_batch, batch)
    finally:
        writer.close()
    if summary is None:  # resumed at the last step: evaluate the restored state
        summary = run_evaluation(loop.steps, state)
    checkpointer.wait()
    return summary
