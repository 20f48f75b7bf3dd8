"""Cumulative error curves (fraction of scan points within an error), matplotlib Agg."""

from __future__ import annotations

import os
from typing import Mapping

import numpy as np


def cumulative_curve(distances_mm: np.ndarray, max_error_mm: float, num: int = 400):
    """(errors (num,), fraction of points with distance <= error (num,))."""
    errors = np.linspace(0.0, max_error_mm, num)
    sorted_d = np.sort(np.asarray(distances_mm, np.float64))
    fraction = np.searchsorted(sorted_d, errors, side="right") / max(len(sorted_d), 1)
    return errors, fraction


def cumulative_error_plot(path: os.PathLike, distances_by_label: Mapping[str, np.ndarray], *,
                          title: str = "NoW", max_error_mm: float = 10.0) -> None:
    """One curve per method; the legend gives the median / mean of each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recon.now.io import write_file

    figure, axis = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for label, distances in distances_by_label.items():
        if len(distances) == 0:
            continue
        errors, fraction = cumulative_curve(distances, max_error_mm)
        axis.plot(errors, 100.0 * fraction, linewidth=1.8,
                  label=f"{label} (median {np.median(distances):.2f}, "
                        f"mean {np.mean(distances):.2f} mm)")
    axis.set_xlabel("error (mm)")
    axis.set_ylabel("scan points within the error (%)")
    axis.set_xlim(0, max_error_mm)
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    axis.set_title(title)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    try:
        write_file(path, lambda handle: figure.savefig(handle, format="png"))
    finally:
        plt.close(figure)
