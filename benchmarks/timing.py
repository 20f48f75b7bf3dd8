"""The one timing helper of `benchmarks/`, and its one output convention.

Every benchmark script prints
  1. one JSON line describing the machine (`{"environment": {...}}`: jax version, device,
     CPU count, load average at the start, ...), then
  2. one JSON line per measurement, as soon as it is taken (so a killed run keeps its results),
  3. and at the end the same rows as a markdown table (for the README).

API (import it as `from timing import ...`: the scripts run as `python benchmarks/<name>.py`,
which puts this folder on `sys.path`):

    environment() -> dict
        jax version, backend, device kind, device count, CPU count, machine, load average.
    measure(function, *args, repeats=5, min_seconds=0.0, warmup=1) -> Timing
        Calls `function(*args)` `warmup` times (compilation), then at least `repeats` times and
        for at least `min_seconds`, blocking on the result each time (jax.block_until_ready).
    measure_interleaved({name: (function, args)}, repeats=5, warmup=1) -> {name: Timing}
        Round-robin over the variants, so that a change of machine load hits all alike; use it
        whenever variants are compared by a ratio.
    Timing: .times_s (list), .median_s, .min_s (best of), .count; .as_dict() for JSON.
    Report(title, columns=[(key, header, format)...]):
        .row(**values) prints the JSON line {"benchmark": title, **values} now and keeps the
        row; .markdown() -> str renders the kept rows with the declared columns;
        .print_markdown() prints it. A column's format is a format spec ("{:,.0f}") or a
        callable(value) -> str; a missing value renders as "-".

Example (what benchmarks/now_scorer.py or train_step.py would do):

    import timing
    report = timing.Report("train step", [("batch", "batch", "{}"),
                                          ("median_s", "ms / step", lambda s: f"{s * 1e3:.1f}")])
    timing.print_environment()
    for batch in (8, 32):
        result = timing.measure(step, state, batch_of(batch), repeats=10)
        report.row(batch=batch, **result.as_dict())
    report.print_markdown()

Report the best-of (`min_s`) next to the median when the machine is shared: the minimum is the
estimate least disturbed by other processes; the load average in the environment line tells the
reader how busy the machine was.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple, Union

import jax


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated calls (after warm-up)."""

    times_s: Tuple[float, ...]

    @property
    def count(self) -> int:
        return len(self.times_s)

    @property
    def median_s(self) -> float:
        return float(statistics.median(self.times_s))

    @property
    def min_s(self) -> float:
        return float(min(self.times_s))

    def as_dict(self) -> Dict[str, float]:
        return {"median_s": self.median_s, "min_s": self.min_s, "repeats": self.count}


def environment() -> Dict[str, Any]:
    """What a reader needs to judge a timing: software, hardware and how busy it was."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"jax": jax.__version__, "backend": jax.default_backend(),
            "device": jax.devices()[0].device_kind, "device_count": jax.device_count(),
            "cpu_count": os.cpu_count(), "machine": platform.machine(),
            "load_average_1_5_15_min": [round(x, 2) for x in load]}


def print_environment(**extra: Any) -> Dict[str, Any]:
    """Print the environment JSON line (plus `extra` settings of the run); returns it."""
    info = dict(environment(), **extra)
    print(json.dumps({"environment": info}), flush=True)
    return info


def _call(function: Callable, args: Sequence) -> float:
    start = time.perf_counter()
    jax.block_until_ready(function(*args))
    return time.perf_counter() - start


def measure(function: Callable, *args: Any, repeats: int = 5, min_seconds: float = 0.0,
            warmup: int = 1) -> Timing:
    """Time `function(*args)`: `warmup` untimed calls, then >= `repeats` calls lasting together
    >= `min_seconds`."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        jax.block_until_ready(function(*args))
    times: List[float] = []
    deadline = time.perf_counter() + min_seconds
    while len(times) < repeats or time.perf_counter() < deadline:
        times.append(_call(function, args))
    return Timing(tuple(times))


def measure_interleaved(variants: Mapping[str, Tuple[Callable, Sequence]], *, repeats: int = 5,
                        warmup: int = 1) -> Dict[str, Timing]:
    """Time several variants round-robin: {name: (function, args)} -> {name: Timing}."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for function, args in variants.values():
        for _ in range(warmup):
            jax.block_until_ready(function(*args))
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (function, args) in variants.items():
            times[name].append(_call(function, args))
    return {name: Timing(tuple(values)) for name, values in times.items()}


Format = Union[str, Callable[[Any], str]]


class Report:
    """Rows of one benchmark: a JSON line per row when added, a markdown table at the end."""

    def __init__(self, title: str, columns: Sequence[Tuple[str, str, Format]]):
        self.title = title
        self.columns = list(columns)
        self.rows: List[Dict[str, Any]] = []

    def row(self, **values: Any) -> Dict[str, Any]:
        record = {"benchmark": self.title, **values}
        print(json.dumps(record, default=_jsonable), flush=True)
        self.rows.append(values)
        return record

    def markdown(self) -> str:
        lines = [f"**{self.title}**", "",
                 "| " + " | ".join(header for _, header, _ in self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        for values in self.rows:
            cells = []
            for key, _, fmt in self.columns:
                value = values.get(key)
                if value is None:
                    cells.append("-")
                elif callable(fmt):
                    cells.append(fmt(value))
                else:
                    cells.append(fmt.format(value))
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def print_markdown(self) -> None:
        print("\n" + self.markdown(), flush=True)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy / jax scalars and arrays
        return value.tolist()
    return str(value)


__all__ = ["Timing", "Report", "environment", "print_environment", "measure",
           "measure_interleaved"]
