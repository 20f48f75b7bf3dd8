"""Training meshes for the CoMA autoencoder: sampled from a FLAME model, or read from a folder.

Mesh files are read by `flame_jax.fileio.read_mesh` (trimesh, vertex order kept), so every
format trimesh reads works (obj, ply, stl, off, glb).

Synthetic meshes (the default) are FLAME heads in canonical pose, as MICA's neutral meshes:
identity N(0, shape_std^2) on every shape component (the model's components are scaled so that
a unit coefficient is one standard deviation, and their spectrum decays), expression
N(0, expression_std^2) on every expression component, jaw opening (rotation about x)
uniform in [0, jaw_open_max] rad, zero global, neck and eye pose, zero translation.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Optional, Sequence, Tuple

import jax
import numpy as np

import flame_jax
from flame_jax.fileio import MESH_SUFFIXES, read_mesh


@dataclasses.dataclass(frozen=True)
class SyntheticMeshConfig:
    """Distribution of the synthetic training meshes (see the module docstring)."""

    shape_std: float = 1.0
    expression_std: float = 1.0
    jaw_open_max: float = 0.25


def _sample_params(model: flame_jax.FlameModel, key: jax.Array, batch_size: int,
                   config: SyntheticMeshConfig) -> flame_jax.FlameParams:
    shape_key, expression_key, jaw_key = jax.random.split(key, 3)
    params = flame_jax.FlameParams.zeros(batch_size, model)
    jaw_open = jax.random.uniform(jaw_key, (batch_size,), minval=0.0, maxval=config.jaw_open_max)
    return params.replace(
        shape=config.shape_std * jax.random.normal(shape_key, params.shape.shape),
        expression=config.expression_std * jax.random.normal(expression_key,
                                                             params.expression.shape),
        jaw_pose=params.jaw_pose.at[:, 0].set(jaw_open))


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _sample_vertices(model: flame_jax.FlameModel, key: jax.Array, shape_std, expression_std,
                     jaw_open_max, *, batch_size: int = 64):
    config = SyntheticMeshConfig(shape_std, expression_std, jaw_open_max)
    return flame_jax.forward(model, _sample_params(model, key, batch_size, config)).vertices


def synthetic_meshes(model: flame_jax.FlameModel, num_meshes: int, seed: int,
                     config: SyntheticMeshConfig = SyntheticMeshConfig(),
                     chunk: int = 64) -> np.ndarray:
    """(num_meshes, V, 3) float32 vertices in metres, deterministic in `seed`.

    Generated in chunks of `chunk` meshes (chunk i uses fold_in(key(seed), i)), so the first k
    meshes do not depend on num_meshes.
    """
    if num_meshes < 1:
        raise ValueError(f"num_meshes must be >= 1, got {num_meshes}")
    key = jax.random.key(seed)
    chunks = []
    for index in range(-(-num_meshes // chunk)):
        chunks.append(np.asarray(_sample_vertices(
            model, jax.random.fold_in(key, index), config.shape_std, config.expression_std,
            config.jaw_open_max, batch_size=chunk)))
    return np.concatenate(chunks)[:num_meshes].astype(np.float32)


def load_mesh_folder(folder, num_vertices: int, faces: Optional[np.ndarray] = None,
                     scale: float = 1.0) -> Tuple[np.ndarray, Sequence[pathlib.Path]]:
    """All mesh files (MESH_SUFFIXES) under `folder` (recursively, sorted by path).

    Returns (vertices (M, num_vertices, 3) float32 times `scale` (e.g. 0.001 for millimetre
    files, to get metres), paths). Every file must have `num_vertices` vertices, and the same
    triangles as `faces` when it is given; a file that does not is named in the ValueError
    (an unreadable file raises `flame_jax.FlameFileError`, also a ValueError, naming it).
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"mesh folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in MESH_SUFFIXES)
    if not paths:
        raise ValueError(f"mesh folder {folder} holds no {'/'.join(MESH_SUFFIXES)} files")
    meshes = []
    for path in paths:
        vertices, mesh_faces = read_mesh(path)
        if vertices.shape != (num_vertices, 3):
            raise ValueError(f"{path}: {vertices.shape[0]} vertices, expected {num_vertices} "
                             f"(FLAME topology)")
        if faces is not None and (mesh_faces.shape != faces.shape
                                  or not np.array_equal(mesh_faces, faces)):
            raise ValueError(f"{path}: its triangles differ from the FLAME topology")
        meshes.append(vertices * np.float32(scale))
    return np.stack(meshes), paths


def normalization_statistics(meshes: np.ndarray, min_std: float = 1e-4):
    """(mean (V, 3), std (V, 3)) float32 over the training meshes (M, V, 3), metres.

    std is floored at `min_std` (0.1 mm by default) so that a vertex that barely moves in the
    training set is not amplified without bound by the normalisation.
    """
    meshes = np.asarray(meshes, np.float64)
    mean = meshes.mean(axis=0)
    std = np.maximum(meshes.std(axis=0), min_std)
    return mean.astype(np.float32), std.astype(np.float32)
