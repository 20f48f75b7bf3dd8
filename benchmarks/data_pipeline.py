"""Benchmark: synthetic 2D-3D samples per second, per stage and through the grain loader.

    python benchmarks/data_pipeline.py                        # stages + loader, box crop at 224
    python benchmarks/data_pipeline.py --grid docs/synthetic_samples.png --subjects 0 --default
    python benchmarks/data_pipeline.py --default --workers 0 --step-seconds 1   # the default's crop

Prints one JSON line per measurement:
  * "compile": first call of the jitted device stages (FLAME + crop geometry + render + light).
  * "stages": per-image seconds of the host sampling, the device stages with the crop geometry
    (`render_batch`, one call per subject, K images), the host composition (background,
    occluders, degradations, the losses' image), and the in-process samples/s, for each
    --images-per-subject value.
  * "loader": `recon.data.pipeline.make_loader` over `SyntheticSource` with --workers worker
    processes: seconds to the first batch (worker start + compile) and steady samples/s.
  * "data_wait" (--step-seconds): a loop that does CPU (BLAS) work for the given seconds per
    batch, as a training step would, and the fraction of its time spent waiting in `next()`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import cv2
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import flame_jax
from recon.data import pipeline, sources, synthetic
from recon.image import crop as crop_lib


def measure_stages(model, config, host, images_per_subject: int, subjects: int, seed: int):
    indices = range(images_per_subject)
    start = time.perf_counter()
    synthetic.make_subject(model, config, 0, indices, seed, host)
    compile_s = time.perf_counter() - start
    sample_s = render_s = compose_s = 0.0
    for subject in tqdm(range(1, subjects + 1), desc=f"stages K={images_per_subject}"):
        t0 = time.perf_counter()
        scenes = synthetic.sample_scenes(host, config, subject, indices, seed)
        t1 = time.perf_counter()
        out, _ = synthetic.render_batch(model, config, scenes)
        t2 = time.perf_counter()
        for k in indices:
            synthetic.compose_example({name: value[k] for name, value in out.items()}, config,
                                      seed=seed, subject_index=subject, image_index=k)
        t3 = time.perf_counter()
        sample_s, render_s, compose_s = sample_s + t1 - t0, render_s + t2 - t1, compose_s + t3 - t2
    images = subjects * images_per_subject
    total = sample_s + render_s + compose_s
    return dict(kind="stages", images_per_subject=images_per_subject, subjects=subjects,
                compile_s=round(compile_s, 2),
                sample_ms_per_image=round(1e3 * sample_s / images, 2),
                render_ms_per_image=round(1e3 * render_s / images, 2),
                compose_ms_per_image=round(1e3 * compose_s / images, 2),
                samples_per_s=round(images / total, 2))


def measure_loader(model, config, workers: int, batch_subjects: int, images_per_subject: int,
                   batches: int, seed: int):
    source = synthetic.SyntheticSource(model, config, images_per_subject=images_per_subject,
                                       seed=seed, backbone_kind="dlib")
    start = time.perf_counter()
    loader = pipeline.make_loader(source, batch_subjects=batch_subjects,
                                  images_per_subject=images_per_subject, seed=seed,
                                  num_workers=workers)
    next(loader)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in tqdm(range(batches), desc=f"loader workers={workers}"):
        next(loader)
    steady = time.perf_counter() - start
    del loader
    return dict(kind="loader", workers=workers, batch=batch_subjects * images_per_subject,
                first_batch_s=round(first_s, 2),
                samples_per_s=round(batches * batch_subjects * images_per_subject / steady, 2))


def _busy(seconds: float) -> None:
    """Stand-in for a CPU training step: BLAS work for `seconds` (competes for the cores)."""
    matrix = np.random.default_rng(0).random((256, 256), np.float32)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        matrix = np.tanh(matrix @ matrix.T * 1e-3)


def measure_data_wait(model, config, step_seconds: float, workers: int, batch_subjects: int,
                      images_per_subject: int, batches: int, seed: int):
    """Fraction of a simulated training loop spent waiting in `next(loader)`."""
    source = synthetic.SyntheticSource(model, config, images_per_subject=images_per_subject,
                                       seed=seed, backbone_kind="dlib")
    loader = pipeline.make_loader(source, batch_subjects=batch_subjects,
                                  images_per_subject=images_per_subject, seed=seed,
                                  num_workers=workers)
    next(loader)  # start-up and compilation are not data wait
    wait = busy = 0.0
    for _ in tqdm(range(batches), desc=f"data wait, step {step_seconds} s"):
        t0 = time.perf_counter()
        next(loader)
        t1 = time.perf_counter()
        _busy(step_seconds)
        wait, busy = wait + t1 - t0, busy + time.perf_counter() - t1
    del loader
    return dict(kind="data_wait", workers=workers, batch=batch_subjects * images_per_subject,
                step_s=step_seconds, batches=batches,
                wait_s_per_step=round(wait / batches, 3),
                wait_fraction=round(wait / (wait + busy), 3))


def write_grid(model, config, path: str, seed: int, subjects: int = 4, images: int = 4,
               tile: int = 112):
    """Rows = subjects (first images of TRAIN_SUBJECTS), columns = their crops; the last column
    shows the last image's skin mask (dimmed outside) and landmarks."""
    host = synthetic.HostModel.from_model(model)
    rows = []
    for subject in range(subjects):
        example = synthetic.make_subject(model, config, subject, range(images), seed, host)
        tiles = []
        for k in range(images):
            image = example["crops"][k]
            if k == images - 1:
                mask = cv2.resize(example["skin_masks"][k], image.shape[:2][::-1],
                                  interpolation=cv2.INTER_LINEAR)
                image = image * (0.25 + 0.75 * mask[..., None])
            pixels = cv2.resize((image * 255).astype(np.uint8), (tile, tile),
                                interpolation=cv2.INTER_AREA)
            if k == images - 1:
                scale = tile / config.loss_size
                for u, v in example["landmarks"][k] * scale:
                    cv2.circle(pixels, (int(u * 4), int(v * 4)), 4, (40, 255, 40), -1,
                               cv2.LINE_AA, shift=2)
            tiles.append(pixels)
        rows.append(np.concatenate(tiles, 1))
    grid = np.concatenate(rows, 0)
    cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    return dict(kind="grid", path=path, bytes=os.path.getsize(path), shape=list(grid.shape))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=224, help="the box crop's size")
    parser.add_argument("--default", action="store_true",
                        help="the default config's crop and scenes instead (configs/default.py)")
    parser.add_argument("--images-per-subject", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--subjects", type=int, default=12, help="timed subjects per K")
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 2])
    parser.add_argument("--batch-subjects", type=int, default=4)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default=None, help="write a PNG grid of samples here")
    parser.add_argument("--step-seconds", type=float, nargs="*", default=[],
                        help="simulated CPU step times for the data-wait measurement")
    args = parser.parse_args()

    model = flame_jax.synthetic()
    config = synthetic.SyntheticConfig(crop=crop_lib.CropSpec(size=args.image_size))
    if args.default:
        import pathlib

        from recon.options import load_config_file
        from recon.training.regressor.options import read_options

        path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
        config = sources.synthetic_config(read_options(load_config_file(path)).data)
    host = synthetic.HostModel.from_model(model)
    print(json.dumps(dict(kind="machine", backend=jax.default_backend(),
                          devices=str(jax.devices()), cpus=os.cpu_count(),
                          load_average=os.getloadavg(), processor=platform.processor())))
    if args.grid:
        print(json.dumps(write_grid(model, config, args.grid, args.seed)))
    if args.subjects > 0:
        for k in args.images_per_subject:
            print(json.dumps(measure_stages(model, config, host, k, args.subjects, args.seed)),
                  flush=True)
        for workers in args.workers:
            print(json.dumps(measure_loader(model, config, workers, args.batch_subjects,
                                            args.images_per_subject[0], args.batches,
                                            args.seed)), flush=True)
    for step in args.step_seconds:
        print(json.dumps(measure_data_wait(model, config, step, args.workers[0],
                                           args.batch_subjects, args.images_per_subject[0],
                                           args.batches, args.seed)), flush=True)


if __name__ == "__main__":
    main()
