"""ChebConv against a dense numpy recursion; sampling ops against scipy; encoder jit/grad."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

import spectral_gcn
from spectral_gcn import layers, mesh

METHODS = ("segment_sum", "bcoo")


@pytest.fixture(scope="module")
def small():
    """A 642-vertex sphere hierarchy with 4 levels: 642, 161, 41, 11, 3."""
    icosphere = trimesh.creation.icosphere(subdivisions=3)
    vertices = np.asarray(icosphere.vertices, np.float32) * 0.1
    faces = np.asarray(icosphere.faces, np.int32)
    return mesh.build_hierarchy(vertices, faces, (4, 4, 4, 4), use_cache=False)


def _dense_chebyshev(lap: np.ndarray, x: np.ndarray, kernel: np.ndarray, bias: np.ndarray):
    """Reference: y[b] = sum_k T_k(L) x[b] W_k + bias, T0 = I, T1 = L, Tk = 2 L T(k-1) - T(k-2)."""
    order = kernel.shape[0]
    n = lap.shape[0]
    polys = [np.eye(n), lap]
    for _ in range(2, order):
        polys.append(2 * lap @ polys[-1] - polys[-2])
    return sum(np.einsum("nm,bmf,fo->bno", polys[k], x, kernel[k]) for k in range(order)) + bias


@pytest.mark.parametrize("method", METHODS)
def test_sparse_matmul_matches_scipy(small, method):
    lap = small.laplacians[0]
    x = np.random.default_rng(0).normal(size=(small.sizes[0], 2, 5)).astype(np.float32)
    expected = np.einsum("nm,mbf->nbf", lap.to_scipy().toarray(), x)
    got = jax.jit(layers.sparse_matmul, static_argnums=2)(lap, jnp.asarray(x), method)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("order", [1, 2, 6])
def test_chebconv_matches_dense_recursion(small, method, order):
    lap = small.laplacians[1]
    x = np.random.default_rng(1).normal(size=(3, small.sizes[1], 4)).astype(np.float32)
    conv = layers.ChebConv(7, order, method=method)
    variables = conv.init(jax.random.key(0), jnp.asarray(x), lap)
    variables = jax.tree.map(lambda v: v + 0.1, variables)  # nonzero bias too
    got = jax.jit(conv.apply)(variables, jnp.asarray(x), lap)
    expected = _dense_chebyshev(lap.to_scipy().toarray(), x.astype(np.float64),
                                np.asarray(variables["params"]["kernel"], np.float64),
                                np.asarray(variables["params"]["bias"], np.float64))
    assert got.shape == (3, small.sizes[1], 7)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_chebconv_rejects_wrong_vertex_count(small):
    conv = layers.ChebConv(4, 3)
    with pytest.raises(AssertionError):
        conv.init(jax.random.key(0), jnp.zeros((1, 10, 3)), small.laplacians[0])
    with pytest.raises(ValueError, match="Chebyshev order"):
        layers.chebyshev_basis(small.laplacians[0], jnp.zeros((small.sizes[0], 1, 1)), 0)


def test_down_and_up_sampling_match_scipy(small):
    x = np.random.default_rng(2).normal(size=(2, small.sizes[0], 3)).astype(np.float32)
    down = layers.downsample(jnp.asarray(x), small.down[0])
    np.testing.assert_allclose(down, np.einsum("mn,bnf->bmf", small.down_matrix(0).toarray(), x))
    up = layers.upsample(down, small.up_indices[0], small.up_weights[0])
    expected = np.einsum("nm,bmf->bnf", small.up_matrix(0).toarray(), np.asarray(down))
    np.testing.assert_allclose(up, expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def encoder_setup(small):
    config = spectral_gcn.CoMAConfig(num_vertices=small.sizes[0], filters=(4, 4, 4, 8), order=3,
                                     latent_size=5)
    model = spectral_gcn.AutoEncoder(config)
    vertices = jnp.asarray(small.vertices[0])[None] * jnp.linspace(0.8, 1.2, 4)[:, None, None]
    variables = model.init(jax.random.key(0), vertices, small)
    return config, model, variables, vertices


def test_autoencoder_shapes_and_statistics(small, encoder_setup):
    config, model, variables, vertices = encoder_setup
    assert set(variables) == {"params", "stats"}
    assert variables["stats"]["encoder"]["mean"].shape == (small.sizes[0], 3)
    out = jax.jit(model.apply)(variables, vertices, small)
    assert out.shape == vertices.shape
    latent = model.apply(variables, vertices, small, method=model.encode)
    assert latent.shape == (4, config.latent_size)
    # the statistics are used: shifting mean and input together leaves the code unchanged
    shifted = jax.tree.map(lambda v: v, variables)
    shifted["stats"]["encoder"]["mean"] = variables["stats"]["encoder"]["mean"] + 0.3
    latent_shifted = model.apply(shifted, vertices + 0.3, small, method=model.encode)
    np.testing.assert_allclose(latent_shifted, latent, atol=1e-5)
    latent_unshifted = model.apply(shifted, vertices, small, method=model.encode)
    assert np.abs(np.asarray(latent_unshifted - latent)).max() > 1e-3


def test_encoder_jit_grad_against_finite_differences(small, encoder_setup):
    config, _, variables, vertices = encoder_setup
    encoder_variables = {"params": variables["params"]["encoder"],
                         "stats": variables["stats"]["encoder"]}
    encoder = spectral_gcn.Encoder(config)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def objective(params, hierarchy, x):
        return jnp.sum(jnp.sin(encoder.apply(params, x, hierarchy)))

    grad = jax.jit(jax.grad(objective, argnums=(0, 2)))
    param_grads, vertex_grads = grad(encoder_variables, small, vertices)
    assert vertex_grads.shape == vertices.shape
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(param_grads))
    direction = np.random.default_rng(3).normal(size=vertices.shape).astype(np.float32)
    direction /= np.linalg.norm(direction)
    eps = 1e-2
    numeric = (objective(encoder_variables, small, vertices + eps * direction)
               - objective(encoder_variables, small, vertices - eps * direction)) / (2 * eps)
    analytic = float(jnp.vdot(vertex_grads, direction))
    np.testing.assert_allclose(analytic, float(numeric), rtol=2e-2, atol=2e-3)
    # a second call with new values (same shapes) does not retrace
    objective(encoder_variables, small, vertices * 1.01)


def test_hierarchy_mismatch_is_an_error(small, encoder_setup):
    _, model, variables, vertices = encoder_setup
    other = mesh.build_hierarchy(np.asarray(small.vertices[0]), np.asarray(small.faces[0]),
                                 (4, 4), use_cache=False)
    with pytest.raises(ValueError, match="down-sampling steps"):
        model.apply(variables, vertices, other)
