"""Benchmark: the regressor's jitted training step (recon.training.regressor), compile time,
steps/s, peak memory, and what the step spends its time on.

    python benchmarks/train_step.py                               # default config (CPU size)
    python benchmarks/train_step.py --config paper --repeats 2    # paper: IResNet-100, 16 x 224
    python benchmarks/train_step.py --config both --no-parts

The step is exactly `recon.training.regressor.step.make_train_step` jitted by `jit_train_step`
on a mesh of all devices, fed a fixed random batch (images, landmarks, backbone inputs or, with
`model.trunk_cache`, trunk features; FLAME heads as 3D targets) so that data loading is not
measured (see benchmarks/data_pipeline.py for that). Weights are random for the IResNet (the
paper config's IResNet-100 also serves, frozen, as the identity loss's recognition network, the
cost the paper's run would pay with ArcFace); the default's dlib network is the real one, and
the CoMA encoder is random (costs do not depend on the values).

Parts (--parts, default on): forward + backward of each stage alone, jitted separately, at
the same batch: the trained network (its input -> code), FLAME (code -> posed and neutral
meshes), render (mesh -> image), CoMA encoder (3D-ID), the recognition network (identity);
then the top three are named. The parts overlap with the objective's own arithmetic and the shape-
consistency pass (which runs FLAME, render, encoder and recognition a second time), so they do
not sum to the step.

Peak memory: `device.memory_stats()["peak_bytes_in_use"]` where the backend reports it (GPU,
TPU), else the process's maximum resident set size (CPU; includes everything the process
holds).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import flame_jax
import spectral_gcn
from recon import objective, render
from recon.image import crop as crop_lib
from recon.image import preprocess
from recon.model import build
from recon.options import load_config_file
from recon.render import shading
from recon.training import sharding
from recon.training.regressor import loop, options as options_lib, step as step_lib
from recon.types import split_code

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import timing  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str):
    return load_config_file(REPO / "configs" / f"{name}.py")


def peak_memory_bytes() -> tuple[int, str]:
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "process max RSS"


def random_batch(flame, rows: int, size: int, images_per_subject: int, input_shape: tuple,
                 seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    shape = np.zeros((rows, flame.num_shape), np.float32)
    shape[:, :20] = rng.normal(size=(rows, 20))
    params = flame_jax.FlameParams.zeros(rows, flame).replace(shape=jnp.asarray(shape))
    vertices = np.asarray(flame_jax.forward(flame, params).vertices, np.float32)
    return {"images": rng.random((rows, size, size, 3), np.float32),
            "backbone_inputs": rng.uniform(-1, 1, (rows,) + input_shape).astype(np.float32),
            "landmarks": rng.uniform(0.2 * size, 0.8 * size, (rows, 68, 2)).astype(np.float32),
            "landmark_weights": np.ones((rows, 68), np.float32),
            "skin_masks": np.ones((rows, size, size), np.float32),
            "vertices": vertices, "has_3d": np.ones((rows,), np.float32),
            "subject_ids": np.repeat(np.arange(rows // images_per_subject, dtype=np.int32),
                                     images_per_subject)}


def random_encoder(cache_dir: str = "") -> spectral_gcn.FrozenEncoder:
    """A CoMA encoder with random weights of the paper's architecture (cost only)."""
    from spectral_gcn.models import CoMAConfig, Encoder

    hierarchy = spectral_gcn.flame_hierarchy(cache_dir=cache_dir or None)
    config = CoMAConfig()
    variables = Encoder(config).init(jax.random.key(0), jnp.zeros((1, 5023, 3)), hierarchy)
    variables = {"params": variables["params"],
                 "stats": {"mean": jnp.zeros((5023, 3)), "std": jnp.full((5023, 3), 0.01)}}
    return spectral_gcn.FrozenEncoder(variables=variables, hierarchy=hierarchy, config=config)


def setup(name: str, batch_subjects: int | None, image_size: int | None):
    config = load_config(name)
    options = options_lib.read_options(config)
    data = options.data
    if batch_subjects:
        data = dataclasses.replace(data, batch_subjects=batch_subjects)
    size = image_size or data.loss_size
    model_options = dataclasses.replace(options.model, arcface_path="")
    weights = options.weights
    flame = flame_jax.synthetic()
    camera = crop_lib.template_camera(data.crop, flame)
    load = model_options.backbone == "dlib"  # dlib's weights ship; ArcFace's are random here
    model, imported = build.build_model(model_options, camera=camera, load_weights=load)
    variables = build.init_variables(model, imported, 0, model_options)
    train_model, input_shape = model, build.input_shape(model_options)
    if model_options.trunk_cache:
        trunk_end = model_options.trunk_end
        train_model = model.clone(input_kind="features", trunk_end=trunk_end)
        probe = jnp.zeros((1,) + input_shape)
        input_shape = jax.eval_shape(lambda x: model.backbone.apply(
            {"params": variables["params"]["backbone"]}, x, until=trunk_end,
            method=type(model.backbone).features), probe).shape[1:]
    recognition, kind = None, model_options.input_kind
    if weights.on("identity"):
        if options.recognition.network == "dlib":
            from recon.model.dlib_resnet import import_dlib_resnet
            recognition, kind = import_dlib_resnet(), "dlib"
        else:  # the backbone's random weights, frozen, stand in for ArcFace
            recognition = (model.backbone, {"params": variables["params"]["backbone"],
                                            "batch_stats": variables["batch_stats"].get(
                                                "backbone", {})})
            kind = "arcface"
    encoder = random_encoder(config.cache_dir) if weights.on("id_3d") else None
    assets = objective.make_assets(flame, encoder=encoder, recognition=recognition,
                                   recognition_input_kind=kind)
    labels = build.trainable_labels(variables["params"], model_options)
    optimizer = step_lib.make_optimizer(labels, options.optim, options.loop.steps)
    state = step_lib.create_state(variables, optimizer)
    step_options = step_lib.StepOptions(weights=weights,
                                        images_per_subject=data.images_per_subject,
                                        image_size=(size, size))
    mesh = sharding.make_mesh()
    step = step_lib.jit_train_step(
        step_lib.make_train_step(train_model, optimizer, step_options, labels), mesh)
    host = random_batch(flame, data.global_batch_size, size, data.images_per_subject,
                        tuple(input_shape))
    batch = sharding.shard_batch(step_lib.to_batch(host), mesh)
    return dict(name=name, model=train_model, model_options=model_options, state=state,
                assets=sharding.replicate(assets, mesh), step=step, batch=batch, mesh=mesh,
                size=size, rows=data.global_batch_size, weights=weights,
                step_options=step_options, flame=flame)


