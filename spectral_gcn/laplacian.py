"""Graph Laplacians of triangle meshes (scipy, host side, computed once per hierarchy level)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp


def check_faces(faces: np.ndarray, num_vertices: int) -> np.ndarray:
    """(F, 3) int64 copy of `faces`; ValueError naming the problem for a bad shape or index."""
    faces = np.asarray(faces)
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {faces.shape}")
    if not np.issubdtype(faces.dtype, np.integer):
        raise ValueError(f"faces must be integer vertex indices, got dtype {faces.dtype}")
    if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
        raise ValueError(f"faces index vertices in [{faces.min()}, {faces.max()}] but the mesh "
                         f"has {num_vertices} vertices")
    return faces.astype(np.int64)


def adjacency(faces: np.ndarray, num_vertices: int) -> sp.csr_matrix:
    """(N, N) symmetric 0/1 vertex adjacency of the edges of `faces` (no self loops)."""
    faces = check_faces(faces, num_vertices)
    rows = np.concatenate([faces[:, 0], faces[:, 1], faces[:, 2]])
    cols = np.concatenate([faces[:, 1], faces[:, 2], faces[:, 0]])
    keep = rows != cols
    rows, cols = rows[keep], cols[keep]
    matrix = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(num_vertices,) * 2).tocsr()
    matrix = matrix + matrix.T
    matrix.data[:] = 1.0
    matrix.eliminate_zeros()
    matrix.sort_indices()
    return matrix


def rescaled_laplacian(faces: np.ndarray, num_vertices: int) -> sp.csr_matrix:
    """(N, N) float64 rescaled normalised Laplacian L~ = 2 L / lmax - I with lmax = 2.

    L = I - D^-1/2 A D^-1/2, so L~ = -D^-1/2 A D^-1/2: zero diagonal, spectrum in [-1, 1].
    A vertex in no edge gets an all-zero row (its Chebyshev terms beyond T0 vanish).
    """
    adj = adjacency(faces, num_vertices)
    degree = np.asarray(adj.sum(axis=1)).ravel()
    inv_sqrt = np.zeros_like(degree)
    np.divide(1.0, np.sqrt(degree), out=inv_sqrt, where=degree > 0)
    scale = sp.diags(inv_sqrt)
    lap = -(scale @ adj @ scale)
    lap = sp.csr_matrix(lap)
    lap.sort_indices()
    return lap
