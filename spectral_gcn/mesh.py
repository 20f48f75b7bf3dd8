"""`MeshHierarchy`: the precomputed Laplacians and sampling operators of every level, as a pytree.

Build once with scipy/numpy (`build_hierarchy`), cache as `.npz`, then pass the hierarchy as an
argument to jitted code. Level 0 is the input mesh; level l + 1 has ceil(N_l / factor_l) vertices.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from flax import struct

from flame_jax.fileio import atomic_write
from flame_jax.shipped import load_topology
from spectral_gcn import laplacian as laplacian_lib
from spectral_gcn import sampling

Array = jax.Array

# Bump when the construction changes so stale cache files are never reused.
FORMAT_VERSION = 1
CACHE_ENV = "FACERECON_CACHE_DIR"


@struct.dataclass
class SparseMatrix:
    """(n, n) sparse matrix in COO form with row-sorted entries.

      rows:   (nnz,) int32
      cols:   (nnz,) int32
      values: (nnz,) float32
      size:   static n.
    """

    rows: Array
    cols: Array
    values: Array
    size: int = struct.field(pytree_node=False)

    def to_scipy(self) -> sp.csr_matrix:
        return sp.csr_matrix((np.asarray(self.values, np.float64),
                              (np.asarray(self.rows), np.asarray(self.cols))),
                             shape=(self.size, self.size))

    def to_dense(self) -> Array:
        """(n, n) dense float32 copy (for references and the dense benchmark)."""
        return jnp.zeros((self.size, self.size), jnp.float32).at[self.rows, self.cols].add(
            self.values)


@struct.dataclass
class MeshHierarchy:
    """Mesh levels 0..L (L = len(factors)); every array documented with its shape.

      laplacians:  L + 1 `SparseMatrix` (N_l, N_l), rescaled normalised Laplacian -D^-1/2 A D^-1/2.
      down:        L arrays (N_{l+1},) int32: level l+1 vertex i is level-l vertex down[l][i]
                   (D_l is the 0/1 selection of those rows).
      up_indices:  L arrays (N_l, 3) int32 into the level-(l+1) vertices.
      up_weights:  L arrays (N_l, 3) float32 barycentric weights (rows sum to one).
      vertices:    L + 1 arrays (N_l, 3) float32 template positions of each level (metres).
      faces:       L + 1 arrays (F_l, 3) int32 triangles of each level.
      key:         static hex digest of (format version, vertices, faces, factors).
    """

    laplacians: Tuple[SparseMatrix, ...]
    down: Tuple[Array, ...]
    up_indices: Tuple[Array, ...]
    up_weights: Tuple[Array, ...]
    vertices: Tuple[Array, ...]
    faces: Tuple[Array, ...]
    key: str = struct.field(pytree_node=False)

    @property
    def sizes(self) -> Tuple[int, ...]:
        """Vertex count of each level, (N_0, ..., N_L)."""
        return tuple(int(v.shape[0]) for v in self.vertices)

    @property
    def num_levels(self) -> int:
        """Number of down-sampling steps L."""
        return len(self.down)

    def down_matrix(self, level: int) -> sp.csr_matrix:
        """(N_{l+1}, N_l) scipy 0/1 selection matrix D_l."""
        idx = np.asarray(self.down[level])
        return sp.csr_matrix((np.ones(idx.size), (np.arange(idx.size), idx)),
                             shape=(idx.size, self.sizes[level]))

    def up_matrix(self, level: int) -> sp.csr_matrix:
        """(N_l, N_{l+1}) scipy barycentric up-sampling matrix U_l."""
        idx, weights = np.asarray(self.up_indices[level]), np.asarray(self.up_weights[level])
        rows = np.repeat(np.arange(idx.shape[0]), 3)
        return sp.csr_matrix((weights.ravel().astype(np.float64), (rows, idx.ravel())),
                             shape=(idx.shape[0], self.sizes[level + 1]))


def topology_key(vertices: np.ndarray, faces: np.ndarray, factors: Sequence[int]) -> str:
    """sha256 hex digest of the inputs that determine a hierarchy.

    The positions are part of the key because the quadric costs depend on them."""
    digest = hashlib.sha256()
    digest.update(f"spectral_gcn.MeshHierarchy v{FORMAT_VERSION}".encode())
    digest.update(np.ascontiguousarray(vertices, np.float32).tobytes())
    digest.update(np.ascontiguousarray(faces, np.int64).tobytes())
    digest.update(np.asarray(factors, np.int64).tobytes())
    return digest.hexdigest()


def default_cache_dir() -> pathlib.Path:
    """$FACERECON_CACHE_DIR, else ~/.cache/facerecon_jax."""
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "facerecon_jax"


def hierarchy_arrays(hierarchy: MeshHierarchy) -> dict:
    """Flat {name: numpy array} of every level (names like `down_0`), without the key."""
    arrays = {}
    for level, lap in enumerate(hierarchy.laplacians):
        arrays[f"laplacian_rows_{level}"] = np.asarray(lap.rows)
        arrays[f"laplacian_cols_{level}"] = np.asarray(lap.cols)
        arrays[f"laplacian_values_{level}"] = np.asarray(lap.values)
        arrays[f"vertices_{level}"] = np.asarray(hierarchy.vertices[level])
        arrays[f"faces_{level}"] = np.asarray(hierarchy.faces[level])
    for level in range(hierarchy.num_levels):
        arrays[f"down_{level}"] = np.asarray(hierarchy.down[level])
        arrays[f"up_indices_{level}"] = np.asarray(hierarchy.up_indices[level])
        arrays[f"up_weights_{level}"] = np.asarray(hierarchy.up_weights[level])
    return arrays


def save_hierarchy(hierarchy: MeshHierarchy, path) -> pathlib.Path:
    """Write `hierarchy` to the `.npz` file `path` atomically (`flame_jax.fileio.atomic_write`)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = hierarchy_arrays(hierarchy)
    return atomic_write(path, lambda stream: np.savez(
        stream, key=np.array(hierarchy.key), format_version=np.array(FORMAT_VERSION), **arrays))


