"""Score prediction folders on a NoW-layout dataset: parallel per-image protocol, summaries, output.

    results = evaluate_predictions(root, "predictions/", split="val", metrical=False)
    write_outputs("out/", [results])     # out/results.json, out/cumulative_error.png

Images run in worker processes (forkserver or spawn: the parent may hold JAX, which must not be
forked); each worker keeps the last scans it read, and images are submitted subject by subject,
so a scan is parsed about once per worker.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import pathlib
import time
from typing import Optional, Sequence

import numpy as np

from recon.now import io as now_io
from recon.now import protocol

RESULTS_FILE = "results.json"
PLOT_FILE = "cumulative_error.png"


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """How predictions are scored."""

    metrical: bool = False
    unit: str = "m"  # unit of the predictions; used by the metrical protocol only
    refine: protocol.RefineOptions = protocol.RefineOptions()


@dataclasses.dataclass(frozen=True)
class MethodResults:
    """Distances of one predictions folder. `per_image[key]` is (N,) float32 mm."""

    label: str
    predictions: str
    per_image: dict
    challenges: dict  # key -> challenge
    missing: list
    options: ScoreOptions
    split: str
    cpu_seconds: float = 0.0  # summed per-image CPU time (load-independent cost)

    def all_distances(self, challenge: Optional[str] = None) -> np.ndarray:
        arrays = [d for key, d in self.per_image.items()
                  if challenge is None or self.challenges[key] == challenge]
        return np.concatenate(arrays) if arrays else np.zeros(0, np.float32)


# ----------------------------------------------------------------------------- one image

@functools.lru_cache(maxsize=3)
def _load_scan(scan_path: str, pp_path: str) -> tuple[np.ndarray, np.ndarray]:
    vertices, _ = now_io.read_mesh(scan_path)
    return vertices, now_io.read_pp(pp_path)


def score_image(scan_path: str, pp_path: str, mesh_path: str, landmarks_path: str,
                options: ScoreOptions) -> np.ndarray:
    """(N,) float32 mm distances of one image's prediction; errors name the files."""
    scan_vertices, scan_landmarks = _load_scan(str(scan_path), str(pp_path))
    vertices, faces = now_io.read_mesh(mesh_path)
    landmarks = now_io.read_prediction_landmarks(landmarks_path)
    try:
        score = protocol.score_prediction(scan_vertices, scan_landmarks, vertices, faces,
                                          landmarks, metrical=options.metrical, unit=options.unit,
                                          options=options.refine)
    except ValueError as exc:
        raise now_io.NowFileError(f"{mesh_path} with {landmarks_path} against scan {scan_path}: "
                                  f"{exc}") from exc
    return score.distances_mm.astype(np.float32)


def _score_task(args):
    """(key, distances, CPU seconds of this image in its process)."""
    key, paths, options = args
    start = time.process_time()
    distances = score_image(*paths, options)
    return key, distances, time.process_time() - start


# ----------------------------------------------------------------------------- a folder

def _pool_context():
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        # The fork server imports only the scorer (numpy, scipy, libigl), not the caller's
        # __main__ (which may import JAX); workers fork from it with those modules loaded.
        context.set_forkserver_preload(["recon.now.scoring"])
        return context
    return multiprocessing.get_context("spawn")


_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def make_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """Scoring processes (forkserver/spawn: safe when the parent holds JAX or threads).

    The fork server is started here with single-threaded BLAS (unless the user set the thread
    variables): the parallelism is over images, and BLAS threads in every worker would only
    oversubscribe the cores.
    """
    context = _pool_context()
    if context.get_start_method() == "forkserver":
        import multiprocessing.forkserver

        saved = {name: os.environ.get(name) for name in _THREAD_VARIABLES}
        try:
            for name in _THREAD_VARIABLES:
                os.environ.setdefault(name, "1")
            multiprocessing.forkserver.ensure_running()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context)


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1), 16))


