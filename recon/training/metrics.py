"""Training metrics: one JSON line per logged step in `workdir/metrics.jsonl`, and a tqdm bar.

Each line is `{"step": s, <every metric>, "steps_per_s": r, "time_s": t}`; `steps_per_s` is
measured since the previous line (the first one includes compilation), `time_s` since the
writer opened. On resume (`initial_step > 0`) the lines of steps after `initial_step` (written
by the interrupted run after its last checkpoint) and a torn last line are dropped, so the file
of a resumed run lists each step once, like an uninterrupted one. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from typing import Any, Mapping, Optional, Sequence

import jax
import numpy as np
import tqdm

from flame_jax.fileio import atomic_write

METRICS_FILE = "metrics.jsonl"


def to_json_value(value: Any) -> Any:
    """Host JSON value of a metric: scalars (numpy/jax) -> float/int, dicts and lists recursed."""
    if isinstance(value, Mapping):
        return {str(key): to_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json_value(item) for item in value]
    if isinstance(value, (str, bool)) or value is None:
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    array = np.asarray(jax.device_get(value))
    if array.size == 1:
        scalar = array.reshape(()).item()
        return scalar if isinstance(scalar, (bool, int)) else float(scalar)
    return array.tolist()


def read_metrics(path) -> list:
    """The records of a metrics file, skipping a torn (unparseable) line."""
    records = []
    path = pathlib.Path(path)
    if not path.is_file():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # the last line of a killed run may be cut short
    return records


class MetricsWriter:
    """Append metrics to `workdir/metrics.jsonl` and drive a progress bar (steps/s, ETA).

    Args:
      workdir: output folder (created if missing).
      total_steps: the run's last step (the bar's total, for the ETA).
      initial_step: the step training starts after (0, or the restored checkpoint's step).
      desc: the bar's label.
      postfix: metric names shown on the bar when present.
      enabled: default: True on process 0 only.
    """

    def __init__(self, workdir, *, total_steps: int, initial_step: int = 0, desc: str = "train",
                 postfix: Sequence[str] = ("loss",), enabled: Optional[bool] = None,
                 filename: str = METRICS_FILE):
        self.path = pathlib.Path(workdir) / filename
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._postfix = tuple(postfix)
        self._last_step = int(initial_step)
        self._opened = self._last_time = time.perf_counter()
        self._bar = None
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [record for record in read_metrics(self.path)
                if isinstance(record.get("step"), int) and record["step"] <= initial_step]
        if initial_step == 0:
            kept = []
        atomic_write(self.path, "".join(json.dumps(record) + "\n" for record in kept))
        self._stream = open(self.path, "a", encoding="utf-8")
        self._bar = tqdm.tqdm(total=int(total_steps), initial=int(initial_step), desc=desc,
                              unit="step", dynamic_ncols=True, smoothing=0.1)

    def write(self, step: int, metrics: Mapping[str, Any]) -> dict:
        """Append one line for `step` (device values fetched here) and update the bar.

        Returns the record written (host values), so callers can reuse it.
        """
        now = time.perf_counter()
        step = int(step)
        record = {"step": step, **to_json_value(dict(metrics))}
        if step > self._last_step and now > self._last_time:
            record["steps_per_s"] = (step - self._last_step) / (now - self._last_time)
            self._last_step, self._last_time = step, now
        record["time_s"] = round(now - self._opened, 3)
        if not self.enabled:
            return record
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()
        if step > self._bar.n:
            self._bar.update(step - self._bar.n)
        shown = {name: f"{record[name]:.4g}" for name in self._postfix
                 if isinstance(record.get(name), float) and math.isfinite(record[name])}
        if shown:
            self._bar.set_postfix(shown, refresh=False)
        return record

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._stream.close()
            self._bar = None

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
