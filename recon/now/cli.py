"""The logic behind `eval.py` (flags -> `EvalRequest` -> `run`), testable without absl."""

from __future__ import annotations

import dataclasses
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


def _labels(request: EvalRequest, folders: list) -> list:
    if request.labels and len(request.labels) != len(folders):
        raise ValueError(f"got {len(request.labels)} --label for {len(folders)} prediction "
                         f"folders; give one label per folder or none")
    labels = list(request.labels) or [pathlib.Path(f).name or str(f) for f in folders]
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


def run(request: EvalRequest, *, predictor_factory: Optional[Callable] = None,
        faces=None, out=print) -> int:
    """Predict (from a checkpoint) and/or score; returns the process exit status.

    predictor_factory(checkpoint) -> predict callable; default
    `recon.trainer.load_predictor`. faces: (F, 3) triangles of the predicted meshes (default
    the FLAME topology of `flame_jax.synthetic()`).
    """
    if request.unit not in ("mm", "cm", "m"):
        raise ValueError(f"--unit must be mm, cm or m, got {request.unit!r}")
    root = resolve_root(request)
    output = pathlib.Path(request.output)
    folders = [pathlib.Path(p) for p in request.predictions]
    if not folders:
        from recon.now import predict as predict_lib

        checkpoint = request.checkpoint or "runs/default"
        factory = predictor_factory or predict_lib.load_checkpoint_predictor
        try:
            predict = factory(checkpoint)
        except (RuntimeError, FileNotFoundError) as exc:
            print(f"error: cannot load a predictor from {checkpoint}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        faces = getattr(predict, "faces", None) if faces is None else faces
        if faces is None:
            import flame_jax
            import numpy as np

            faces = np.asarray(flame_jax.synthetic().faces)
        entries = now_io.read_image_list(now_io.image_list_path(root, request.split))
        folder = output / "predictions"
        predict_lib.predict_split(root, entries, predict, faces, folder,
                                  progress=request.progress)
        out(f"wrote {len(entries)} predictions to {folder}")
        folders = [folder]
    if request.split == "test":
        out("--now-split test: predictions exported for submission, not scored (the test scans "
            "are held by the NoW maintainers)")
        return 0
    labels = _labels(request, folders)
    options = scoring.ScoreOptions(metrical=request.metrical, unit=request.unit)
    methods = []
    workers = scoring.default_workers() if request.workers is None else request.workers
    pool = scoring.make_pool(workers) if workers > 1 else None
    try:
        for folder, label in zip(folders, labels):
            methods.append(scoring.evaluate_predictions(
                root, folder, split=request.split, options=options, label=label,
                allow_missing=request.allow_missing, workers=workers,
                progress=request.progress, pool=pool))
    except now_io.NowMissingError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_MISSING
    except now_io.NowFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if pool is not None:
            pool.shutdown()
    written = scoring.write_outputs(output, methods)
    out(scoring.format_table(methods))
    for method in methods:
        if method.missing:
            out(f"{method.label}: {len(method.missing)} missing predictions (listed in "
                f"results.json): " + ", ".join(method.missing[:10])
                + (" ..." if len(method.missing) > 10 else ""))
    out("wrote " + ", ".join(str(p) for p in written))
    return 0