def evaluate_predictions(root: os.PathLike, predictions: os.PathLike, *, split: str = "val",
                         options: ScoreOptions = ScoreOptions(), label: Optional[str] = None,
                         allow_missing: bool = False, workers: Optional[int] = None,
                         image_list: Optional[os.PathLike] = None,
                         progress: bool = True,
                         pool: Optional[concurrent.futures.Executor] = None) -> MethodResults:
    """Run the NoW protocol on every image of the split's list.

    Raises `NowMissingError` listing every missing prediction (all at once) unless
    `allow_missing`, in which case the rest are scored and the missing ones recorded.
    `workers=1` scores in this process; `pool` (e.g. from `make_pool`) is reused instead of
    starting processes for this call.
    """
    root, predictions = pathlib.Path(root), pathlib.Path(predictions)
    if not predictions.is_dir():
        raise now_io.NowFileError(f"{predictions}: predictions folder does not exist")
    entries = now_io.read_image_list(image_list or now_io.image_list_path(root, split))
    missing = now_io.missing_predictions(predictions, entries)
    if missing and not allow_missing:
        listing = "\n  ".join(f"{key}: {why}" for key, why in missing.items())
        raise now_io.NowMissingError(
            f"{predictions}: {len(missing)} of {len(entries)} predictions are missing "
            f"(pass --allow-missing to score the rest):\n  {listing}", list(missing))
    scans = {subject: now_io.find_scan(root, subject)
             for subject in sorted({e.subject for e in entries if e.key not in missing})}
    tasks = []
    for entry in sorted((e for e in entries if e.key not in missing), key=lambda e: e.key):
        mesh_path, landmarks_path = now_io.prediction_paths(predictions, entry)
        scan_path, pp_path = scans[entry.subject]
        tasks.append((entry.key, (str(scan_path), str(pp_path), str(mesh_path),
                                  str(landmarks_path)), options))
    per_image, cpu_seconds = {}, 0.0
    workers = default_workers() if workers is None else workers
    bar = _progress(len(tasks), label or predictions.name, progress)
    try:
        if pool is None and (workers <= 1 or len(tasks) <= 1):
            for task in tasks:
                key, distances, seconds = _score_task(task)
                per_image[key] = distances
                cpu_seconds += seconds
                bar.update(1)
        else:
            own_pool = pool is None
            pool = pool or make_pool(min(workers, len(tasks)))
            try:
                # map submits in the subject-sorted order, so workers meet each scan in runs
                # (their scan cache hits); chunks of 1 keep the bar honest.
                for key, distances, seconds in pool.map(_score_task, tasks, chunksize=1):
                    per_image[key] = distances
                    cpu_seconds += seconds
                    bar.update(1)
            finally:
                if own_pool:
                    pool.shutdown()
    finally:
        bar.close()
    challenges = {e.key: e.challenge for e in entries}
    return MethodResults(label=label or predictions.name, predictions=str(predictions),
                         per_image=per_image, challenges=challenges, missing=sorted(missing),
                         options=options, split=split, cpu_seconds=cpu_seconds)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=f"NoW {desc}", unit="image", disable=not enabled,
                dynamic_ncols=True)


# ----------------------------------------------------------------------------- summaries

def summary(distances_mm: np.ndarray) -> dict:
    """{median_mm, mean_mm, std_mm} of concatenated distances (None when empty)."""
    if len(distances_mm) == 0:
        return {"median_mm": None, "mean_mm": None, "std_mm": None}
    d = np.asarray(distances_mm, np.float64)
    return {"median_mm": float(np.median(d)), "mean_mm": float(np.mean(d)),
            "std_mm": float(np.std(d))}


def protocol_description(results: MethodResults) -> dict:
    options = results.options
    return {
        "name": "NoW (Sanyal et al. 2019), reimplemented in recon.now",
        "split": results.split,
        "label": results.label,
        "predictions": results.predictions,
        "n_images_scored": len(results.per_image),
        "n_points": int(sum(len(d) for d in results.per_image.values())),
        "unit": options.unit,
        "unit_to_mm": protocol.unit_factor(options.unit) if options.metrical else None,
        "crop": "scan vertices within 1.4 (|p0-p3| + |bridge-p4|)/2 of p4 + 0.3 (bridge-p4)",
        "initial_alignment": ("similarity Procrustes of the 7 landmarks (reflection 'best')"
                              + ("; scale replaced by the unit factor, translation re-fitted"
                                 " for it" if options.metrical else "")),
        "refinement": ("least squares of squared scan-to-mesh distances over "
                       + ("(r, t), scale fixed" if options.metrical else
                          "(s, r, t) with penalty 100 (|s| - s)")
                       + "; Levenberg-Marquardt (normal equations), exact distance Jacobian, coarse-to-fine"),
        "refine_options": dataclasses.asdict(options.refine),
        "distance": "exact unsigned point-to-triangle (libigl AABB), cropped scan vertices",
        "statistics": "median / mean / std over the concatenated distances of all images",
    }


