"""Mesh hierarchy: Laplacian against scipy, quadric decimation, sampling operators, cache."""

import numpy as np
import pytest
import scipy.sparse as sp
import trimesh
from scipy.sparse.csgraph import laplacian as csgraph_laplacian

import spectral_gcn
from spectral_gcn import laplacian, mesh, sampling

FLAME_SIZES = (5023, 1256, 314, 79, 20)


@pytest.fixture(scope="module")
def flame(tmp_path_factory):
    cache = tmp_path_factory.mktemp("hierarchy_cache")
    return spectral_gcn.flame_hierarchy(cache_dir=cache), cache


@pytest.fixture(scope="module")
def sphere():
    icosphere = trimesh.creation.icosphere(subdivisions=3)  # 642 vertices, 1280 triangles
    return np.asarray(icosphere.vertices, np.float32), np.asarray(icosphere.faces, np.int32)


def _scipy_reference(faces, num_vertices):
    """csgraph's L = I - D^-1/2 A D^-1/2 rescaled with lmax = 2: L - I; dense A built here."""
    adj = np.zeros((num_vertices, num_vertices))
    for a, b in ((0, 1), (1, 2), (2, 0)):
        adj[faces[:, a], faces[:, b]] = 1
        adj[faces[:, b], faces[:, a]] = 1
    return csgraph_laplacian(adj, normed=True) - np.eye(num_vertices)


def test_laplacian_matches_csgraph_and_spectrum(sphere):
    vertices, faces = sphere
    lap = laplacian.rescaled_laplacian(faces, len(vertices)).toarray()
    np.testing.assert_allclose(lap, _scipy_reference(faces, len(vertices)), atol=1e-12)
    assert np.all(np.diag(lap) == 0) and np.all(lap <= 0)
    eigenvalues = np.linalg.eigvalsh(lap)
    assert eigenvalues.min() >= -1 - 1e-9 and eigenvalues.max() <= 1 + 1e-9
    assert np.isclose(eigenvalues.min(), -1.0, atol=1e-9)  # eigenvalue 0 of L (connected)


def test_flame_laplacians_match_csgraph(flame):
    hierarchy, _ = flame
    for level in range(1, 5):  # level 0 (5023^2 dense) is covered by the sphere test's code path
        faces = np.asarray(hierarchy.faces[level])
        n = hierarchy.sizes[level]
        got = hierarchy.laplacians[level].to_scipy().toarray()
        expected = _scipy_reference(faces, n)
        np.testing.assert_allclose(got, expected, atol=1e-6)
        eigenvalues = np.linalg.eigvalsh(got)
        assert eigenvalues.min() >= -1 - 1e-5 and eigenvalues.max() <= 1 + 1e-5
    level0 = hierarchy.laplacians[0].to_scipy()
    adjacency = trimesh.Trimesh(np.asarray(hierarchy.vertices[0]), np.asarray(hierarchy.faces[0]),
                                process=False).edges_unique
    adj = sp.coo_matrix((np.ones(len(adjacency)), adjacency.T), shape=(5023, 5023))
    reference = sp.csr_matrix(csgraph_laplacian((adj + adj.T).tocsr(), normed=True)) - sp.eye(5023)
    assert abs(level0 - reference).max() < 1e-6


def test_flame_level_sizes_and_selection(flame):
    hierarchy, _ = flame
    assert hierarchy.sizes == FLAME_SIZES
    for level in range(4):
        down = np.asarray(hierarchy.down[level])
        assert down.shape == (FLAME_SIZES[level + 1],)
        assert np.all(np.diff(down) > 0)  # sorted, unique
        fine = np.asarray(hierarchy.vertices[level])
        coarse = np.asarray(hierarchy.vertices[level + 1])
        np.testing.assert_array_equal(coarse, fine[down])  # original vertices, not moved
        matrix = hierarchy.down_matrix(level).toarray()
        assert set(np.unique(matrix)) <= {0.0, 1.0}
        np.testing.assert_array_equal(matrix.sum(axis=1), 1.0)
        faces = np.asarray(hierarchy.faces[level + 1])
        assert faces.min() >= 0 and faces.max() < FLAME_SIZES[level + 1]
        # every coarse vertex lies in some coarse triangle
        assert np.unique(faces).size == FLAME_SIZES[level + 1]


def test_upsampling_reproduces_smooth_field(flame):
    hierarchy, _ = flame
    for level in range(2):
        fine = np.asarray(hierarchy.vertices[level], np.float64)
        weights = np.asarray(hierarchy.up_weights[level])
        assert weights.min() >= 0
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, atol=1e-6)
        # A smooth field over the head (wavelength ~ 0.3 m, head ~ 0.25 m wide).
        field = np.sin(fine @ np.array([9.0, -5.0, 7.0])) + np.cos(12.0 * fine[:, 1])
        reconstructed = hierarchy.up_matrix(level) @ (hierarchy.down_matrix(level) @ field)
        error = np.abs(reconstructed - field)
        kept = np.asarray(hierarchy.down[level])
        np.testing.assert_allclose(reconstructed[kept], field[kept], atol=1e-5)
        assert np.median(error) < 0.01 * np.ptp(field), (level, np.median(error))
        assert np.mean(error) < 0.03 * np.ptp(field), (level, np.mean(error))


