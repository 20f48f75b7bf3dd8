"""Differentiable soft rasterizer in pure JAX (same code on CPU, GPU and TPU).

Two passes:
  1. Visibility (no gradient): every triangle is evaluated only on pixels near it. A triangle
     whose pixel bounding box fits a small square window (`window_sizes`, e.g. 2x2 and 4x4) is
     evaluated once on that window; bigger ones are split into `tile_size` tiles of their
     bounding box clipped to the image (so FLAME's scalp and neck triangles at any scale are
     handled). Each covered (pixel, triangle) writes a packed int32 key
     (quantised depth << face_bits | face index) with one scatter-min: the z-buffer, without
     float ties. Slots per class are static (`window_capacities`, `tile_capacity`); what does
     not fit is counted in `Fragments.overflow`, never dropped silently.
  2. Interpolation (differentiable): the barycentrics of each pixel's shading triangle (the
     visible one; outside the mesh, in the silhouette band, the nearest one) are recomputed
     from the vertex positions, so gradients reach the vertices, and the attributes are
     interpolated with them (one gather per pixel of a per-face [barycentric rows, corner
     attributes] table). Soft coverage is SoftRas-style: for the distinct visible
     triangles of the pixels within L1 distance r (r = 1: the pixel and its 4 neighbours),
     prob = sigmoid(d / sigma) with d the signed distance (pixels, positive inside) from the
     pixel centre to the triangle (the minimum over its three edge lines), and
     alpha = 1 - prod(1 - prob), evaluated only in the silhouette band (pixels with an
     uncovered pixel in their neighbourhood and a visible triangle in it), compacted into
     static slots. Interior pixels have alpha 1, pixels far from the mesh 0. As sigma -> 0,
     alpha -> the hard coverage. Unlike SoftRas, triangles hidden in the whole neighbourhood
     and internal edges do not contribute: for the silhouette it is the visible ones that
     matter, and the cost stays a small fraction of the pixels.

Screen convention (see `recon.render.camera`): vertices are (u, v, z) with u, v in pixels (pixel
(i, j) sampled at its centre (j + 0.5, i + 0.5)) and larger z closer to the camera. Barycentrics
are affine in screen space, which is perspective-correct for the orthographic camera. Both
triangle windings are rasterized (no back-face culling); degenerate, non-finite and
off-screen triangles are skipped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array

_INT32_MAX = 2**31 - 1
_AREA_EPS = 1e-10  # twice the area in pixels^2 below which a triangle is degenerate
# Columns of the per-face table (pixel units).
_X0, _Y0, _G1X, _G1Y, _G2X, _G2Y, _H0, _H1, _H2, _Z0, _DZ1, _DZ2 = range(12)


@dataclasses.dataclass(frozen=True)
class RasterSettings:
    """Static settings (hashable; pass as a static argument of `jax.jit`).

    height, width: image size in pixels.
    window_sizes: increasing square windows (pixels) for small triangles; a triangle whose
      pixel bounding box fits w x w (and not the previous window) is evaluated on one w x w window.
    window_capacities: triangles per image per window class; None -> the number of faces
      (never overflows).
    tile_size: triangles bigger than the last window are covered by tiles of this size.
    tile_capacity: tiles per image.
    soft_radius: soft coverage considers the visible triangles of the pixels within L1
      distance r; 0 keeps only the pixel's own triangle (no silhouette gradient outside).
    band_capacity: silhouette-band pixels per image that get the soft coverage (static);
      None -> min(H * W / 4, 8 (H + W)) (3,584 at 224 x 224; FLAME heads need about 1,400).
      Band pixels beyond it keep the hard coverage and are counted in
      `Fragments.overflow`.
    """

    height: int = 224
    width: int = 224
    window_sizes: tuple = (2, 4)
    window_capacities: Optional[tuple] = None
    tile_size: int = 8
    tile_capacity: int = 8192
    soft_radius: int = 1
    band_capacity: Optional[int] = None

    def __post_init__(self):
        if self.height < 1 or self.width < 1:
            raise ValueError(f"image size must be positive, got {self.height}x{self.width}")
        sizes = tuple(self.window_sizes)
        if any(b <= a for a, b in zip(sizes, sizes[1:])) or (sizes and sizes[0] < 1):
            raise ValueError(f"window_sizes must be increasing positive ints, got {sizes}")
        if self.window_capacities is not None and len(self.window_capacities) != len(sizes):
            raise ValueError(f"window_capacities {self.window_capacities} must have one entry "
                             f"per window size {sizes}")
        if self.tile_size < 1 or self.tile_capacity < 0 or self.soft_radius < 0:
            raise ValueError("tile_size must be >= 1, tile_capacity and soft_radius >= 0")


@struct.dataclass
class Fragments:
    """Rasterizer output for B images of H x W pixels.

    face_index: (B, H, W) int32 index of the visible triangle at the pixel centre, -1 if none.
    barycentric: (B, H, W, 3) barycentrics of the shading triangle (the visible one; outside the
      mesh, the nearest neighbourhood triangle with its barycentrics clamped to the triangle).
    attributes: (B, H, W, A) attributes interpolated with `barycentric`; zero where no triangle
      is near.
    alpha: (B, H, W) soft coverage in [0, 1].
    overflow: (B,) int32 what did not fit the static capacities: triangles (window classes)
      and tiles (big triangles) NOT rasterized, plus silhouette-band pixels left with the hard
      coverage; 0 when the image is complete.
    """

    face_index: Array
    barycentric: Array
    attributes: Array
    alpha: Array
    overflow: Array


def face_table(vertices_px: Array, faces: Array) -> tuple[Array, Array]:
    """Per-triangle screen-space quantities, differentiable in the vertices.

    Args:
      vertices_px: (B, V, 3) (u, v) pixels and depth z (larger is closer).
      faces: (F, 3) int32.
    Returns:
      table: (B, F, 12) [x0, y0, g1 (2), g2 (2), h (3), z0, z1 - z0, z2 - z0] where the
        barycentrics at pixel point p are l1 = g1 . (p - p0), l2 = g2 . (p - p0), l0 = 1 - l1 - l2
        and h_i is the altitude from vertex i (so l_i h_i is the distance to the opposite edge).
      valid: (B, F) bool, finite and non-degenerate.
    """
    tri = vertices_px[:, faces]
    finite = jnp.all(jnp.isfinite(tri), axis=(-1, -2))
    # Zero non-finite triangles before any arithmetic so that no NaN reaches a gradient.
    tri = jnp.where(finite[..., None, None], tri, 0.0)
    p0, p1, p2 = tri[:, :, 0], tri[:, :, 1], tri[:, :, 2]
    e1, e2 = p1 - p0, p2 - p0
    area2 = e1[..., 0] * e2[..., 1] - e2[..., 0] * e1[..., 1]
    valid = finite & (jnp.abs(area2) > _AREA_EPS)
    safe_area2 = jnp.where(valid, area2, 1.0)
    inv = jnp.where(valid, 1.0 / safe_area2, 0.0)
    g1 = jnp.stack([e2[..., 1], -e2[..., 0]], -1) * inv[..., None]
    g2 = jnp.stack([-e1[..., 1], e1[..., 0]], -1) * inv[..., None]
    edges = jnp.stack([p2[..., :2] - p1[..., :2], e2[..., :2], e1[..., :2]], -2)
    squared = jnp.sum(edges * edges, axis=-1)
    usable = valid[..., None] & (squared > 0)
    # sqrt only of positive values: the gradient of |0| would be NaN.
    safe_lengths = jnp.sqrt(jnp.where(usable, squared, 1.0))
    altitudes = jnp.where(valid[..., None], jnp.abs(safe_area2)[..., None] / safe_lengths, 0.0)
    depth = jnp.stack([p0[..., 2], e1[..., 2], e2[..., 2]], -1)
    table = jnp.concatenate([p0[..., :2], g1, g2, altitudes, depth], -1)
    table = jnp.where(valid[..., None], table, 0.0)
    return table, valid


def _pixel_bounds(table_vertices: Array, valid: Array, height: int, width: int):
    """(F, 3, 2) pixel-space corners -> inclusive int32 pixel-index boxes clipped to the image."""
    lo = jnp.min(table_vertices, axis=1)
    hi = jnp.max(table_vertices, axis=1)
    limit = jnp.asarray([width, height], lo.dtype)
    # Pixel k is sampled at k + 0.5; clip before the int cast so huge or inf values are safe.
    first = jnp.ceil(jnp.clip(lo - 0.5, -1.0, limit)).astype(jnp.int32)
    last = jnp.floor(jnp.clip(hi - 0.5, -1.0, limit)).astype(jnp.int32)
    first = jnp.maximum(first, 0)
    last = jnp.minimum(last, jnp.asarray([width - 1, height - 1], jnp.int32))
    extent = last - first + 1
    nonempty = valid & jnp.all(extent > 0, axis=-1)
    return first, last, jnp.where(nonempty[:, None], extent, 0), nonempty


def _face_bits(num_faces: int) -> int:
    """Low bits of the int32 z-buffer key that hold the face index."""
    face_bits = max(1, num_faces.bit_length())
    if face_bits > 24:
        raise ValueError(f"{num_faces} faces leave too few depth bits in the int32 z-buffer key")
    return face_bits


def _depth_bits(face_bits: int) -> int:
    """Depth bits of the int32 key: what the face index leaves, at most 20 so that the largest
    quantised depth is exact in float32 (a rounded-up 2^k would overflow the shift)."""
    return min(31 - face_bits, 20)


def _window_keys(table, face, ok, origin, last, size, face_bits, z_lo, z_scale, width, height):
    """Evaluate `size` x `size` windows at `origin` (J, 2) for faces (J,): flat pixel ids, keys.

    Pixels outside the triangle keep a valid pixel id and get the key INT32_MAX (a no-op in the
    scatter-min), so the pixel id is a cheap affine function of the slot and not a second copy
    of the inside test.
    """
    dtype = table.dtype
    rows = table[face]
    box = last[face] - origin
    # Per-slot constants, materialised once: fused into the (J, size^2) loop they would be
    # gathered again for every pixel of the window.
    start = origin.astype(dtype) + 0.5 - rows[:, _X0:_Y0 + 1]
    l1_0 = rows[:, _G1X] * start[:, 0] + rows[:, _G1Y] * start[:, 1]
    l2_0 = rows[:, _G2X] * start[:, 0] + rows[:, _G2Y] * start[:, 1]
    slots = jnp.stack([l1_0, rows[:, _G1X], rows[:, _G1Y], l2_0, rows[:, _G2X], rows[:, _G2Y],
                       rows[:, _Z0], rows[:, _DZ1], rows[:, _DZ2]], -1)
    box = jnp.where(ok[:, None], box, -1)
    slots, box, origin, face = jax.lax.optimization_barrier((slots, box, origin, face))
    offsets = jnp.arange(size * size, dtype=jnp.int32)
    ix, iy = offsets[None] % size, offsets[None] // size
    fx, fy = ix.astype(dtype), iy.astype(dtype)
    column = lambda k: slots[:, k:k + 1]  # noqa: E731
    l1 = column(0) + column(1) * fx + column(2) * fy
    l2 = column(3) + column(4) * fx + column(5) * fy
    z = column(6) + l1 * column(7) + l2 * column(8)
    inside = ((ix <= box[:, 0:1]) & (iy <= box[:, 1:2]) & (l1 >= 0) & (l2 >= 0)
              & (l1 + l2 <= 1))
    depth_max = (1 << _depth_bits(face_bits)) - 1
    quantised = jnp.clip((z_lo - z) * z_scale, 0.0, depth_max).astype(jnp.int32)
    keys = jnp.where(inside, (quantised << face_bits) | face[:, None], _INT32_MAX)
    px = jnp.minimum(origin[:, 0:1] + ix, width - 1)
    py = jnp.minimum(origin[:, 1:2] + iy, height - 1)
    return (py * width + px).reshape(-1), keys.reshape(-1)


def _zbuffer_fragments(table: Array, corners: Array, valid: Array, settings: RasterSettings):
    """One image: (F, 12) table, (F, 3, 2) pixel corners, (F,) valid -> per class a flat pixel id
    and key array (key INT32_MAX where nothing is drawn), and the overflow count."""
    height, width = settings.height, settings.width
    num_faces = table.shape[0]
    face_bits = _face_bits(num_faces)
    first, last, extent, nonempty = _pixel_bounds(corners, valid, height, width)
    size = jnp.max(extent, axis=-1)
    z_all = table[:, _Z0:_Z0 + 1] + jnp.concatenate(
        [jnp.zeros_like(table[:, :1]), table[:, _DZ1:_DZ2 + 1]], -1)
    z_hi = jnp.max(jnp.where(nonempty[:, None], z_all, -jnp.inf))
    z_lo = jnp.min(jnp.where(nonempty[:, None], z_all, jnp.inf))
    z_range = jnp.where(jnp.isfinite(z_hi - z_lo) & (z_hi > z_lo), z_hi - z_lo, 1.0)
    z_scale = ((1 << _depth_bits(face_bits)) - 1) / z_range
    z_hi = jnp.where(jnp.isfinite(z_hi), z_hi, 0.0)

    face_ids = jnp.arange(num_faces, dtype=jnp.int32)
    capacities = settings.window_capacities or (num_faces,) * len(settings.window_sizes)
    fragments = []
    overflow = jnp.zeros((), jnp.int32)
    lower = 0
    for window, capacity in zip(settings.window_sizes, capacities):
        member = nonempty & (size > lower) & (size <= window)
        position = jnp.cumsum(member.astype(jnp.int32)) - 1
        total = position[-1] + 1
        slot_face = jnp.zeros((capacity,), jnp.int32).at[
            jnp.where(member, position, capacity)].set(face_ids, mode="drop")
        ok = jnp.arange(capacity) < total
        overflow += jnp.maximum(total - capacity, 0)
        fragments.append(_window_keys(table, slot_face, ok, first[slot_face], last, window,
                                      face_bits, z_hi, z_scale, width, height))
        lower = window

    tile = settings.tile_size
    member = nonempty & (size > lower)
    tiles_x = jnp.maximum((extent[:, 0] + tile - 1) // tile, 1)
    tiles_y = (extent[:, 1] + tile - 1) // tile
    jobs = jnp.where(member, tiles_x * tiles_y, 0)
    cumulative = jnp.cumsum(jobs)
    total = cumulative[-1]
    job = jnp.arange(settings.tile_capacity, dtype=jnp.int32)
    tile_face = jnp.minimum(jnp.searchsorted(cumulative, job, side="right"), num_faces - 1)
    local = job - (cumulative[tile_face] - jobs[tile_face])
    origin = first[tile_face] + tile * jnp.stack(
        [local % tiles_x[tile_face], local // tiles_x[tile_face]], -1)
    overflow += jnp.maximum(total - settings.tile_capacity, 0)
    fragments.append(_window_keys(table, tile_face.astype(jnp.int32), job < total, origin, last,
                                  tile, face_bits, z_hi, z_scale, width, height))
    return fragments, overflow


@functools.partial(jax.jit, static_argnames="settings")
def visibility(vertices_px: Array, faces: Array, settings: RasterSettings) -> tuple[Array, Array]:
    """Hard z-buffer (no gradient).

    Args:
      vertices_px: (B, V, 3) (u, v) pixels, z larger = closer.
      faces: (F, 3) int32.
    Returns:
      face_index (B, H, W) int32 (-1 = empty), overflow (B,) int32 (see `Fragments`).
    """
    vertices_px = jax.lax.stop_gradient(vertices_px)
    batch = vertices_px.shape[0]
    num_pixels = settings.height * settings.width
    table, valid = face_table(vertices_px, faces)
    corners = vertices_px[:, faces][..., :2]
    face_bits = _face_bits(faces.shape[0])
    single = lambda t, c, m: _zbuffer_fragments(t, c, m, settings)  # noqa: E731
    fragments, overflow = jax.vmap(single)(table, corners, valid)
    # One flat z-buffer for the whole batch (1-D scatter indices, no (image, pixel) pairs).
    offset = (jnp.arange(batch, dtype=jnp.int32) * num_pixels)[:, None]
    zbuffer = jnp.full((batch * num_pixels,), _INT32_MAX, jnp.int32)
    for pixel, key in fragments:
        zbuffer = zbuffer.at[(pixel + offset).reshape(-1)].min(key.reshape(-1), mode="drop")
    face = jnp.where(zbuffer == _INT32_MAX, -1, zbuffer & ((1 << face_bits) - 1))
    return face.reshape(batch, settings.height, settings.width), overflow


def _shifts(radius: int) -> list[tuple[int, int]]:
    """(dy, dx) offsets with |dy| + |dx| <= radius (a diamond: 5 for r = 1), centre first."""
    return [(0, 0)] + [(dy, dx) for dy in range(-radius, radius + 1)
                       for dx in range(-radius, radius + 1)
                       if (dy, dx) != (0, 0) and abs(dy) + abs(dx) <= radius]


def _barycentrics(rows: Array, x: Array, y: Array) -> Array:
    """rows (..., >= 6) table columns, pixel centres x, y (...) -> (..., 3) barycentrics."""
    dx = x - rows[..., _X0]
    dy = y - rows[..., _Y0]
    l1 = rows[..., _G1X] * dx + rows[..., _G1Y] * dy
    l2 = rows[..., _G2X] * dx + rows[..., _G2Y] * dy
    return jnp.stack([1.0 - l1 - l2, l1, l2], -1)


@functools.partial(jax.jit, static_argnames=("radius", "band_capacity"))
def interpolate(face_index: Array, table: Array, faces: Array, attributes: Array,
                sigma: float | Array, radius: int,
                band_capacity: Optional[int] = None) -> tuple[Array, Array, Array, Array]:
    """Differentiable barycentrics, attributes and soft coverage from a hard face-index map.

    Dense part: every covered pixel gathers its visible triangle and recomputes barycentrics.
    Soft part, only in the silhouette band (pixels that are not interior, i.e. the pixel or a
    neighbour is uncovered, and that have a visible triangle within L1 distance r): those
    pixels are compacted into `band_capacity` static slots per image and each evaluates its
    distinct neighbourhood triangles. Interior pixels have alpha 1, pixels with no triangle
    near have alpha 0.

    Args:
      face_index: (B, H, W) int32 visible triangle per pixel (-1 none); no gradient.
      table: (B, F, 12) from `face_table` (carries the vertex gradients).
      faces: (F, 3) int32.
      attributes: (B, V, A) per-vertex attributes.
      sigma: soft-coverage temperature in pixels (> 0).
      radius: neighbourhood radius (L1) for the soft-coverage candidates.
      band_capacity: band pixels per image; None -> `default_band_capacity`.
    Returns:
      barycentric (B, H, W, 3), attributes (B, H, W, A), alpha (B, H, W),
      band overflow (B,) int32 (band pixels beyond the capacity; they keep the hard alpha).
    """
    batch, height, width = face_index.shape
    num_pixels = height * width
    num_faces = table.shape[1]
    capacity = band_capacity or default_band_capacity(height, width)
    flat_index = face_index.reshape(batch, num_pixels)
    centre_x = (jnp.arange(num_pixels) % width).astype(table.dtype) + 0.5
    centre_y = (jnp.arange(num_pixels) // width).astype(table.dtype) + 0.5

    # Band pixels, compacted.
    shifts = _shifts(radius)
    padded = jnp.pad(face_index, ((0, 0), (radius, radius), (radius, radius)),
                     constant_values=-1)
    neighbours = jnp.stack([padded[:, radius + dy:radius + dy + height,
                                   radius + dx:radius + dx + width] for dy, dx in shifts], -1)
    neighbours = neighbours.reshape(batch, num_pixels, len(shifts))
    interior = jnp.all(neighbours >= 0, axis=-1)
    band = ~interior & jnp.any(neighbours >= 0, axis=-1)
    position = jnp.cumsum(band.astype(jnp.int32), axis=1) - 1
    count = position[:, -1] + 1
    target = jnp.where(band, position, capacity)
    pixel_ids = jnp.broadcast_to(jnp.arange(num_pixels, dtype=jnp.int32), (batch, num_pixels))
    slot_pixel = jax.vmap(lambda t, ids: jnp.full((capacity,), num_pixels, jnp.int32)
                          .at[t].set(ids, mode="drop"))(target, pixel_ids)
    slot_ok = slot_pixel < num_pixels
    safe_pixel = jnp.minimum(slot_pixel, num_pixels - 1)
    candidates = jnp.take_along_axis(neighbours, safe_pixel[..., None], axis=1)
    candidates = jnp.where(slot_ok[..., None], candidates, -1)
    distinct = [candidates[..., 0] >= 0]
    for k in range(1, len(shifts)):
        seen = jnp.any(candidates[..., :k] == candidates[..., k:k + 1], axis=-1)
        distinct.append((candidates[..., k] >= 0) & ~seen)
    distinct = jnp.stack(distinct, -1)
    rows = _take_rows(table[..., :_Z0], jnp.maximum(candidates, 0).reshape(batch, -1))
    rows = rows.reshape(batch, capacity, len(shifts), _Z0)
    slot_bary = _barycentrics(rows, centre_x[safe_pixel][..., None],
                              centre_y[safe_pixel][..., None])
    distance = jnp.min(slot_bary * rows[..., _H0:_H2 + 1], axis=-1)
    log_miss = jnp.sum(jnp.where(distinct, jax.nn.log_sigmoid(-distance / sigma), 0.0), -1)
    slot_alpha = -jnp.expm1(log_miss)
    slot_covered = candidates[..., 0] >= 0
    nearest = jnp.argmax(jnp.where(distinct, jax.lax.stop_gradient(distance), -jnp.inf), -1)
    choice = jnp.where(slot_covered, 0, nearest)
    chosen_face = jnp.take_along_axis(candidates, choice[..., None], axis=-1)[..., 0]

    # Scatter the band back (dropped for empty slots).
    scatter = jax.vmap(lambda dense, slots, values: dense.at[slots].set(values, mode="drop"))
    covered = (flat_index >= 0).astype(table.dtype)
    alpha = scatter(jnp.where(interior, 1.0, 0.0).astype(table.dtype), slot_pixel, slot_alpha)
    alpha = jnp.where(band & (position >= capacity), covered, alpha)
    # The shading triangle: the visible one, or for band pixels outside the mesh the nearest.
    shading_face = jax.lax.stop_gradient(scatter(flat_index, slot_pixel, chosen_face))

    # Dense: one gather per pixel of the shading triangle's barycentric rows and its corner
    # attributes (one (F, 6 + 3A) table: one gather and one backward scatter-add).
    num_attributes = attributes.shape[-1]
    corner_table = attributes[:, faces].reshape(batch, num_faces, 3 * num_attributes)
    pixel_rows = _take_rows(jnp.concatenate([table[..., :_H0], corner_table], -1),
                            jnp.maximum(shading_face, 0))
    bary = _barycentrics(pixel_rows, centre_x, centre_y)
    bary = jnp.maximum(bary, 0.0)
    bary = bary / jnp.maximum(jnp.sum(bary, -1, keepdims=True), 1e-12)
    bary = jnp.where((shading_face >= 0)[..., None], bary, 0.0)
    corners = pixel_rows[..., _H0:]
    # An explicit sum: a dot_general with 400k batch dims of 3 x A matrices is slow on CPU.
    interpolated = sum(bary[..., k, None] * corners[..., k * num_attributes:
                                                    (k + 1) * num_attributes]
                       for k in range(3))
    shape = (batch, height, width)
    return (bary.reshape(*shape, 3), interpolated.reshape(*shape, num_attributes),
            alpha.reshape(shape), jnp.maximum(count - capacity, 0))


def _take_rows(table: Array, index: Array) -> Array:
    """table (B, F, C), index (B, N) int in [0, F) -> (B, N, C), as one flat 1-D gather (its
    backward is one scatter-add into (B F, C))."""
    batch, num_faces, columns = table.shape
    flat = index + num_faces * jnp.arange(batch, dtype=index.dtype)[:, None]
    rows = jnp.take(table.reshape(batch * num_faces, columns), flat.reshape(-1), axis=0,
                    mode="clip")
    return rows.reshape(*index.shape, columns)


def default_band_capacity(height: int, width: int) -> int:
    """Silhouette-band slots per image when `band_capacity` is None: the band of a mesh is a
    few pixels wide along its outline, so it scales with H + W rather than with H * W."""
    return max(1, min(height * width // 4, 8 * (height + width)))


@functools.partial(jax.jit, static_argnames="settings")
def rasterize(vertices_px: Array, faces: Array, attributes: Array, settings: RasterSettings,
              sigma: float | Array = 0.5) -> Fragments:
    """Rasterize B meshes sharing `faces` and interpolate per-vertex attributes.

    Args:
      vertices_px: (B, V, 3) screen vertices: (u, v) pixels, z larger = closer
        (`recon.render.camera.project_to_pixels`).
      faces: (F, 3) int32 vertex indices.
      attributes: (B, V, A) per-vertex attributes (colours, normals, depth, ...).
      settings: static `RasterSettings`.
      sigma: soft-coverage temperature in pixels (> 0); smaller is closer to hard coverage.
    Returns:
      `Fragments`; gradients flow to `vertices_px` (barycentrics and alpha) and `attributes`.
    """
    if vertices_px.ndim != 3 or vertices_px.shape[-1] != 3:
        raise ValueError(f"vertices_px must be (B, V, 3), got shape {vertices_px.shape}")
    if faces.ndim != 2 or faces.shape[-1] != 3:
        raise ValueError(f"faces must be (F, 3), got shape {faces.shape}")
    if attributes.ndim != 3 or attributes.shape[:2] != vertices_px.shape[:2]:
        raise ValueError(f"attributes must be (B, V, A) matching vertices {vertices_px.shape[:2]},"
                         f" got shape {attributes.shape}")
    face_index, overflow = visibility(vertices_px, faces, settings)
    table, _ = face_table(vertices_px, faces)
    bary, interpolated, alpha, band_overflow = interpolate(
        face_index, table, faces, attributes, sigma, settings.soft_radius,
        settings.band_capacity)
    return Fragments(face_index=face_index, barycentric=bary, attributes=interpolated,
                     alpha=alpha, overflow=overflow + band_overflow)
