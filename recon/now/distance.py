"""Exact unsigned point-to-triangle-mesh distances (numpy float64, no JAX).

`MeshDistance` wraps libigl's AABB tree: built once per mesh, queried many times (the alignment
refinement queries the same mesh at every iteration, see `recon.now.protocol`). Why libigl: it
is exact (closed-form point-to-triangle over the vertex, edge and face regions), handles
degenerate triangles, exposes a reusable tree, and measured 1.4 us per point for ~70k scan
points against a FLAME mesh, tree included (`benchmarks/now_scorer.py`, equal to brute force to
1e-13 mm). trimesh's `proximity.closest_point` needs the `rtree` package, which is not installed
here, and rebuilds its candidate search per call; it was not measured.

`point_triangle_distance_reference` is the slow, independent numpy reference used by the tests
and the benchmark: for every point and every triangle it takes the minimum over the interior
projection (when it falls inside), the three edge segments and the three vertices.
"""

from __future__ import annotations

import numpy as np


def _as_points(points: np.ndarray, name: str) -> np.ndarray:
    points = np.ascontiguousarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"{name} must be (N, 3), got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return points


def _as_faces(faces: np.ndarray, num_vertices: int) -> np.ndarray:
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.shape[0] == 0:
        raise ValueError(f"faces must be (F>0, 3), got {faces.shape}")
    if faces.min() < 0 or faces.max() >= num_vertices:
        raise ValueError(f"faces index vertices outside [0, {num_vertices})")
    return faces


class MeshDistance:
    """Closest points on a fixed triangle mesh.

    Args:
      vertices: (V, 3) float, any unit (distances come back in the same unit).
      faces: (F, 3) int vertex indices.
    """

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        import igl  # libigl; imported here so that readers work without it

        self.vertices = _as_points(vertices, "mesh vertices")
        self.faces = _as_faces(faces, len(self.vertices))
        self._tree = igl.AABB()
        self._tree.init(self.vertices, self.faces)

    def query(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, 3) points -> (squared distances (N,), triangle index (N,), closest points (N, 3))."""
        points = _as_points(points, "query points")
        squared, triangle, closest = self._tree.squared_distance(self.vertices, self.faces, points)
        return squared, triangle, closest

    def distance(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) -> (N,) unsigned distances."""
        return np.sqrt(self.query(points)[0])


def point_mesh_distance(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(N,) exact unsigned distance from each of `points` (N, 3) to the mesh (vertices, faces)."""
    return MeshDistance(vertices, faces).distance(points)


def _segment_squared_distance(points, start, end):
    """(N, 1, 3) points, (1, F, 3) segment ends -> (N, F) squared distance to the segments."""
    direction = end - start
    length2 = np.maximum(np.sum(direction * direction, -1), 1e-300)
    t = np.clip(np.sum((points - start) * direction, -1) / length2, 0.0, 1.0)
    nearest = start + t[..., None] * direction
    return np.sum((points - nearest) ** 2, -1)


def point_triangle_distance_reference(points: np.ndarray, vertices: np.ndarray,
                                      faces: np.ndarray, *, chunk: int = 256) -> np.ndarray:
    """Brute-force (N,) unsigned distance; O(N F) memory per chunk of points. Tests only.

    Minimum over triangles of: the distance to the plane when the orthogonal projection lies
    inside the triangle (barycentric test), else the distance to the nearest of the three edges
    (which includes the vertices as segment ends). Written independently of libigl.
    """
    points = _as_points(points, "points")
    vertices = _as_points(vertices, "vertices")
    faces = _as_faces(faces, len(vertices))
    a, b, c = (vertices[faces[:, k]][None] for k in range(3))  # (1, F, 3)
    normal = np.cross(b - a, c - a)
    normal_len = np.linalg.norm(normal, axis=-1)
    out = np.empty(len(points))
    for start in range(0, len(points), chunk):
        p = points[start:start + chunk, None, :]  # (n, 1, 3)
        edges = np.minimum(np.minimum(_segment_squared_distance(p, a, b),
                                      _segment_squared_distance(p, b, c)),
                           _segment_squared_distance(p, c, a))
        unit = normal / np.maximum(normal_len, 1e-300)[..., None]
        height = np.sum((p - a) * unit, -1)
        projected = p - height[..., None] * unit
        # Inside test: the projection is on the inner side of all three edges.
        inside = ((np.sum(np.cross(b - a, projected - a) * normal, -1) >= 0)
                  & (np.sum(np.cross(c - b, projected - b) * normal, -1) >= 0)
                  & (np.sum(np.cross(a - c, projected - c) * normal, -1) >= 0)
                  & (normal_len > 0))
        face = np.where(inside, height ** 2, np.inf)
        out[start:start + chunk] = np.sqrt(np.min(np.minimum(face, edges), axis=1))
    return out
