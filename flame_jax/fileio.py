"""File helpers shared by every package: atomic writes, mesh files, and safe opening.

    atomic_write(path, data)          bytes, str or a writer callable; all or nothing
    read_mesh(path) -> (V, F)         any mesh format trimesh reads (obj, ply, stl, off, glb)
    write_mesh(path, vertices, faces) obj / ply / glb / stl / off by suffix, atomically
    open_binary(path), sniff(path), read_npz(path)

Meshes go through `trimesh` with `process=False, maintain_order=True`, so vertex order and
count are exactly the file's (FLAME vertex ids stay valid). The one place where we keep our own
parser is the texture OBJ's `vt` / `f v/vt` indices (`flame_jax.texture`): trimesh merges the
UVs into per-vertex attributes and splits seam vertices, losing the per-corner `ft` indices.

Errors: a missing path raises `FlameFileNotFoundError` (also a `FileNotFoundError`), anything
unreadable `FlameFileError` (a `ValueError`); both name the path.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
import zipfile
from typing import BinaryIO, Callable, Tuple, Union

import numpy as np

from flame_jax.errors import FlameFileError, FlameFileNotFoundError

PathLike = Union[str, os.PathLike]
WriteData = Union[bytes, bytearray, memoryview, str, Callable[[BinaryIO], None]]

ZIP_MAGIC = b"PK\x03\x04"
NPY_MAGIC = b"\x93NUMPY"
_KNOWN_KINDS = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"),
                (b"GIF8", "a GIF image"), (b"%PDF", "a PDF document"),
                (b"ply", "a PLY mesh"), (b"\x1f\x8b", "a gzip archive"))
MESH_SUFFIXES = (".obj", ".ply", ".glb", ".stl", ".off")


# ---------------------------------------------------------------------------------- writing

def atomic_write(path: PathLike, data: WriteData) -> pathlib.Path:
    """Write `data` to `path` all at once: either the new content or the old file, never half.

    Args:
      path: destination; its folder must exist (a missing folder is an error, not created).
      data: bytes; a str (written as UTF-8); or a callable(binary file) that writes the content.
    The content goes to a temporary file in the same folder, is flushed and fsynced, then moved
    over `path` with `os.replace` (atomic on POSIX and Windows). If anything raises (including
    KeyboardInterrupt) the temporary file is removed and `path` is left untouched.
    Returns `path` as a `pathlib.Path`.
    """
    path = pathlib.Path(path)
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not callable(data) and not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"atomic_write({path}): data must be bytes, str or a callable, got "
                        f"{type(data).__name__}")
    if not path.parent.is_dir():
        raise FlameFileNotFoundError(f"{path}: folder {path.parent} does not exist")
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.",
                                         suffix=".tmp", delete=False)
    try:
        with handle:
            if callable(data):
                data(handle)
            else:
                handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(handle.name)
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: pathlib.Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened on Windows."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


# ---------------------------------------------------------------------------------- reading

def open_binary(path: PathLike) -> BinaryIO:
    """`open(path, "rb")` with our errors: missing path or a folder name the path."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FlameFileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        raise FlameFileError(f"{path}: is a directory, expected a file")
    return open(path, "rb")


def sniff(path: PathLike, size: int = 8) -> bytes:
    """The first `size` bytes of the file (to tell formats apart by content, not suffix)."""
    with open_binary(path) as handle:
        return handle.read(size)


def describe_content(head: bytes) -> str:
    """'; the file looks like a PNG image' for a few well-known magic numbers, else ''."""
    for magic, kind in _KNOWN_KINDS:
        if head.startswith(magic):
            return f"; the file looks like {kind}"
    return ""


def read_npz(path: PathLike) -> dict:
    """All arrays of an `.npz` as a dict (pickled arrays refused); FlameFileError if unreadable."""
    source = str(path)
    head = sniff(path)
    if not head.startswith(ZIP_MAGIC):
        raise FlameFileError(f"{source}: not an .npz (zip) archive{describe_content(head)}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        raise FlameFileError(f"{source}: truncated or corrupt .npz ({type(exc).__name__}: "
                             f"{exc})") from exc


# ---------------------------------------------------------------------------------- meshes

def read_mesh(path: PathLike) -> Tuple[np.ndarray, np.ndarray]:
    """A triangle mesh file -> (vertices (V, 3) float32, faces (F, 3) int32), in file order.

    Any format trimesh reads (obj, ply, stl, off, glb; a scene is merged into one mesh).
    Raises `FlameFileNotFoundError` for a missing path and `FlameFileError` naming the path for
    an unreadable file, a file without triangles or non-finite vertices.
    """
    import trimesh  # deferred: importing trimesh costs ~0.3 s and most callers never need it

    source = str(path)
    with open_binary(path):  # missing path / folder -> our errors, before trimesh's own
        pass
    suffix = pathlib.Path(path).suffix.lower().lstrip(".")
    try:
        mesh = trimesh.load(str(path), file_type=suffix or None, process=False,
                            maintain_order=True, force="mesh")
    except Exception as exc:  # trimesh raises many types (IndexError, ValueError, KeyError...)
        raise FlameFileError(f"{source}: cannot read mesh ({type(exc).__name__}: {exc})") from exc
    vertices = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), np.float64)
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))))
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise FlameFileError(f"{source}: not a triangle mesh (vertices {vertices.shape}, "
                             f"faces {faces.shape})")
    if len(faces) == 0:
        raise FlameFileError(f"{source}: mesh has no triangles")
    if not np.all(np.isfinite(vertices)):
        raise FlameFileError(f"{source}: mesh has NaN/inf vertex coordinates")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise FlameFileError(f"{source}: face indices outside [0, {len(vertices)})")
    return vertices.astype(np.float32), faces.astype(np.int32)


def write_mesh(path: PathLike, vertices, faces) -> pathlib.Path:
    """Write (V, 3) vertices (metres) and (F, 3) faces as obj / ply / glb / stl / off (by suffix),
    through `atomic_write`; vertex order is kept. Returns the path."""
    import trimesh

    path = pathlib.Path(path)
    file_type = path.suffix.lower()
    if file_type not in MESH_SUFFIXES:
        raise ValueError(f"write_mesh({path}): unknown mesh suffix {path.suffix!r}; use one of "
                         f"{MESH_SUFFIXES}")
    vertices, faces = np.asarray(vertices), np.asarray(faces)
    if vertices.ndim != 2 or vertices.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"write_mesh({path}): expected vertices (V, 3) and faces (F, 3), got "
                         f"{vertices.shape} and {faces.shape}")
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    data = mesh.export(file_type=file_type[1:])
    return atomic_write(path, data)  # obj/off/stl ascii export as str, ply/glb as bytes


__all__ = ["atomic_write", "read_mesh", "write_mesh", "open_binary", "sniff", "read_npz",
           "describe_content", "ZIP_MAGIC", "NPY_MAGIC", "MESH_SUFFIXES"]
