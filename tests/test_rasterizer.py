"""Rasterizer against an independent numpy reference (every pixel against every triangle with a
z-test), occlusion, soft coverage limits, overflow accounting, robustness, gradients, jit/vmap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from recon.render import camera, rasterizer

SIZE = 80


def reference_rasterize(screen: np.ndarray, faces: np.ndarray, height: int, width: int):
    """Numpy z-buffer: every pixel centre against every triangle (vectorised over pixels);
    larger z is closer. Returns (H, W) face index, -1 where empty."""
    centres = np.stack(np.meshgrid(np.arange(width) + 0.5, np.arange(height) + 0.5), -1)
    centres = centres.reshape(-1, 2).astype(np.float64)
    best = np.full(len(centres), -np.inf)
    face_index = np.full(len(centres), -1)
    tri = screen[faces].astype(np.float64)
    for f, (a, b, c) in enumerate(tri):
        det = (b[0] - a[0]) * (c[1] - a[1]) - (c[0] - a[0]) * (b[1] - a[1])
        if abs(det) < 1e-12:
            continue
        q = centres - a[:2]
        w1 = (q[:, 0] * (c[1] - a[1]) - (c[0] - a[0]) * q[:, 1]) / det
        w2 = ((b[0] - a[0]) * q[:, 1] - q[:, 0] * (b[1] - a[1])) / det
        w0 = 1.0 - w1 - w2
        z = w0 * a[2] + w1 * b[2] + w2 * c[2]
        take = (w0 >= 0) & (w1 >= 0) & (w2 >= 0) & (z > best)
        best[take] = z[take]
        face_index[take] = f
    return face_index.reshape(height, width)


def rotation(yaw: float, pitch: float) -> np.ndarray:
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    r_yaw = np.asarray([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.asarray([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    return r_yaw @ r_pitch


@pytest.fixture(scope="module")
def flame(flame_topology):
    data = flame_topology
    return data["v_template"].astype(np.float32), data["faces"].astype(np.int32)


@pytest.fixture(scope="module")
def visibility_fn():
    return jax.jit(rasterizer.visibility, static_argnums=2)


# (yaw, pitch, scale, tx, ty): frontal, turned, looking up at the neck, close-up with big and
# off-screen triangles, small head.
POSES = [(0.0, 0.0, 7.0, 0.0, 0.02), (0.7, 0.1, 8.0, 0.01, 0.0), (-0.4, -0.5, 6.0, 0.0, 0.05),
         (0.2, 0.2, 20.0, 0.03, -0.02), (1.4, 0.0, 3.0, 0.0, 0.0)]


def test_matches_reference_on_flame(flame, visibility_fn):
    vertices, faces = flame
    settings = rasterizer.RasterSettings(height=SIZE, width=SIZE)
    batch = np.stack([vertices @ rotation(yaw, pitch).T for yaw, pitch, *_ in POSES])
    cams = np.asarray([pose[2:] for pose in POSES], np.float32)
    screen = camera.project_to_pixels(jnp.asarray(batch, jnp.float32), jnp.asarray(cams),
                                      (SIZE, SIZE))
    face_index, overflow = visibility_fn(screen, jnp.asarray(faces), settings)
    np.testing.assert_equal(np.asarray(overflow), 0)
    for b in range(len(POSES)):
        expected = reference_rasterize(np.asarray(screen[b]), faces, SIZE, SIZE)
        got = np.asarray(face_index[b])
        union = (got >= 0) | (expected >= 0)
        both = (got >= 0) & (expected >= 0)
        assert union.sum() > 100
        iou = both.sum() / union.sum()
        agreement = np.mean(got[both] == expected[both])
        assert iou >= 0.99, (POSES[b], iou)
        assert agreement >= 0.99, (POSES[b], agreement)


def test_overlapping_triangles_nearer_wins():
    square = np.asarray([[2.13, 2.31], [30.27, 2.05], [2.21, 30.43]], np.float32)
    for z_first, z_second in [(1.0, 0.0), (0.0, 1.0)]:
        screen = np.concatenate([
            np.concatenate([square, np.full((3, 1), z_first, np.float32)], 1),
            np.concatenate([square + 4, np.full((3, 1), z_second, np.float32)], 1)])
        faces = jnp.asarray([[0, 1, 2], [3, 4, 5]], jnp.int32)
        settings = rasterizer.RasterSettings(height=40, width=40)
        face_index, _ = rasterizer.visibility(jnp.asarray(screen)[None], faces, settings)
        expected = reference_rasterize(screen, np.asarray(faces), 40, 40)
        np.testing.assert_array_equal(np.asarray(face_index[0]), expected)
        winner = 0 if z_first > z_second else 1
        assert int(face_index[0, 10, 10]) == winner  # inside both


def test_oversized_triangle_and_overflow_is_counted():
    screen = jnp.asarray([[[-500.0, -500.0, 0.0], [900.0, -400.0, 0.0], [0.0, 900.0, 0.0]]])
    faces = jnp.asarray([[0, 1, 2]], jnp.int32)
    settings = rasterizer.RasterSettings(height=48, width=64)
    face_index, overflow = rasterizer.visibility(screen, faces, settings)
    assert np.all(np.asarray(face_index) == 0) and int(overflow[0]) == 0
    small = rasterizer.RasterSettings(height=48, width=64, tile_capacity=10)
    face_index, overflow = rasterizer.visibility(screen, faces, small)
    # 64 x 48 pixels need 8 x 6 = 48 tiles of 8 x 8; 10 fit, 38 are counted, not hidden.
    assert int(overflow[0]) == 38
    assert int(np.sum(np.asarray(face_index) == 0)) == 10 * 64


def test_soft_alpha_tends_to_hard_coverage(flame):
    vertices, faces = flame
    settings = rasterizer.RasterSettings(height=SIZE, width=SIZE)
    screen = camera.project_to_pixels(jnp.asarray(vertices)[None], jnp.asarray([[7.0, 0, 0.02]]),
                                      (SIZE, SIZE))
    attributes = jnp.zeros((1, vertices.shape[0], 1))
    hard = None
    gaps = []
    for sigma in [1.0, 0.1, 1e-3]:
        fragments = rasterizer.rasterize(screen, jnp.asarray(faces), attributes, settings, sigma)
        hard = np.asarray(fragments.face_index[0] >= 0, np.float32)
        gaps.append(np.mean(np.abs(np.asarray(fragments.alpha[0]) - hard)))
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 1e-3
    # With a wide sigma the silhouette is soft: pixels just outside get partial coverage.
    fragments = rasterizer.rasterize(screen, jnp.asarray(faces), attributes, settings, 1.0)
    alpha = np.asarray(fragments.alpha[0])
    assert np.any((hard == 0) & (alpha > 0.05) & (alpha < 0.5))


def test_degenerate_backfacing_offscreen_nan_triangles_are_finite():
    screen = jnp.asarray([[[10.0, 10.0, 0.0], [20.0, 10.0, 0.0], [10.0, 20.0, 0.0],  # ccw
                           [25.0, 25.0, 1.0], [25.0, 35.0, 1.0], [35.0, 25.0, 1.0],  # cw
                           [5.0, 5.0, 0.0], [5.0, 5.0, 0.0], [8.0, 8.0, 0.0],  # degenerate
                           [500.0, 500.0, 0.0], [600.0, 500.0, 0.0], [500.0, 600.0, 0.0],  # off
                           [jnp.nan, 1.0, 0.0], [3.0, 3.0, 0.0], [1.0, 9.0, 0.0]]])  # NaN
    faces = jnp.arange(15, dtype=jnp.int32).reshape(5, 3)
    settings = rasterizer.RasterSettings(height=40, width=40)

    def loss(s):
        fragments = rasterizer.rasterize(s, faces, s, settings, 0.5)
        return jnp.sum(fragments.attributes) + jnp.sum(fragments.alpha)

    value, grad = jax.value_and_grad(loss)(screen)
    assert np.isfinite(float(value))
    finite_vertices = np.r_[0:12, 13:15]
    assert np.all(np.isfinite(np.asarray(grad)[0, finite_vertices]))
    face_index, _ = rasterizer.visibility(screen, faces, settings)
    found = set(np.unique(np.asarray(face_index)).tolist())
    assert found == {-1, 0, 1}  # both windings drawn; degenerate/off-screen/NaN skipped


def _smooth_scene():
    """A 2-triangle quad partly overlapping a bigger triangle, with smooth colours."""
    screen = np.asarray([[4.3, 5.1, 0.2], [27.7, 6.2, 0.1], [6.1, 26.4, 0.3], [25.2, 28.9, 0.2],
                         [12.4, 9.3, 0.5], [35.1, 17.6, 0.6], [14.2, 34.7, 0.4]], np.float64)
    faces = np.asarray([[0, 1, 2], [1, 3, 2], [4, 5, 6]], np.int32)
    colours = np.random.default_rng(0).random((7, 3))
    target = np.random.default_rng(1).random((40, 40, 3))
    return screen, faces, colours, target


def test_photometric_gradient_matches_finite_differences():
    screen, faces, colours, target = _smooth_scene()
    settings = rasterizer.RasterSettings(height=40, width=40)
    with jax.enable_x64(True):
        faces_j = jnp.asarray(faces)

        def loss(s, c):
            fragments = rasterizer.rasterize(s[None], faces_j, c[None], settings, sigma=1.0)
            image = fragments.alpha[0, ..., None] * fragments.attributes[0]
            return jnp.sum((image - target) ** 2)

        s0, c0 = jnp.asarray(screen), jnp.asarray(colours)
        grad_s, grad_c = jax.jit(jax.grad(loss, argnums=(0, 1)))(s0, c0)
        rng = np.random.default_rng(2)
        for _ in range(3):
            direction = rng.normal(size=screen.shape)
            direction[:, 2] = 0.0  # depth only decides visibility (no gradient by design)
            eps = 1e-5
            numeric = (loss(s0 + eps * direction, c0) - loss(s0 - eps * direction, c0)) / (2 * eps)
            analytic = float(jnp.sum(grad_s * direction))
            np.testing.assert_allclose(analytic, float(numeric), rtol=1e-4, atol=1e-6)
        direction = rng.normal(size=colours.shape)
        numeric = (loss(s0, c0 + 1e-5 * direction) - loss(s0, c0 - 1e-5 * direction)) / 2e-5
        np.testing.assert_allclose(float(jnp.sum(grad_c * direction)), float(numeric), rtol=1e-6)
        assert np.all(np.abs(np.asarray(grad_s)[:, :2]) > 0)  # every vertex gets a gradient


def test_silhouette_gradient_outside_the_mesh():
    """A pixel just outside an edge pulls the edge toward it through the soft alpha."""
    screen = jnp.asarray([[[5.0, 5.0, 0.0], [20.2, 5.0, 0.0], [5.0, 30.0, 0.0]]])
    faces = jnp.asarray([[0, 1, 2]], jnp.int32)
    settings = rasterizer.RasterSettings(height=32, width=32)

    def outside_alpha(s):
        fragments = rasterizer.rasterize(s, faces, jnp.ones((1, 3, 1)), settings, sigma=0.5)
        return fragments.alpha[0, 5, 20]  # pixel centre (20.5, 5.5), outside the hypotenuse

    grad = jax.grad(outside_alpha)(screen)
    assert float(grad[0, 1, 0]) > 0  # moving vertex 1 right covers the pixel more


def test_jit_vmap_and_single_trace(flame):
    vertices, faces = flame
    settings = rasterizer.RasterSettings(height=32, width=32)
    cams = jnp.asarray([[5.0, 0.0, 0.0], [6.0, 0.01, 0.02], [4.0, -0.01, 0.0]])
    stacked = jnp.broadcast_to(jnp.asarray(vertices), (3,) + vertices.shape)
    screen = camera.project_to_pixels(stacked, cams, (32, 32))
    attributes = screen[..., :2]

    def plain(s, a):
        fragments = rasterizer.rasterize(s, jnp.asarray(faces), a, settings, 0.5)
        return fragments.alpha, fragments.attributes, fragments.face_index

    run = jax.jit(chex.assert_max_traces(plain, n=1))
    batched = run(screen, attributes)
    run(screen + 0.1, attributes)
    per_item = jax.jit(jax.vmap(lambda s, a: plain(s[None], a[None])))(screen, attributes)
    for x, y in zip(batched, per_item):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y)[:, 0], atol=1e-5)


def test_soft_band_overflow_is_counted_and_falls_back_to_hard_coverage():
    screen = jnp.asarray([[[4.2, 4.1, 0.0], [27.3, 5.2, 0.0], [6.1, 28.4, 0.0]]])
    faces = jnp.asarray([[0, 1, 2]], jnp.int32)
    attributes = jnp.ones((1, 3, 1))
    full = rasterizer.rasterize(screen, faces, attributes,
                                rasterizer.RasterSettings(height=32, width=32), 0.5)
    small = rasterizer.rasterize(screen, faces, attributes,
                                 rasterizer.RasterSettings(height=32, width=32, band_capacity=8),
                                 0.5)
    hard = np.asarray(full.face_index[0] >= 0, np.float32)
    band = (np.asarray(full.alpha[0]) != hard)
    assert int(full.overflow[0]) == 0 and band.sum() > 8
    assert int(small.overflow[0]) > 0
    changed = np.asarray(small.alpha[0]) != hard
    assert changed.sum() <= 8  # only the slots that fit are soft; the rest is hard coverage