def test_upsampling_of_positions_stays_on_surface(flame):
    hierarchy, _ = flame
    fine = np.asarray(hierarchy.vertices[0], np.float64)
    coarse = np.asarray(hierarchy.vertices[1], np.float64)
    up = hierarchy.up_matrix(0) @ coarse
    distance_mm = 1000 * np.linalg.norm(up - fine, axis=1)
    assert np.median(distance_mm) < 0.5, np.median(distance_mm)


def test_closest_point_barycentric_against_dense_sampling():
    rng = np.random.default_rng(0)
    vertices = rng.normal(size=(6, 3))
    faces = np.array([[0, 1, 2], [3, 4, 5]])
    points = rng.normal(size=(40, 3)) * 2
    face, bary, distance = sampling.closest_point_barycentric(points, vertices, faces)
    # brute-force reference: a fine grid of barycentric points on each triangle
    grid = np.stack(np.meshgrid(np.linspace(0, 1, 201), np.linspace(0, 1, 201)), -1).reshape(-1, 2)
    grid = grid[grid.sum(1) <= 1]
    weights = np.concatenate([1 - grid.sum(1, keepdims=True), grid], 1)
    samples = np.concatenate([weights @ vertices[f] for f in faces])
    reference = np.linalg.norm(points[:, None] - samples[None], axis=-1).min(1)
    assert np.all(distance <= reference + 1e-9)
    np.testing.assert_allclose(distance, reference, atol=0.02)
    closest = np.einsum("pk,pki->pi", bary, vertices[faces[face]])
    np.testing.assert_allclose(np.linalg.norm(closest - points, axis=1), distance, atol=1e-9)


def test_decimation_exact_counts_and_deterministic(sphere):
    vertices, faces = sphere
    first = mesh.build_hierarchy(vertices, faces, (4, 3), use_cache=False)
    second = mesh.build_hierarchy(vertices, faces, (4, 3), use_cache=False)
    assert first.sizes == (642, 161, 54)
    assert first.key == second.key
    for a, b in zip(mesh.hierarchy_arrays(first).values(), mesh.hierarchy_arrays(second).values()):
        np.testing.assert_array_equal(a, b)


def test_cache_round_trip(sphere, tmp_path):
    vertices, faces = sphere
    built = mesh.build_hierarchy(vertices, faces, (4, 4), cache_dir=tmp_path)
    files = list(tmp_path.glob("mesh_hierarchy_*.npz"))
    assert len(files) == 1 and built.key[:24] in files[0].name
    loaded = mesh.build_hierarchy(vertices, faces, (4, 4), cache_dir=tmp_path)
    assert loaded.key == built.key and loaded.sizes == built.sizes
    for name, value in mesh.hierarchy_arrays(built).items():
        np.testing.assert_array_equal(value, mesh.hierarchy_arrays(loaded)[name], err_msg=name)
    other = mesh.build_hierarchy(vertices, faces, (2, 2), cache_dir=tmp_path)
    assert other.key != built.key and len(list(tmp_path.glob("*.npz"))) == 2


def test_cache_env_var(sphere, tmp_path, monkeypatch):
    monkeypatch.setenv(mesh.CACHE_ENV, str(tmp_path / "env_cache"))
    vertices, faces = sphere
    mesh.build_hierarchy(vertices, faces, (4,))
    assert len(list((tmp_path / "env_cache").glob("mesh_hierarchy_*.npz"))) == 1


def test_bad_inputs_raise(sphere, tmp_path):
    vertices, faces = sphere
    with pytest.raises(ValueError, match="faces index vertices"):
        mesh.build_hierarchy(vertices[:10], faces, use_cache=False)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        mesh.build_hierarchy(vertices[:, :2], faces, use_cache=False)
    with pytest.raises(ValueError, match="factors"):
        mesh.build_hierarchy(vertices, faces, (0,), use_cache=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mesh.load_hierarchy(tmp_path / "missing.npz")
    np.savez(tmp_path / "bad.npz", format_version=np.array(999))
    with pytest.raises(ValueError, match="format version 999"):
        mesh.load_hierarchy(tmp_path / "bad.npz")


def test_hierarchy_is_a_pytree(flame):
    import jax

    hierarchy, _ = flame
    leaves, treedef = jax.tree.flatten(hierarchy)
    assert all(hasattr(leaf, "shape") for leaf in leaves)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    assert rebuilt.key == hierarchy.key and rebuilt.sizes == FLAME_SIZES


def test_decimation_that_cannot_reach_target_raises():
    vertices = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.float32)
    with pytest.raises(ValueError, match="stopped at 3 vertices"):
        sampling.quadric_decimate(vertices, np.array([[0, 1, 2]]), 1)
    with pytest.raises(ValueError, match="target must be"):
        sampling.quadric_decimate(vertices, np.array([[0, 1, 2]]), 4)