def measure_step(parts: dict, repeats: int) -> dict:
    state = sharding.replicate(parts["state"], parts["mesh"])
    start = time.perf_counter()
    state, metrics = parts["step"](state, parts["assets"], parts["batch"])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        state, metrics = parts["step"](state, parts["assets"], parts["batch"])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    result = timing.Timing(tuple(times))
    memory, memory_kind = peak_memory_bytes()
    return {"compile_plus_first_step_s": compile_s, **result.as_dict(),
            "steps_per_s": 1.0 / result.median_s, "peak_memory_gib": memory / 2**30,
            "memory_kind": memory_kind}


def measure_parts(parts: dict, repeats: int) -> dict:
    """Forward + backward seconds of each stage alone (jitted), at the step's batch."""
    model = parts["model"]
    batch, assets = parts["batch"], parts["assets"]
    variables = {"params": parts["state"].params, "batch_stats": parts["state"].batch_stats}
    flame = assets.flame
    code = split_code(model.apply(variables, batch.backbone_inputs))

    def network(params):
        vector = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                             batch.backbone_inputs, train=False)
        return jnp.sum(vector ** 2)

    def flame_posed_neutral(code):
        posed = flame_jax.forward(flame, code.flame_params())
        neutral = flame_jax.forward(flame, code.neutral_flame_params())
        return jnp.sum(posed.vertices ** 2) + jnp.sum(neutral.vertices ** 2) + jnp.sum(
            posed.landmarks ** 2)

    vertices = flame_jax.forward(flame, code.flame_params()).vertices
    albedo = shading.albedo_from_texture(flame.albedo_mean, flame.albedo_basis, code.texture)
    settings = parts["step_options"].render_settings()

    def render_image(vertices, albedo, light):
        out = render.render(vertices, flame.faces, code.camera, light, albedo,
                            settings=settings)
        return jnp.mean(jnp.abs(out.image - batch.images))

    candidates = {
        "trained network (input -> code)": (jax.jit(jax.grad(network)), (variables["params"],)),
        "FLAME (posed + neutral)": (jax.jit(jax.grad(flame_posed_neutral)), (code,)),
    }
    if objective.needs_render(parts["weights"]):
        candidates["render"] = (jax.jit(jax.grad(render_image, argnums=(0, 1, 2))),
                                (vertices, albedo, code.sh_light))
    if assets.encoder is not None:
        encode = lambda v: jnp.sum(spectral_gcn.encode(assets.encoder, v) ** 2)  # noqa: E731
        candidates["CoMA encoder (3D-ID)"] = (jax.jit(jax.grad(encode)), (vertices,))
    if assets.recognition_network is not None:
        network_, rec_vars = assets.recognition_network, assets.recognition_variables
        kind = assets.recognition_input_kind

        def recognise(images):
            inputs = preprocess.backbone_input_jax(images, kind)
            return jnp.sum(network_.apply(rec_vars, inputs) ** 2)

        candidates["recognition network (identity)"] = (jax.jit(jax.grad(recognise)),
                                                        (batch.images,))
    return {name: timing.measure(function, *args, repeats=repeats).median_s
            for name, (function, args) in candidates.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=("default", "paper", "both"), default="default")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-subjects", type=int, default=None,
                        help="override data.batch_subjects (global batch = this x K)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--no-parts", action="store_true")
    args = parser.parse_args(argv)
    timing.print_environment(repeats=args.repeats)
    report = timing.Report("regressor train step", [
        ("config", "config", "{}"), ("batch", "batch", "{}"), ("image", "image", "{}"),
        ("compile_plus_first_step_s", "compile + 1st step (s)", "{:.1f}"),
        ("median_s", "s / step (median)", "{:.3f}"), ("min_s", "s / step (best)", "{:.3f}"),
        ("steps_per_s", "steps/s", "{:.2f}"), ("peak_memory_gib", "peak memory (GiB)", "{:.2f}"),
        ("top_costs", "top three costs (fwd+bwd s)", "{}")])
    names = ("default", "paper") if args.config == "both" else (args.config,)
    for name in names:
        parts = setup(name, args.batch_subjects, args.image_size)
        costs = None
        if not args.no_parts:  # before the step, which donates (deletes) the initial state
            costs = measure_parts(parts, max(1, min(args.repeats, 3)))
        result = measure_step(parts, args.repeats)
        row = {"config": name, "batch": parts["rows"], "image": parts["size"], **result}
        if costs is not None:
            top = sorted(costs.items(), key=lambda item: -item[1])[:3]
            row["parts_s"] = costs
            row["top_costs"] = ", ".join(f"{k} {v:.3f}" for k, v in top)
        report.row(**row)
    report.print_markdown()


if __name__ == "__main__":
    main()