def challenge_summaries(results: MethodResults) -> dict:
    """{challenge: {median_mm, mean_mm, std_mm}} for every NoW challenge."""
    return {c: summary(results.all_distances(c)) for c in now_io.CHALLENGES}


def results_dict(results: MethodResults, *, mean_face: Optional[MethodResults] = None,
                 crop_fallbacks: Optional[Sequence[str]] = None,
                 crop_corrections: Optional[Sequence[str]] = None) -> dict:
    """The fixed results.json structure.

    mean_face: the FLAME template scored on the same images (eval.py with a checkpoint):
    adds "mean_face": {median_mm, mean_mm, std_mm, per_challenge}. crop_fallbacks: the images
    cropped from NoW's box without detected landmarks (`recon.now.predict`): adds
    "crop_fallbacks" (sorted keys). crop_corrections: the images whose detected landmarks were
    moved onto NoW's box: adds "crop_corrections" (sorted keys).
    """
    out = {
        "all": summary(results.all_distances()),
        "per_challenge": challenge_summaries(results),
        "per_image": {key: {"median_mm": float(np.median(d)), "mean_mm": float(np.mean(d)),
                            "n_points": int(len(d))}
                      for key, d in sorted(results.per_image.items())},
        "missing": list(results.missing),
        "metrical": bool(results.options.metrical),
        "protocol": protocol_description(results),
    }
    if mean_face is not None:
        out["mean_face"] = {**summary(mean_face.all_distances()),
                            "per_challenge": challenge_summaries(mean_face)}
    if crop_fallbacks is not None:
        out["crop_fallbacks"] = sorted(crop_fallbacks)
    if crop_corrections is not None:
        out["crop_corrections"] = sorted(crop_corrections)
    return out


def format_table(methods: Sequence[MethodResults]) -> str:
    """Markdown table: one row per method and challenge, median / mean / std mm."""
    rows = ["| method | set | images | median mm | mean mm | std mm |",
            "|---|---|---:|---:|---:|---:|"]
    for method in methods:
        for name in ("all",) + now_io.CHALLENGES:
            challenge = None if name == "all" else name
            stats = summary(method.all_distances(challenge))
            count = sum(1 for k in method.per_image
                        if challenge is None or method.challenges[k] == challenge)
            cells = ["-" if stats[k] is None else f"{stats[k]:.3f}"
                     for k in ("median_mm", "mean_mm", "std_mm")]
            rows.append(f"| {method.label} | {name} | {count} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_outputs(output_dir: os.PathLike, methods: Sequence[MethodResults], *,
                  mean_face: Optional[MethodResults] = None,
                  crop_fallbacks: Optional[Sequence[str]] = None,
                  crop_corrections: Optional[Sequence[str]] = None) -> list[pathlib.Path]:
    """DIR/results.json (first method, with `mean_face` / `crop_*` lists when given, see
    `results_dict`), DIR/<label>/results.json for each method when there are several, and
    DIR/cumulative_error.png with every method (and the mean face). Returns the written paths."""
    from recon.now import plotting

    output_dir = pathlib.Path(output_dir)
    written = []
    targets = [(output_dir / RESULTS_FILE, methods[0], True)]
    if len(methods) > 1:
        targets += [(output_dir / m.label / RESULTS_FILE, m, False) for m in methods]
    for path, method, first in targets:
        extras = dict(mean_face=mean_face, crop_fallbacks=crop_fallbacks,
                      crop_corrections=crop_corrections) if first else {}
        now_io.write_file(path, json.dumps(results_dict(method, **extras), indent=1) + "\n")
        written.append(path)
    plot_path = output_dir / PLOT_FILE
    curves = {m.label: m.all_distances() for m in methods}
    if mean_face is not None:
        curves[mean_face.label] = mean_face.all_distances()
    plotting.cumulative_error_plot(
        plot_path, curves,
        title=f"NoW {methods[0].split} ({'metrical' if methods[0].options.metrical else 'non-metrical'})")
    written.append(plot_path)
    return written