def hierarchy_from_arrays(arrays, key: str, source: str = "<arrays>") -> MeshHierarchy:
    """Inverse of `hierarchy_arrays` (without its key/version entries); ValueError naming
    `source` and the missing array."""
    names = set(arrays.keys())
    num_levels = sum(name.startswith("down_") for name in names)

    def get(name):
        if name not in names:
            raise ValueError(f"{source}: mesh hierarchy lacks the array {name!r}")
        return jnp.asarray(arrays[name])

    levels, steps = range(num_levels + 1), range(num_levels)
    return MeshHierarchy(
        laplacians=tuple(SparseMatrix(rows=get(f"laplacian_rows_{l}"),
                                      cols=get(f"laplacian_cols_{l}"),
                                      values=get(f"laplacian_values_{l}"),
                                      size=int(get(f"vertices_{l}").shape[0])) for l in levels),
        down=tuple(get(f"down_{l}") for l in steps),
        up_indices=tuple(get(f"up_indices_{l}") for l in steps),
        up_weights=tuple(get(f"up_weights_{l}") for l in steps),
        vertices=tuple(get(f"vertices_{l}") for l in levels),
        faces=tuple(get(f"faces_{l}") for l in levels),
        key=str(key))


def load_hierarchy(path) -> MeshHierarchy:
    """Read a hierarchy written by `save_hierarchy`; ValueError naming the file on a bad file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mesh hierarchy file {path} does not exist")
    with np.load(path) as data:
        files = set(data.files)
        found = int(data["format_version"]) if "format_version" in files else None
        if found != FORMAT_VERSION:
            raise ValueError(f"{path}: mesh hierarchy format version {found}, expected "
                             f"{FORMAT_VERSION}")
        if "key" not in files:
            raise ValueError(f"{path}: mesh hierarchy file lacks its key")
        arrays = {name: data[name] for name in files if name not in ("key", "format_version")}
        return hierarchy_from_arrays(arrays, str(data["key"]), str(path))


def _sparse_from_scipy(matrix: sp.csr_matrix) -> SparseMatrix:
    coo = matrix.tocoo()
    order = np.lexsort((coo.col, coo.row))
    return SparseMatrix(rows=jnp.asarray(coo.row[order], jnp.int32),
                        cols=jnp.asarray(coo.col[order], jnp.int32),
                        values=jnp.asarray(coo.data[order], jnp.float32),
                        size=int(matrix.shape[0]))


def _compute(vertices: np.ndarray, faces: np.ndarray, factors: Sequence[int],
             key: str) -> MeshHierarchy:
    level_vertices = [vertices.astype(np.float64)]
    level_faces = [faces.astype(np.int64)]
    down, up_indices, up_weights = [], [], []
    targets = sampling.level_sizes(vertices.shape[0], factors)[1:]
    for target in targets:
        decimation = sampling.quadric_decimate(level_vertices[-1], level_faces[-1], target)
        coarse = level_vertices[-1][decimation.kept]
        indices, weights = sampling.upsampling(level_vertices[-1], coarse, decimation.faces)
        down.append(jnp.asarray(decimation.kept, jnp.int32))
        up_indices.append(jnp.asarray(indices, jnp.int32))
        up_weights.append(jnp.asarray(weights, jnp.float32))
        level_vertices.append(coarse)
        level_faces.append(decimation.faces)
    laplacians = tuple(
        _sparse_from_scipy(laplacian_lib.rescaled_laplacian(f, v.shape[0]))
        for v, f in zip(level_vertices, level_faces))
    return MeshHierarchy(
        laplacians=laplacians, down=tuple(down), up_indices=tuple(up_indices),
        up_weights=tuple(up_weights),
        vertices=tuple(jnp.asarray(v, jnp.float32) for v in level_vertices),
        faces=tuple(jnp.asarray(f, jnp.int32) for f in level_faces), key=key)


def build_hierarchy(vertices, faces, factors: Sequence[int] = (4, 4, 4, 4), *,
                    cache_dir: Optional[os.PathLike] = None,
                    use_cache: bool = True) -> MeshHierarchy:
    """Mesh hierarchy of a template mesh, read from / written to the `.npz` cache.

    vertices: (N, 3) template positions (metres); faces: (F, 3) int triangles; factors: one
    integer >= 1 per down-sampling step. On FLAME with (4, 4, 4, 4) the levels have
    5023, 1256, 314, 79 and 20 vertices. `cache_dir` defaults to `default_cache_dir()`; the file
    is `mesh_hierarchy_<key[:24]>.npz`. With use_cache=False nothing is read or written.
    Deterministic: the same inputs give the same arrays (and the same key).
    """
    vertices = np.asarray(vertices)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape (N, 3), got {vertices.shape}")
    faces = laplacian_lib.check_faces(faces, vertices.shape[0])
    factors = tuple(int(f) for f in factors)
    if not factors or any(f < 1 for f in factors):
        raise ValueError(f"factors must be a non-empty sequence of integers >= 1, got {factors}")
    key = topology_key(vertices, faces, factors)
    path = pathlib.Path(cache_dir or default_cache_dir()) / f"mesh_hierarchy_{key[:24]}.npz"
    if use_cache and path.is_file():
        hierarchy = load_hierarchy(path)
        if hierarchy.key != key:
            raise ValueError(f"{path}: cached hierarchy key {hierarchy.key} does not match {key}")
        return hierarchy
    hierarchy = _compute(np.asarray(vertices, np.float32), faces, factors, key)
    if use_cache:
        save_hierarchy(hierarchy, path)
    return hierarchy


def flame_topology() -> Tuple[np.ndarray, np.ndarray]:
    """(v_template (5023, 3) float32 metres, faces (9976, 3) int32) of the shipped FLAME asset."""
    topology = load_topology()
    return topology["v_template"], topology["faces"]


def flame_hierarchy(factors: Sequence[int] = (4, 4, 4, 4), *,
                    cache_dir: Optional[os.PathLike] = None,
                    use_cache: bool = True) -> MeshHierarchy:
    """`build_hierarchy` on the shipped FLAME template (`flame_topology()`)."""
    vertices, faces = flame_topology()
    return build_hierarchy(vertices, faces, factors, cache_dir=cache_dir, use_cache=use_cache)
