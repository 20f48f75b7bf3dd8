"""The logic behind `eval.py` (flags -> `EvalRequest` -> `run`), testable without absl."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from typing import Callable, Optional

from recon.now import io as now_io
from recon.now import scoring

EXIT_MISSING = 2
EXIT_ERROR = 1


@dataclasses.dataclass(frozen=True)
class EvalRequest:
    """What one `eval.py` call asks for (see eval.py for the flag of each field)."""

    split: str = "val"
    now_root: Optional[str] = None
    checkpoint: Optional[str] = None
    predictions: tuple = ()
    labels: tuple = ()
    output: str = "outputs/now_eval"
    metrical: bool = False
    unit: str = "m"
    allow_missing: bool = False
    workers: Optional[int] = None
    synthetic_subjects: int = 20
    progress: bool = True


def _labels(labels: tuple, folders: list) -> list:
    if labels and len(labels) != len(folders):
        raise ValueError(f"got {len(labels)} --label for {len(folders)} prediction "
                         f"folders; give one label per folder or none")
    labels = list(labels) or [pathlib.Path(f).name or str(f) for f in folders]
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels}")
    return labels


def resolve_root(request: EvalRequest) -> pathlib.Path:
    if request.now_root:
        root = pathlib.Path(request.now_root)
        if not root.is_dir():
            raise now_io.NowFileError(f"{root}: --now-root does not exist")
        return root
    from recon.now import synthetic

    config = synthetic.SyntheticNowConfig(num_val_subjects=request.synthetic_subjects)
    return synthetic.ensure_synthetic_split(config, progress=request.progress)


MEAN_FACE_LABEL = "mean face"
MEAN_FACE_DIR = "predictions_mean_face"


def _predict(request: EvalRequest, root: pathlib.Path, output: pathlib.Path,
             predictor_factory: Optional[Callable], out) -> Optional[dict]:
    """Predict the split with a checkpoint (and, for scored splits, write the mean face).

    Returns {"folder", "label", "mean_face_folder" (or None), "crop_fallbacks",
    "crop_corrections"}, or None after printing why no predictor could be used.
    """
    from recon import inference
    from recon.image import detect
    from recon.now import predict as predict_lib

    checkpoint = request.checkpoint or "runs/default"
    factory = predictor_factory or inference.load_predictor
    try:
        predictor = factory(checkpoint)
    except (ValueError, OSError) as exc:  # PredictorLoadError, missing FLAME files, ...
        print(f"error: cannot load a predictor from {checkpoint}: {exc}", file=sys.stderr)
        return None
    entries = now_io.read_image_list(now_io.image_list_path(root, request.split))
    folder = output / "predictions"
    try:
        report = predict_lib.predict_split(root, entries, predictor, folder,
                                           progress=request.progress)
    except detect.PhotoExtraMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    out(f"wrote {len(report.written)} predictions to {folder} (crop: {predictor.crop})")
    if report.crop_fallbacks:
        out(f"{len(report.crop_fallbacks)} images without a detected face were cropped from "
            f"NoW's box through the FLAME template's landmarks: "
            + ", ".join(report.crop_fallbacks))
    if report.crop_corrections:
        out(f"{len(report.crop_corrections)} images whose detected landmarks strayed from NoW's "
            f"box were moved onto it: " + ", ".join(report.crop_corrections))
    mean_face_folder = None
    if request.split != "test":
        mean_face_folder = output / MEAN_FACE_DIR
        predict_lib.write_mean_face(predictor.flame, entries, mean_face_folder)
    label = pathlib.Path(checkpoint).name or str(checkpoint)
    return {"folder": folder, "label": label, "mean_face_folder": mean_face_folder,
            "crop_fallbacks": report.crop_fallbacks,
            "crop_corrections": report.crop_corrections}


def run(request: EvalRequest, *, predictor_factory: Optional[Callable] = None,
        out=print) -> int:
    """Predict (from a checkpoint) and/or score; returns the process exit status.

    predictor_factory(checkpoint) -> `recon.inference.Predictor`; default
    `recon.inference.load_predictor`. With a checkpoint, the mean face (the model's FLAME
    template) is scored on the same images: results.json "mean_face" and the table's
    "mean face" rows; images cropped without detected landmarks are listed in
    results.json "crop_fallbacks", those whose landmarks were moved onto NoW's box in
    "crop_corrections".
    """
    if request.unit not in ("mm", "cm", "m"):
        raise ValueError(f"--unit must be mm, cm or m, got {request.unit!r}")
    output = pathlib.Path(request.output)
    folders = [pathlib.Path(p) for p in request.predictions]
    predicted = None
    try:
        root = resolve_root(request)
        if not folders:
            predicted = _predict(request, root, output, predictor_factory, out)
            if predicted is None:
                return EXIT_ERROR
            folders = [predicted["folder"]]
    except now_io.NowFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if request.split == "test":
        for name in ("crop_fallbacks", "crop_corrections"):
            if predicted is not None and predicted[name]:
                now_io.write_file(output / f"{name}.json",
                                  json.dumps(predicted[name], indent=1) + "\n")
        out("--now-split test: predictions exported for submission, not scored (the test scans "
            "are held by the NoW maintainers)")
        return 0
    labels = _labels(request.labels or ((predicted["label"],) if predicted else ()), folders)
    options = scoring.ScoreOptions(metrical=request.metrical, unit=request.unit)
    methods, mean_face = [], None
    workers = scoring.default_workers() if request.workers is None else request.workers
    pool = scoring.make_pool(workers) if workers > 1 else None
    try:
        for folder, label in zip(folders, labels):
            methods.append(scoring.evaluate_predictions(
                root, folder, split=request.split, options=options, label=label,
                allow_missing=request.allow_missing, workers=workers,
                progress=request.progress, pool=pool))
        if predicted is not None:
            mean_face = scoring.evaluate_predictions(
                root, predicted["mean_face_folder"], split=request.split, options=options,
                label=MEAN_FACE_LABEL, workers=workers, progress=request.progress, pool=pool)
    except now_io.NowMissingError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_MISSING
    except now_io.NowFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if pool is not None:
            pool.shutdown()
    written = scoring.write_outputs(
        output, methods, mean_face=mean_face,
        crop_fallbacks=None if predicted is None else predicted["crop_fallbacks"],
        crop_corrections=None if predicted is None else predicted["crop_corrections"])
    out(scoring.format_table(methods + ([mean_face] if mean_face is not None else [])))
    for method in methods:
        if method.missing:
            out(f"{method.label}: {len(method.missing)} missing predictions (listed in "
                f"results.json): " + ", ".join(method.missing[:10])
                + (" ..." if len(method.missing) > 10 else ""))
    out("wrote " + ", ".join(str(p) for p in written))
    return 0
