"""CoMA (Ranjan et al. 2018) encoder, decoder and autoencoder on a `MeshHierarchy` argument.

Encoder: per level l = 0..3, ChebConv(filters[l], K) + bias -> ReLU -> D_l, then FC
(N_4 * filters[-1]) -> latent. Decoder (CoMA's mirror): FC latent -> N_4 * filters[-1], then per
level l = 3..0, U_l -> ChebConv(filters[l], K) -> ReLU, and a last ChebConv to 3 channels.

The per-vertex normalisation statistics (mean and std of the training meshes, metres) live in
the Encoder's `stats` variable collection, so they are saved and loaded with the weights:
variables = {"params": ..., "stats": {"mean": (N, 3), "std": (N, 3)}}.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from spectral_gcn import layers
from spectral_gcn.mesh import MeshHierarchy

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class CoMAConfig:
    """Architecture of the CoMA autoencoder (the paper's defaults).

      num_vertices: N_0, vertices of the input mesh (5023 for FLAME).
      filters: channels of the ChebConv at levels 0..L-1 (len = number of down-samplings L).
      order: Chebyshev K (number of terms).
      latent_size: size of the code.
      method: sparse formulation of L~ x ("segment_sum" or "bcoo").
    """

    num_vertices: int = 5023
    filters: Tuple[int, ...] = (16, 16, 16, 32)
    order: int = 6
    latent_size: int = 8
    method: layers.SparseMethod = layers.DEFAULT_SPARSE_METHOD


def _check_hierarchy(config: CoMAConfig, hierarchy: MeshHierarchy) -> None:
    if hierarchy.sizes[0] != config.num_vertices:
        raise ValueError(f"CoMA for {config.num_vertices} vertices got a hierarchy whose level 0 "
                         f"has {hierarchy.sizes[0]}")
    if hierarchy.num_levels != len(config.filters):
        raise ValueError(f"CoMA with {len(config.filters)} filter levels needs a hierarchy with "
                         f"as many down-sampling steps, got {hierarchy.num_levels}")


class Encoder(nn.Module):
    """(B, N_0, 3) vertices in metres -> (B, latent_size) code."""

    config: CoMAConfig = CoMAConfig()

    def setup(self):
        self.convs = [layers.ChebConv(f, self.config.order, method=self.config.method,
                                      name=f"conv_{i}") for i, f in enumerate(self.config.filters)]
        self.dense = nn.Dense(self.config.latent_size, name="dense")
        shape = (self.config.num_vertices, 3)
        self.mean = self.variable("stats", "mean", jnp.zeros, shape, jnp.float32)
        self.std = self.variable("stats", "std", jnp.ones, shape, jnp.float32)

    def normalize(self, vertices: Array) -> Array:
        """(B, N, 3) metres -> (B, N, 3) standardised per vertex and coordinate."""
        return (vertices - self.mean.value) / self.std.value

    def denormalize(self, normalized: Array) -> Array:
        """Inverse of `normalize`."""
        return normalized * self.std.value + self.mean.value

    def __call__(self, vertices: Array, hierarchy: MeshHierarchy) -> Array:
        _check_hierarchy(self.config, hierarchy)
        chex.assert_rank(vertices, 3)
        chex.assert_axis_dimension(vertices, 1, hierarchy.sizes[0])
        chex.assert_axis_dimension(vertices, 2, 3)
        x = self.normalize(vertices)
        for level, conv in enumerate(self.convs):
            x = nn.relu(conv(x, hierarchy.laplacians[level]))
            x = layers.downsample(x, hierarchy.down[level])
        return self.dense(x.reshape(x.shape[0], -1))


class Decoder(nn.Module):
    """(B, latent_size) code -> (B, N_0, 3) normalised coordinates (see Encoder.denormalize)."""

    config: CoMAConfig = CoMAConfig()

    @nn.compact
    def __call__(self, latent: Array, hierarchy: MeshHierarchy) -> Array:
        _check_hierarchy(self.config, hierarchy)
        chex.assert_rank(latent, 2)
        filters, levels = self.config.filters, hierarchy.num_levels
        coarse = hierarchy.sizes[-1]
        x = nn.Dense(coarse * filters[-1], name="dense")(latent)
        x = x.reshape(latent.shape[0], coarse, filters[-1])
        for step, level in enumerate(reversed(range(levels))):
            x = layers.upsample(x, hierarchy.up_indices[level], hierarchy.up_weights[level])
            x = layers.ChebConv(filters[level], self.config.order, method=self.config.method,
                                name=f"conv_{step}")(x, hierarchy.laplacians[level])
            x = nn.relu(x)
        return layers.ChebConv(3, self.config.order, method=self.config.method,
                               name="conv_out")(x, hierarchy.laplacians[0])


class AutoEncoder(nn.Module):
    """(B, N_0, 3) vertices in metres -> (B, N_0, 3) reconstruction in metres."""

    config: CoMAConfig = CoMAConfig()

    def setup(self):
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def encode(self, vertices: Array, hierarchy: MeshHierarchy) -> Array:
        return self.encoder(vertices, hierarchy)

    def decode(self, latent: Array, hierarchy: MeshHierarchy) -> Array:
        """(B, latent) -> (B, N_0, 3) metres."""
        return self.encoder.denormalize(self.decoder(latent, hierarchy))

    def __call__(self, vertices: Array, hierarchy: MeshHierarchy) -> Array:
        return self.decode(self.encode(vertices, hierarchy), hierarchy)
