"""Validation of arrays read from files: every check names the file, the key and the problem.

    as_array(value, key, source, dtype=..., shape=(None, 3))  -> numpy array, or FlameFileError
    require_keys(mapping, keys, source)
    check_index_range(indices, upper, key, source, what)
    check_count(requested, available, name, source)            -> components to keep
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import scipy.sparse

from flame_jax.errors import FlameFileError
from flame_jax.safe_pickle import chumpy_to_numpy


def require_keys(data: Mapping, keys, source: str, what: str = "file") -> None:
    """FlameFileError naming the missing keys (and those present) unless `data` has all."""
    if not isinstance(data, Mapping):
        raise FlameFileError(f"{source}: expected a dict-like {what}, got {type(data).__name__}")
    missing = [k for k in keys if k not in data]
    if missing:
        raise FlameFileError(f"{source}: missing key(s) {missing}; keys present: "
                             f"{sorted(map(str, data))}")


def as_array(value: Any, key: str, source: str, *, dtype, shape: tuple) -> np.ndarray:
    """Numpy array of `dtype` with `shape` (None = any size); checks shape and finiteness."""
    value = chumpy_to_numpy(value, what=f"key {key!r}", source=source)
    if scipy.sparse.issparse(value):
        value = value.toarray()
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], np.ndarray):
        try:
            value = np.stack(value)
        except ValueError as exc:
            raise FlameFileError(f"{source}: key {key!r}: ragged list of arrays ({exc})") from exc
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise FlameFileError(f"{source}: key {key!r} is not an array ({exc})") from exc
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number)
                                     or array.dtype == bool):
        raise FlameFileError(f"{source}: key {key!r} has non-numeric dtype {array.dtype}")
    if len(array.shape) != len(shape) or any(
            want is not None and got != want for got, want in zip(array.shape, shape)):
        expected = "(" + ", ".join("n" if s is None else str(s) for s in shape) + ")"
        raise FlameFileError(f"{source}: key {key!r} has shape {array.shape}, expected "
                             f"{expected}")
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise FlameFileError(f"{source}: key {key!r} has {bad} NaN/inf value(s)")
    if np.issubdtype(np.dtype(dtype), np.integer) and np.issubdtype(array.dtype, np.floating):
        if not np.all(array == np.round(array)):
            raise FlameFileError(f"{source}: key {key!r} must hold integers")
    return array.astype(dtype)


def check_index_range(array: np.ndarray, upper: int, key: str, source: str, what: str) -> None:
    """FlameFileError unless every index lies in [0, upper); `what` names the indexed items."""
    if array.size and (array.min() < 0 or array.max() >= upper):
        raise FlameFileError(f"{source}: key {key!r} has {what} indices in "
                             f"[{array.min()}, {array.max()}], outside [0, {upper})")


def check_count(requested: Optional[int], available: int, name: str, source: str) -> int:
    """Number of components to keep: `requested` (None = all); TypeError for a non-int,
    FlameFileError when the file has fewer than requested."""
    if requested is None:
        return available
    if isinstance(requested, bool) or not isinstance(requested, (int, np.integer)):
        raise TypeError(f"{name} must be an int or None, got {requested!r}")
    if requested < 0 or requested > available:
        raise FlameFileError(f"{source}: {name}={requested} requested but the file has "
                             f"{available} component(s)")
    return int(requested)


__all__ = ["as_array", "require_keys", "check_index_range", "check_count"]
