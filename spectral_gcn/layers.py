"""Chebyshev graph convolution and mesh sampling as pure functions over a `MeshHierarchy`.

Public shapes are batch-major (B, N, F). The Chebyshev recursion runs vertex-major, (N, B, F),
so that a sparse product gathers whole rows of B * F contiguous numbers per neighbour.
"""

from __future__ import annotations

from typing import Literal

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse

from spectral_gcn.mesh import SparseMatrix

Array = jax.Array
SparseMethod = Literal["segment_sum", "bcoo"]

# `benchmarks/spectral_encoder.py` times both formulations; segment_sum was the faster (or equal)
# one on the 2-core CPU, see README.md (spectral_gcn, encoder speed).
DEFAULT_SPARSE_METHOD: SparseMethod = "segment_sum"


def sparse_matmul(matrix: SparseMatrix, features: Array,
                  method: SparseMethod = DEFAULT_SPARSE_METHOD) -> Array:
    """matrix (n, n) @ features (n, ...) -> (n, ...).

    "segment_sum": gather the column rows, scale, and sum them per (sorted) row.
    "bcoo": jax.experimental.sparse BCOO matmul over the same COO entries.
    """
    if features.shape[0] != matrix.size:
        raise ValueError(f"sparse matmul: matrix is ({matrix.size}, {matrix.size}) but features "
                         f"have {features.shape[0]} rows")
    flat = features.reshape(features.shape[0], -1)
    if method == "segment_sum":
        gathered = flat[matrix.cols] * matrix.values[:, None].astype(flat.dtype)
        out = jax.ops.segment_sum(gathered, matrix.rows, num_segments=matrix.size,
                                  indices_are_sorted=True)
    elif method == "bcoo":
        bcoo = jsparse.BCOO((matrix.values.astype(flat.dtype),
                             jnp.stack([matrix.rows, matrix.cols], axis=1)),
                            shape=(matrix.size, matrix.size), indices_sorted=True,
                            unique_indices=True)
        out = bcoo @ flat
    else:
        raise ValueError(f"unknown sparse method {method!r}; use 'segment_sum' or 'bcoo'")
    return out.reshape(features.shape)


def chebyshev_basis(laplacian: SparseMatrix, features: Array, order: int,
                    method: SparseMethod = DEFAULT_SPARSE_METHOD) -> Array:
    """Chebyshev terms T_0..T_{K-1} of the rescaled Laplacian applied to `features`.

    features: (N, B, F) vertex-major. Returns (K, N, B, F) with T0 = x, T1 = L~ x,
    Tk = 2 L~ T(k-1) - T(k-2). order K >= 1 is the number of terms (CoMA's K).
    """
    if order < 1:
        raise ValueError(f"Chebyshev order K must be >= 1, got {order}")
    terms = [features]
    if order > 1:
        terms.append(sparse_matmul(laplacian, features, method))
    for _ in range(2, order):
        terms.append(2.0 * sparse_matmul(laplacian, terms[-1], method) - terms[-2])
    return jnp.stack(terms)


def downsample(features: Array, indices: Array) -> Array:
    """(B, N_l, F) -> (B, N_{l+1}, F): D_l x as a vertex selection."""
    return features[:, indices]


def upsample(features: Array, indices: Array, weights: Array) -> Array:
    """(B, N_{l+1}, F) -> (B, N_l, F): U_l x, barycentric mix of 3 coarse vertices per row."""
    return jnp.einsum("bnkf,nk->bnf", features[:, indices], weights.astype(features.dtype))


class ChebConv(nn.Module):
    """Spectral graph convolution y = sum_k T_k(L~) x W_k + b (Defferrard et al.; CoMA).

    Attributes:
      features: output channels F_out.
      order: K, the number of Chebyshev terms (CoMA's K = 6 uses T_0..T_5).
      use_bias: add a learnt (F_out,) bias.
      method: sparse formulation ("segment_sum" or "bcoo").
    """

    features: int
    order: int = 6
    use_bias: bool = True
    method: SparseMethod = DEFAULT_SPARSE_METHOD

    @nn.compact
    def __call__(self, x: Array, laplacian: SparseMatrix) -> Array:
        """x: (B, N, F_in), laplacian: (N, N) -> (B, N, F_out)."""
        chex.assert_rank(x, 3)
        batch, num_vertices, in_features = x.shape
        chex.assert_equal(num_vertices, laplacian.size)
        kernel = self.param(
            "kernel", nn.initializers.variance_scaling(1.0, "fan_avg", "uniform",
                                                       in_axis=(0, 1), out_axis=2),
            (self.order, in_features, self.features), jnp.float32)
        basis = chebyshev_basis(laplacian, jnp.transpose(x, (1, 0, 2)), self.order, self.method)
        out = jnp.einsum("knbf,kfo->bno", basis, kernel.astype(x.dtype))
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
        return out
