"""Down- and up-sampling operators between mesh levels (numpy/scipy, host side, run once).

Down-sampling is CoMA's quadric-error edge collapse that keeps one endpoint of each collapsed
edge (Garland-Heckbert quadrics, placement restricted to the two endpoints), so the coarse mesh's
vertices are a subset of the fine mesh's and D is a 0/1 selection. Up-sampling places each fine
vertex at the barycentric coordinates of its closest point on the coarse surface.

We write the collapse ourselves instead of using `fast_simplification`: that library targets a
triangle count, moves vertices to the optimal quadric position and collapses in threshold
sweeps, so it can neither hit ceil(N / factor) vertices exactly nor keep original vertices.
"""

from __future__ import annotations

import heapq
import math
from typing import NamedTuple

import numpy as np

from spectral_gcn.laplacian import check_faces


class Decimation(NamedTuple):
    """Result of one collapse level.

      kept:  (M,) int64 sorted indices of the fine vertices that survive (D selects these rows).
      faces: (F', 3) int64 coarse triangles, indexing the M survivors (0..M-1).
    """

    kept: np.ndarray
    faces: np.ndarray


def vertex_quadrics(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(N, 4, 4) float64 sum of the outer products of the unit plane equations of each vertex's
    triangles (unweighted, as CoMA). Degenerate triangles contribute nothing."""
    tri = vertices[faces]
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    norm = np.linalg.norm(normal, axis=1, keepdims=True)
    valid = norm[:, 0] > 0
    normal = np.where(valid[:, None], normal / np.where(norm > 0, norm, 1.0), 0.0)
    offset = -np.einsum("fi,fi->f", normal, tri[:, 0])
    plane = np.concatenate([normal, offset[:, None]], axis=1)
    outer = plane[:, :, None] * plane[:, None, :]
    quadrics = np.zeros((vertices.shape[0], 4, 4))
    for corner in range(3):
        np.add.at(quadrics, faces[:, corner], outer)
    return quadrics


def _point_cost(quadric: np.ndarray, points: np.ndarray) -> np.ndarray:
    """(E,) p^T Q p for homogeneous points p = [x, 1]; quadric (E, 4, 4), points (E, 3)."""
    homogeneous = np.concatenate([points, np.ones((points.shape[0], 1))], axis=1)
    return np.einsum("ei,eij,ej->e", homogeneous, quadric, homogeneous)


def quadric_decimate(vertices: np.ndarray, faces: np.ndarray, target: int) -> Decimation:
    """Collapse edges of lowest quadric error until `target` vertices remain.

    vertices: (N, 3) float positions; faces: (F, 3) int triangles; target: 1 <= target <= N.
    Each collapse merges the two endpoint quadrics and keeps the endpoint of lower error
    (the lower index on a tie), so exactly one vertex disappears per step. A collapse that would
    leave some vertex in no triangle is skipped. Costs are kept exact by stamping heap entries
    with per-vertex versions. Deterministic: ties in the heap are broken by vertex indices.
    Raises ValueError when no valid collapse is left before reaching `target`.
    """
    vertices = np.asarray(vertices, np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"vertices must have shape (N, 3), got {vertices.shape}")
    num_vertices = vertices.shape[0]
    faces = check_faces(faces, num_vertices).copy()
    if not 1 <= target <= num_vertices:
        raise ValueError(f"target must be in [1, {num_vertices}], got {target}")
    used = np.zeros(num_vertices, bool)
    used[faces.ravel()] = True
    if not used.all():
        raise ValueError(f"{int((~used).sum())} vertices are in no triangle; remove them first")

    quadrics = vertex_quadrics(vertices, faces)
    vertex_faces = [set() for _ in range(num_vertices)]
    for face_index, face in enumerate(faces.tolist()):
        for vertex in face:
            vertex_faces[vertex].add(face_index)
    neighbours = [set() for _ in range(num_vertices)]
    for a, b in ((0, 1), (1, 2), (2, 0)):
        for u, v in zip(faces[:, a].tolist(), faces[:, b].tolist()):
            if u != v:
                neighbours[u].add(v)
                neighbours[v].add(u)
    face_alive = np.ones(len(faces), bool)
    alive = np.ones(num_vertices, bool)
    version = np.zeros(num_vertices, np.int64)

    def edge_entries(first: np.ndarray, second: np.ndarray):
        summed = quadrics[first] + quadrics[second]
        keep_first = _point_cost(summed, vertices[first])
        keep_second = _point_cost(summed, vertices[second])
        cost = np.minimum(keep_first, keep_second)
        return [(c, a, b, version[a], version[b])
                for c, a, b in zip(cost.tolist(), first.tolist(), second.tolist())]

    edges = np.array(sorted((u, v) for u in range(num_vertices) for v in neighbours[u] if u < v),
                     np.int64).reshape(-1, 2)
    heap = edge_entries(edges[:, 0], edges[:, 1])
    heapq.heapify(heap)

    remaining = num_vertices
    while remaining > target:
        if not heap:
            raise ValueError(f"quadric decimation stopped at {remaining} vertices: no edge can be "
                             f"collapsed without isolating a vertex (target {target})")
        _, a, b, version_a, version_b = heapq.heappop(heap)
        if not (alive[a] and alive[b]) or version[a] != version_a or version[b] != version_b:
            continue
        summed = quadrics[a] + quadrics[b]
        cost_keep_a, cost_keep_b = _point_cost(np.stack([summed, summed]), vertices[[a, b]])
        keep, gone = (a, b) if cost_keep_a <= cost_keep_b else (b, a)

        shared = vertex_faces[a] & vertex_faces[b]
        merged = (vertex_faces[a] | vertex_faces[b]) - shared
        orphaned = not merged or any(
            vertex_faces[w] <= shared
            for w in {int(x) for f in shared for x in faces[f]} - {a, b})
        if orphaned:
            continue

        for face_index in shared:
            face_alive[face_index] = False
            for vertex in faces[face_index].tolist():
                vertex_faces[vertex].discard(face_index)
        for face_index in vertex_faces[gone]:
            faces[face_index][faces[face_index] == gone] = keep
        vertex_faces[keep] = merged
        vertex_faces[gone] = set()
        for vertex in neighbours[gone]:
            neighbours[vertex].discard(gone)
            if vertex != keep:
                neighbours[vertex].add(keep)
                neighbours[keep].add(vertex)
        neighbours[keep].discard(gone)
        neighbours[gone] = set()
        alive[gone] = False
        quadrics[keep] = summed
        version[keep] += 1
        remaining -= 1

        others = np.array(sorted(neighbours[keep]), np.int64)
        if others.size:
            first = np.minimum(others, keep)
            second = np.maximum(others, keep)
            for entry in edge_entries(first, second):
                heapq.heappush(heap, entry)

    kept = np.flatnonzero(alive)
    remap = np.full(num_vertices, -1, np.int64)
    remap[kept] = np.arange(kept.size)
    coarse = remap[faces[face_alive]]
    coarse = coarse[(coarse[:, 0] != coarse[:, 1]) & (coarse[:, 1] != coarse[:, 2])
                    & (coarse[:, 2] != coarse[:, 0])]
    # Collapses can leave two triangles over the same three vertices; keep the first of each.
    _, first_index = np.unique(np.sort(coarse, axis=1), axis=0, return_index=True)
    coarse = coarse[np.sort(first_index)]
    return Decimation(kept=kept, faces=coarse)


def closest_point_barycentric(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                              chunk: int = 128):
    """Closest point of each query point on a triangle mesh, by brute force over all triangles.

    points: (P, 3); vertices: (M, 3); faces: (F, 3).
    Returns (face_index (P,) int64, barycentric (P, 3) float64 >= 0 summing to one,
    distance (P,) float64). Ericson's region test (Real-Time Collision Detection, 5.1.5);
    the first triangle wins a tie, so the result is deterministic.
    """
    points = np.asarray(points, np.float64)
    a, b, c = (np.asarray(vertices, np.float64)[faces[:, k]][None] for k in range(3))
    ab, ac = b - a, c - a
    face_out = np.empty(points.shape[0], np.int64)
    bary_out = np.empty((points.shape[0], 3))
    dist_out = np.empty(points.shape[0])
    dot = lambda x, y: np.einsum("pfi,pfi->pf", x, y)  # noqa: E731
    for start in range(0, points.shape[0], chunk):
        p = points[start:start + chunk, None, :]
        ap, bp, cp = p - a, p - b, p - c
        d1, d2 = dot(np.broadcast_to(ab, ap.shape), ap), dot(np.broadcast_to(ac, ap.shape), ap)
        d3, d4 = dot(np.broadcast_to(ab, bp.shape), bp), dot(np.broadcast_to(ac, bp.shape), bp)
        d5, d6 = dot(np.broadcast_to(ab, cp.shape), cp), dot(np.broadcast_to(ac, cp.shape), cp)
        vc = d1 * d4 - d3 * d2
        vb = d5 * d2 - d1 * d6
        va = d3 * d6 - d5 * d4
        with np.errstate(divide="ignore", invalid="ignore"):
            t_ab = np.nan_to_num(d1 / (d1 - d3))
            t_ac = np.nan_to_num(d2 / (d2 - d6))
            t_bc = np.nan_to_num((d4 - d3) / ((d4 - d3) + (d5 - d6)))
            total = va + vb + vc
            v_in = np.nan_to_num(vb / total)
            w_in = np.nan_to_num(vc / total)
        one, zero = np.ones_like(d1), np.zeros_like(d1)
        conditions = [
            (d1 <= 0) & (d2 <= 0),
            (d3 >= 0) & (d4 <= d3),
            (vc <= 0) & (d1 >= 0) & (d3 <= 0),
            (d6 >= 0) & (d5 <= d6),
            (vb <= 0) & (d2 >= 0) & (d6 <= 0),
            (va <= 0) & (d4 - d3 >= 0) & (d5 - d6 >= 0),
        ]
        weight_b = np.select(conditions, [zero, one, t_ab, zero, zero, 1 - t_bc], v_in)
        weight_c = np.select(conditions, [zero, zero, zero, one, t_ac, t_bc], w_in)
        weight_b, weight_c = np.clip(weight_b, 0, 1), np.clip(weight_c, 0, 1)
        weight_c = np.minimum(weight_c, 1 - weight_b)
        weight_a = 1 - weight_b - weight_c
        closest = weight_a[..., None] * a + weight_b[..., None] * b + weight_c[..., None] * c
        distance = np.linalg.norm(closest - p, axis=-1)
        best = np.argmin(distance, axis=1)
        rows = np.arange(best.size)
        face_out[start:start + chunk] = best
        bary_out[start:start + chunk] = np.stack(
            [weight_a[rows, best], weight_b[rows, best], weight_c[rows, best]], axis=1)
        dist_out[start:start + chunk] = distance[rows, best]
    return face_out, bary_out, dist_out


def upsampling(fine_vertices: np.ndarray, coarse_vertices: np.ndarray, coarse_faces: np.ndarray):
    """Barycentric up-sampling from a coarse mesh to the fine vertices.

    Returns (indices (N, 3) int32 into the coarse vertices, weights (N, 3) float64): fine vertex
    i is sum_k weights[i, k] * coarse[indices[i, k]]. A fine vertex that coincides with a coarse
    vertex gets weight one on it (up to rounding), so U D reproduces the kept vertices.
    """
    face, bary, _ = closest_point_barycentric(fine_vertices, coarse_vertices, coarse_faces)
    return coarse_faces[face].astype(np.int32), bary


def level_sizes(num_vertices: int, factors) -> tuple:
    """Vertex counts of every level: N, ceil(N / f1), ceil(ceil(N / f1) / f2), ..."""
    sizes = [int(num_vertices)]
    for factor in factors:
        sizes.append(int(math.ceil(sizes[-1] / factor)))
    return tuple(sizes)
