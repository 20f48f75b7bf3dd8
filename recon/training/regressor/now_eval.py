"""NoW validation during training: `NowEvaluator(options, model, flame, workdir)`.

    evaluator = NowEvaluator(options, model, flame, workdir)   # reads the split, plans crops
    summary.update(evaluator(step, state))     # {"now_median_mm", "now_mean_mm", "now_std_mm",
                                               #  "now_mean_face_median_mm", ...}
    evaluator.mark_best(history)               # "now_best": True on the lowest now_median_mm

At each evaluation the split named by `options.eval.now_root` / `now_split` is predicted with
the state's current parameters through `recon.inference.predictor_from_variables` (the crop the
run trains on, `options.data.crop`, cut as `recon.now.predict` does for eval.py) into
`workdir/now/step_<step>/` and scored with the non-metrical protocol in `now_workers` processes.
The mean face (the FLAME template) is scored once, into `workdir/now/mean_face/`, and its
figures are repeated in every entry as the zero-skill reference.

Only process 0 predicts, writes and scores (the parameters are replicated, so its copy is the
model); the other processes return {}. The crops' landmarks are detected (and cached) when the
evaluator is built, so a missing mediapipe stops a run before it trains.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

import jax
import numpy as np

from recon import inference
from recon.now import io as now_io
from recon.now import predict as predict_lib
from recon.now import scoring

NOW_DIR = "now"
MAX_DEFAULT_WORKERS = 8


def _host_copy(tree):
    """numpy copies of a (replicated) pytree of arrays; works when the arrays span processes."""
    def leaf(value):
        if isinstance(value, jax.Array):
            return np.asarray(value.addressable_data(0))
        return np.asarray(value)

    return jax.tree.map(leaf, tree)


class NowEvaluator:
    """The NoW score of the current parameters (see the module docstring).

    options: the run's `RunOptions` (reads `eval`, `data.crop`, `model.input_kind`).
    model: the pixel-input regressor module; flame: the run's FLAME model; workdir: the run's.
    """

    def __init__(self, options, model, flame, workdir, *, progress: bool = False):
        eval_options = options.eval
        if eval_options.now_split not in now_io.SPLIT_LISTS:
            raise ValueError(f"eval.now_split must be one of {sorted(now_io.SPLIT_LISTS)}, got "
                             f"{eval_options.now_split!r}")
        if eval_options.now_split == "test":
            raise ValueError("eval.now_split='test' cannot be scored during training: NoW's "
                             "test scans are held by its maintainers; use 'val'")
        self.root = pathlib.Path(eval_options.now_root)
        self.split = eval_options.now_split
        self.workers = eval_options.now_workers or min(scoring.default_workers(),
                                                       MAX_DEFAULT_WORKERS)
        self.crop = options.data.crop
        self.input_kind = options.model.input_kind
        self.model = model
        self.flame = flame
        self.out_dir = pathlib.Path(workdir) / NOW_DIR
        self.progress = progress
        self.primary = jax.process_index() == 0
        self.entries = now_io.read_image_list(now_io.image_list_path(self.root, self.split))
        self.sources = None
        if self.primary:
            self.sources = predict_lib.crop_sources(self.root, self.entries, self.crop, flame,
                                                    progress=progress)
        self._predictor: Optional[inference.Predictor] = None
        self._mean_face: Optional[dict] = None

    def _score(self, folder: pathlib.Path, label: str) -> dict:
        results = scoring.evaluate_predictions(
            self.root, folder, split=self.split, options=scoring.ScoreOptions(metrical=False),
            label=label, workers=self.workers, progress=self.progress)
        return scoring.summary(results.all_distances())

    def _predictor_for(self, step: int, variables: dict) -> inference.Predictor:
        if self._predictor is None:
            self._predictor = inference.predictor_from_variables(
                self.model, variables, crop=self.crop, input_kind=self.input_kind,
                flame=self.flame, step=step)
        else:  # same jitted apply: no recompilation from one evaluation to the next
            self._predictor = dataclasses.replace(self._predictor, variables=variables,
                                                  step=int(step))
        return self._predictor

    def __call__(self, step: int, state) -> dict:
        """{"now_median_mm", "now_mean_mm", "now_std_mm", "now_mean_face_*_mm"} of the state's
        parameters at `step` (process 0; {} elsewhere)."""
        if not self.primary:
            return {}
        variables = _host_copy({"params": state.params, "batch_stats": state.batch_stats})
        folder = self.out_dir / f"step_{int(step)}"
        predict_lib.predict_split(self.root, self.entries, self._predictor_for(step, variables),
                                  folder, sources=self.sources, progress=self.progress)
        scores = {f"now_{key}": value for key, value in self._score(folder, f"step {step}").items()}
        if self._mean_face is None:
            mean_face_folder = self.out_dir / "mean_face"
            predict_lib.write_mean_face(self.flame, self.entries, mean_face_folder)
            self._mean_face = {f"now_mean_face_{key}": value for key, value in
                               self._score(mean_face_folder, "mean face").items()}
        return {**scores, **self._mean_face}

    @staticmethod
    def mark_best(history: list) -> None:
        """Set "now_best" True on the entry with the lowest now_median_mm, False on the rest
        (in place; entries without a NoW score are never best)."""
        scored = [entry for entry in history if entry.get("now_median_mm") is not None]
        best = min(scored, key=lambda entry: entry["now_median_mm"]) if scored else None
        for entry in history:
            entry["now_best"] = entry is best
