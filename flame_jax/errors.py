"""The error types of `flame_jax` file reading.

Every problem with a file (missing, corrupt, wrong kind, bad keys/shapes/values, forbidden pickle
global) raises `FlameFileError`, a `ValueError` whose message names the file and the problem. A
path that does not exist raises `FlameFileNotFoundError`, a subclass of both `FlameFileError` and
`FileNotFoundError`, so either `except` clause catches it.
"""


class FlameFileError(ValueError):
    """A FLAME-related file is missing, corrupt, of the wrong kind or holds bad arrays.

    The message names the file and the problem (missing key, wrong shape, non-finite values,
    truncated or corrupt content, forbidden pickle global)."""


class FlameFileNotFoundError(FlameFileError, FileNotFoundError):
    """The path does not exist (catchable as `FlameFileError` or `FileNotFoundError`)."""


__all__ = ["FlameFileError", "FlameFileNotFoundError"]
