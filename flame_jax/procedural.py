"""The built-in FLAME model: real FLAME topology and identity space, procedurally completed.

`synthetic(seed)` returns a `FlameModel` in the exact layout of the official FLAME model
(5023 vertices, 9976 triangles, 5 joints, posedirs (36, 15069)) without any licensed download.

Real data (shipped in `flame_jax/assets`, see `NOTICE.md` there for sources and licenses):
  - `v_template` (5023, 3), `faces` (9976, 3) and identity components 1..60 (`shapedirs[..., :60]`)
    of FLAME 2023 Open (CC-BY-4.0, MPI-IS), exactly as published (orthogonal, scaled so that a
    unit coefficient is one standard deviation).
  - the static 51-point and dynamic 79 x 17 jaw-contour landmark embeddings (RingNet, MIT).

Generated here with numpy from the template geometry (nothing is fitted to scans; the arrays only
behave like FLAME's, they are not FLAME's):
  - identity components 61..num_shape (seed): smooth Gaussian random fields over template
    positions (length scale 4.5 cm shrinking with the index), translating each eyeball rigidly
    (up to the ~2% non-rigidity the real components carry), orthogonal to the real components
    and to each other (so, as in PCA, later ones hold finer detail), with norms continuing the
    power law fitted to the real components 21..60.
  - expression basis (V, 3, num_expression): 20 hand-designed, seed-independent components
    (jaw open / sideways / forward, smile, frown, lip stretch / pucker / press, upper-lip raise,
    lower-lip depress, mouth shift, cheek puff, brow raise / frown, eyelid close left / right,
    squint, nose wrinkle, one-sided smiles), then localised smooth random blobs on the face
    (seed), biased to the lower face. Peak displacement 5 mm for component 1, decaying as
    k^-0.35 to 1 mm for component 100. Zero on the eyeballs, negligible on ears and scalp.
  - j_regressor (seed-independent): root and neck are centroids of vertex rings on the neck,
    the jaw joint the midpoint of the two jaw-hinge patches, each eye joint its eyeball centroid.
  - lbs_weights (seed-independent): eyeballs rigid to their eye joint; lower lip, chin and jaw
    to the jaw with a smooth falloff; the neck base to the root; the rest of the head to the neck.
  - posedirs (seed-independent): small pose correctives for neck and jaw rotation (a throat and
    under-chin bulge, neck-side folds), a few millimetres per unit entry of (R - I); zero for
    the eyes.
  - albedo_mean (skin, darker lips and brows, sclera/iris/pupil on the eyeballs) and a smooth
    albedo_basis (brightness, redness, yellowness, then random smooth colour fields; seed).
  - masks (seed-independent) from geodesic distances to landmarks and simple geometric cuts:
    face, nose, lips, forehead, eye_region, left/right_eye_region, left/right_ear, neck, scalp,
    boundary, and the exact eyeball index ranges (3931..4476 left, 4477..5022 right).
  - the MediaPipe embedding stays None (its license is unclear; it is loaded from user files).

Template frame (metres): +x is the subject's left, +y up, +z forward (the face looks to +z).
The jaw joint lies behind and above the chin, so a positive jaw_pose[0] (rotation about +x)
moves the chin down and back: it opens the mouth, as in FLAME.

The shipped real arrays are read by `flame_jax.shipped` (`load_topology`,
`load_landmark_embedding`). This module is `flame_jax.procedural`; the package attribute
`flame_jax.synthetic` is its `synthetic` function.
"""

from __future__ import annotations

import functools
from typing import Dict, Sequence

import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.sparse as sp
from scipy.sparse.csgraph import dijkstra

from flame_jax import shipped
from flame_jax.model import NUM_JOINTS, FlameModel, from_numpy
from flame_jax.shipped import NUM_REAL_SHAPE
NUM_SEMANTIC_EXPRESSIONS = 20
LEFT_EYEBALL = (3931, 4477)  # [start, stop) vertex range
RIGHT_EYEBALL = (4477, 5023)
NUM_HEAD_VERTICES = LEFT_EYEBALL[0]

# ----------------------------------------------------------------------------- shipped assets

def _read_only(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    for value in arrays.values():
        value.setflags(write=False)  # cached: callers get copies or must not write
    return arrays


@functools.lru_cache(maxsize=None)
def _shipped() -> Dict[str, np.ndarray]:
    """The shipped real arrays (topology + landmark embedding), read once, read-only."""
    return _read_only({**shipped.load_topology(), **shipped.load_landmark_embedding()})


# ----------------------------------------------------------------------------- mesh helpers

class _Mesh:
    """Template mesh with the graph structures the builders share (float64 numpy)."""

    def __init__(self, vertices: np.ndarray, faces: np.ndarray):
        self.vertices = vertices.astype(np.float64)
        self.faces = faces
        n = len(vertices)
        edges = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        sorted_edges = np.sort(edges, axis=1)
        unique, counts = np.unique(sorted_edges, axis=0, return_counts=True)
        self.boundary_vertices = np.unique(unique[counts == 1])
        lengths = np.linalg.norm(self.vertices[unique[:, 0]] - self.vertices[unique[:, 1]], axis=1)
        graph = sp.coo_matrix((lengths, (unique[:, 0], unique[:, 1])), shape=(n, n)).tocsr()
        self.graph = graph + graph.T
        adjacency = (self.graph > 0).astype(np.float64)
        degree = np.asarray(adjacency.sum(axis=1)).ravel()
        self.mean_neighbour = sp.diags(1.0 / degree) @ adjacency  # row-stochastic
        normals = np.zeros_like(self.vertices)
        tri = self.vertices[faces]
        face_normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
        for k in range(3):
            np.add.at(normals, faces[:, k], face_normals)
        self.normals = normals / np.linalg.norm(normals, axis=1, keepdims=True)
        self.head = np.arange(n) < NUM_HEAD_VERTICES

    def nearest_head_vertex(self, points: np.ndarray) -> np.ndarray:
        points = np.atleast_2d(points)
        head = self.vertices[:NUM_HEAD_VERTICES]
        return np.argmin(((head[None] - points[:, None]) ** 2).sum(-1), axis=1)

    def geodesic(self, points: np.ndarray) -> np.ndarray:
        """(V,) edge-path distance (m) to the nearest of `points` (snapped to head vertices)."""
        sources = np.unique(self.nearest_head_vertex(points))
        return dijkstra(self.graph, indices=sources, min_only=True)

    def smooth(self, values: np.ndarray, steps: int) -> np.ndarray:
        """Explicit diffusion x <- (x + mean of neighbours) / 2, `steps` times; (V, ...) in/out."""
        flat = values.reshape(len(values), -1)
        for _ in range(steps):
            flat = 0.5 * flat + 0.5 * (self.mean_neighbour @ flat)
        return flat.reshape(values.shape)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _sigmoid(t: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * t))


def _below_line(mesh: _Mesh, point0: Sequence[float], point1: Sequence[float]) -> np.ndarray:
    """(V,) signed height (m) below the line through two (z, y) points in the sagittal plane."""
    z, y = mesh.vertices[:, 2], mesh.vertices[:, 1]
    t = (z - point0[0]) / (point1[0] - point0[0])
    return point0[1] + t * (point1[1] - point0[1]) - y


def _anchors(mesh: _Mesh, embedding: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Named template points (m) from the real landmark embedding plus a few hand-set ones."""
    v, f = mesh.vertices, mesh.faces
    static = (v[f[embedding["static_lmk_faces"]]] * embedding["static_lmk_bary"][..., None]).sum(1)
    contour = (v[f[embedding["dynamic_lmk_faces"][39]]]
               * embedding["dynamic_lmk_bary"][39][..., None]).sum(1)  # frontal (yaw 0) bin
    hinge = contour[2] * np.array([np.sign(contour[2, 0]), 1.0, 1.0])  # left (+x) jaw hinge
    mirror = np.array([-1.0, 1.0, 1.0])
    ear = np.array([0.077, -0.005, -0.055])  # left ear centre, read off the template
    return {
        "nose_tip": static[13], "nose_bridge": static[12], "nostrils": static[[14, 18]],
        "brows": static[0:10], "inner_brows": static[[3, 4, 5, 6]],
        "right_eye": static[19:25], "left_eye": static[25:31],
        "right_upper_lid": static[20:22], "left_upper_lid": static[26:28],
        "lower_lids": static[[23, 24, 29, 30]],
        "lips": static[31:51], "mouth_corners": static[[31, 37]],
        "upper_lip": static[[32, 33, 34, 35, 36, 44, 45, 46]],
        "lower_lip": static[[38, 39, 40, 41, 42, 48, 49, 50]],
        "hinges": np.stack([hinge, hinge * mirror]),
        "left_ear": ear, "right_ear": ear * mirror,
        "cheeks": np.array([[0.045, -0.02, 0.035], [-0.045, -0.02, 0.035]]),
        "throat": np.array([0.0, -0.12, 0.0]),
        "under_chin": np.array([0.0, -0.105, 0.025]),
        "left_eyeball_centre": v[LEFT_EYEBALL[0]:LEFT_EYEBALL[1]].mean(0),
        "right_eyeball_centre": v[RIGHT_EYEBALL[0]:RIGHT_EYEBALL[1]].mean(0),
    }


def _blob(mesh: _Mesh, points: np.ndarray, radius: float) -> np.ndarray:
    """(V,) geodesic Gaussian exp(-d^2 / 2 r^2) around `points`; zero off the head."""
    distance = mesh.geodesic(points)
    return np.where(mesh.head, np.exp(-0.5 * (distance / radius) ** 2), 0.0)


def _neck_cut_distance(mesh: _Mesh) -> np.ndarray:
    """(V,) edge-path distance (m) to the open rim at the neck base (the other rim, higher
    up, is the mouth slit)."""
    neck_cut = mesh.boundary_vertices[mesh.vertices[mesh.boundary_vertices, 1] < -0.1]
    return dijkstra(mesh.graph, indices=neck_cut, min_only=True)


# ----------------------------------------------------------------------------- masks

def _masks(mesh: _Mesh, anchors: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Boolean (V,) regions from geodesic distances to landmarks and cuts in template
    coordinates (metres); the thresholds were chosen on the template by comparing with the
    published FLAME vertex masks (IoU in tests/test_synthetic.py), not copied from them."""
    v, head = mesh.vertices, mesh.head
    x, y, z = v.T
    masks = {}
    masks["face"] = head & (mesh.geodesic(anchors["nose_bridge"]) < 0.14)
    masks["nose"] = head & (mesh.geodesic(anchors["nose_tip"]) < 0.038)
    masks["lips"] = head & (mesh.geodesic(anchors["lips"]) < 0.008)
    masks["left_eye_region"] = head & (mesh.geodesic(anchors["left_eye"]) < 0.012)
    masks["right_eye_region"] = head & (mesh.geodesic(anchors["right_eye"]) < 0.012)
    masks["eye_region"] = masks["left_eye_region"] | masks["right_eye_region"]
    brows = anchors["brows"][np.argsort(anchors["brows"][:, 0])]
    brow_height = np.interp(x, brows[:, 0], brows[:, 1])
    masks["forehead"] = masks["face"] & (y > brow_height) & (y < 0.09)  # below the hairline
    for side in ("left", "right"):
        sign = 1.0 if side == "left" else -1.0
        masks[f"{side}_ear"] = (head & (sign * x > 0.055)
                                & (np.linalg.norm(v - anchors[f"{side}_ear"], axis=1) < 0.035))
    ears = masks["left_ear"] | masks["right_ear"]
    masks["face"] &= ~ears
    masks["neck"] = head & (_below_line(mesh, (0.045, -0.095), (-0.06, -0.05)) > 0) & (z > -0.12)
    masks["scalp"] = (head & ~masks["face"] & ~ears & ((z < -0.04) | (y > 0.05))
                      & (y > -0.14))  # back and top of the head, down to the nape
    masks["boundary"] = head & (_neck_cut_distance(mesh) < 0.03)
    masks["left_eyeball"] = np.zeros(len(v), bool)
    masks["left_eyeball"][LEFT_EYEBALL[0]:LEFT_EYEBALL[1]] = True
    masks["right_eyeball"] = np.zeros(len(v), bool)
    masks["right_eyeball"][RIGHT_EYEBALL[0]:RIGHT_EYEBALL[1]] = True
    return masks


# ----------------------------------------------------------------------------- skeleton

def _j_regressor(mesh: _Mesh, anchors: Dict[str, np.ndarray]) -> np.ndarray:
    """(5, V) nonnegative rows summing to one: root, neck, jaw, left eye, right eye."""
    n = len(mesh.vertices)
    regressor = np.zeros((NUM_JOINTS, n))
    cut_distance = _neck_cut_distance(mesh)
    for row, (low, high) in ((0, (0.0, 0.012)), (1, (0.055, 0.065))):
        ring = mesh.head & (cut_distance >= low) & (cut_distance < high)  # rings around the neck
        regressor[row, ring] = 1.0 / ring.sum()
    for hinge in anchors["hinges"]:  # half the weight on each side puts the joint on the midline
        patch = mesh.head & (np.linalg.norm(mesh.vertices - hinge, axis=1) < 0.012)
        regressor[2, patch] += 0.5 / patch.sum()
    for row, (start, stop) in ((3, LEFT_EYEBALL), (4, RIGHT_EYEBALL)):
        regressor[row, start:stop] = 1.0 / (stop - start)
    return regressor


def _jaw_weight(mesh: _Mesh, anchors: Dict[str, np.ndarray], ears: np.ndarray) -> np.ndarray:
    """(V,) in [0, 1]: lower lip, chin and jaw, fading over the throat and towards the hinge."""
    z = mesh.vertices[:, 2]
    corner = anchors["mouth_corners"].mean(0)
    hinge = anchors["hinges"][0]
    below_mouth = _sigmoid(_below_line(mesh, (corner[2], corner[1]), (hinge[2], hinge[1])) / 0.003)
    # Distance in front of / above the throat line, in the sagittal plane.
    throat = _sigmoid(-_below_line(mesh, (0.0, -0.125), (-0.05, -0.065)) / 0.008)
    front_of_hinge = _sigmoid((z - hinge[2] - 0.008) / 0.004)  # ~0 behind the ear's front
    weight = below_mouth * throat * front_of_hinge
    upper = mesh.geodesic(anchors["upper_lip"])
    lower = mesh.geodesic(anchors["lower_lip"])
    lip_zone = np.minimum(upper, lower) < 0.012
    weight = np.where(lip_zone, (lower < upper).astype(np.float64), weight)
    weight = np.where(ears | ~mesh.head, 0.0, weight)
    weight = mesh.smooth(weight, 6)  # diffusion does not cross the mouth slit (a mesh hole)
    return np.where(mesh.head & ~ears, weight, 0.0)


def _lbs_weights(mesh: _Mesh, jaw: np.ndarray) -> np.ndarray:
    """(V, 5) nonnegative rows summing to one."""
    n = len(mesh.vertices)
    weights = np.zeros((n, NUM_JOINTS))
    cut_distance = _neck_cut_distance(mesh)
    root = np.where(mesh.head, 1.0 - _smoothstep(cut_distance / 0.035), 0.0)
    jaw = jaw * (1.0 - root)
    weights[:, 0] = root
    weights[:, 2] = jaw
    weights[:, 1] = np.where(mesh.head, 1.0 - root - jaw, 0.0)
    weights[LEFT_EYEBALL[0]:LEFT_EYEBALL[1], 3] = 1.0
    weights[RIGHT_EYEBALL[0]:RIGHT_EYEBALL[1], 4] = 1.0
    return np.clip(weights, 0.0, None) / np.clip(weights, 0.0, None).sum(1, keepdims=True)


def _posedirs(mesh: _Mesh, anchors: Dict[str, np.ndarray], neck_band: np.ndarray) -> np.ndarray:
    """(36, V * 3) smplx layout: row 9 j + 3 r + c scales entry (r, c) of (R_j - I), j over
    (neck, jaw, left eye, right eye); column 3 v + d. Each field sits with +1/2 and -1/2 on an
    antisymmetric pair, so a rotation by t about that axis moves the vertices by sin(t) * field
    (metres); the eye rows are zero."""
    n = len(mesh.vertices)
    posedirs = np.zeros((4, 3, 3, n, 3))
    normals, x = mesh.normals, mesh.vertices[:, 0]

    def rotation_pair(joint, axis, field):
        r, c = {0: (2, 1), 1: (0, 2), 2: (1, 0)}[axis]  # (R - I)[r, c] = +sin(t) about `axis`
        posedirs[joint, r, c] += 0.5 * field
        posedirs[joint, c, r] -= 0.5 * field

    throat = _blob(mesh, anchors["throat"], 0.025)[:, None] * normals
    neck_side = (np.sign(x) * neck_band * _blob(mesh, anchors["throat"], 0.05))[:, None] * normals
    under_chin = _blob(mesh, anchors["under_chin"], 0.018)[:, None] * normals
    cheeks = _blob(mesh, anchors["cheeks"], 0.015)[:, None] * normals
    rotation_pair(0, 0, 0.004 * throat)       # nodding: skin of the throat folds
    rotation_pair(0, 1, 0.003 * neck_side)    # turning: one side folds, the other stretches
    rotation_pair(1, 0, 0.004 * under_chin - 0.0015 * cheeks)  # jaw opening
    posedirs[..., ~mesh.head, :] = 0.0
    return posedirs.reshape(36, n * 3)


# ----------------------------------------------------------------------------- identity

def _farthest_points(points: np.ndarray, count: int) -> np.ndarray:
    chosen = [int(np.argmax(points[:, 1]))]
    distance = np.linalg.norm(points - points[chosen[0]], axis=1)
    for _ in range(count - 1):
        chosen.append(int(np.argmax(distance)))
        distance = np.minimum(distance, np.linalg.norm(points - points[chosen[-1]], axis=1))
    return np.asarray(chosen)


def _identity_components(mesh: _Mesh, real: np.ndarray, count: int,
                         rng: np.random.Generator) -> np.ndarray:
    """(V, 3, count) components 61.. : smooth random fields orthogonal to `real` (V, 3, 60).

    Like principal components they are mutually orthogonal; orthogonalising against the
    earlier ones leaves each new component finer detail, continuing the real spectrum's rise
    in Laplacian energy with the index."""
    n = len(mesh.vertices)
    if count == 0:
        return np.zeros((n, 3, 0))
    head = mesh.vertices[:NUM_HEAD_VERTICES]
    centres = head[_farthest_points(head, 400)]
    eye_centres = np.stack([mesh.vertices[slice(*LEFT_EYEBALL)].mean(0),
                            mesh.vertices[slice(*RIGHT_EYEBALL)].mean(0)])
    sample_points = np.concatenate([head, eye_centres])
    index = np.arange(NUM_REAL_SHAPE, NUM_REAL_SHAPE + count)
    # Length scale (m) shrinks with the index, so later components carry finer detail.
    length = 0.045 * ((index + 1) / (NUM_REAL_SHAPE + 1)) ** -0.35
    coefficients = rng.standard_normal((count, len(centres), 3))
    fields = np.zeros((count, len(sample_points), 3))
    squared = ((sample_points[:, None] - centres[None]) ** 2).sum(-1)
    rounded = np.round(length / 0.002) * 0.002
    for scale in np.unique(rounded):  # a few distinct kernels, each shared by its components
        members = np.flatnonzero(rounded == scale)
        kernel = np.exp(-0.5 * squared / scale ** 2)
        kernel /= np.sqrt((kernel ** 2).sum(1, keepdims=True))  # unit variance everywhere
        drawn = coefficients[members].transpose(1, 0, 2).reshape(len(centres), -1)
        fields[members] = (kernel @ drawn).reshape(len(sample_points), len(members), 3
                                                   ).transpose(1, 0, 2)
    components = np.zeros((count, n, 3))
    components[:, :NUM_HEAD_VERTICES] = fields[:, :NUM_HEAD_VERTICES]
    components[:, slice(*LEFT_EYEBALL)] = fields[:, None, -2]   # eyeballs move rigidly
    components[:, slice(*RIGHT_EYEBALL)] = fields[:, None, -1]
    basis = components.reshape(count, -1).T
    real_flat = real.reshape(n * 3, -1).astype(np.float64)
    real_unit = real_flat / np.linalg.norm(real_flat, axis=0)  # the real columns are orthogonal
    basis -= real_unit @ (real_unit.T @ basis)
    # Cholesky QR (BLAS-3; Householder QR is several times slower here): column k of the result
    # depends only on columns 1..k, so a smaller num_shape gives a prefix of a larger one.
    lower = np.linalg.cholesky(basis.T @ basis)
    basis = scipy.linalg.solve_triangular(lower, basis.T, lower=True).T
    # Continue the real spectrum: fit log norm ~ a + b log k on the real components 21..60.
    real_norms = np.linalg.norm(real_flat, axis=0)
    k = np.arange(1, NUM_REAL_SHAPE + 1)
    slope, intercept = np.polyfit(np.log(k[20:]), np.log(real_norms[20:]), 1)
    norms = np.exp(intercept + slope * np.log(index + 1))
    return (basis * norms[None]).reshape(n, 3, count)


# ----------------------------------------------------------------------------- expression

def _expression_region(mesh: _Mesh, anchors: Dict[str, np.ndarray], ears: np.ndarray) -> np.ndarray:
    """(V,) in [0, 1]: where expressions may move the skin (face, chin; not ears, scalp, eyes)."""
    distance = mesh.geodesic(anchors["nose_bridge"])
    region = 1.0 - _smoothstep((distance - 0.10) / 0.04)
    return np.where(mesh.head & ~ears, region, 0.0)


def _semantic_expressions(mesh: _Mesh, anchors: Dict[str, np.ndarray], jaw: np.ndarray,
                          jaw_joint: np.ndarray) -> list:
    """The 20 hand-designed (V, 3) displacement fields, each of peak magnitude 1."""
    v, normals = mesh.vertices, mesh.normals
    side = np.sign(v[:, 0])[:, None]
    ones = np.ones((len(v), 1))

    def field(weight, direction):
        return weight[:, None] * np.broadcast_to(direction, v.shape)

    corners = _blob(mesh, anchors["mouth_corners"], 0.012)
    lips = _blob(mesh, anchors["lips"], 0.010)
    left_corner = np.where(v[:, 0] > 0, corners, 0.0)
    right_corner = np.where(v[:, 0] < 0, corners, 0.0)
    relative = v - jaw_joint
    jaw_open = np.stack([np.zeros(len(v)), -relative[:, 2], relative[:, 1]], axis=1)
    inner_brows = _blob(mesh, anchors["inner_brows"], 0.012)
    smile = np.concatenate([0.5 * side, 0.8 * ones, -0.3 * ones], axis=1)
    fields = [
        jaw[:, None] * jaw_open,                                                # jaw open
        field(corners, smile),                                                  # smile
        field(corners, np.concatenate([0.2 * side, -0.9 * ones, -0.1 * ones], 1)),  # frown
        field(_blob(mesh, anchors["lips"], 0.010),
              np.concatenate([-side * np.clip(np.abs(v[:, :1]) / 0.025, 0, 1), 0 * ones,
                              ones], 1)),                                       # pucker
        field(corners, np.concatenate([side, 0 * ones, -0.3 * ones], 1)),      # lip stretch
        field(lips, np.array([0.0, 0.0, -1.0])),                                # lip press
        field(_blob(mesh, anchors["upper_lip"], 0.008), np.array([0.0, 1.0, 0.2])),
        field(_blob(mesh, anchors["lower_lip"], 0.010), np.array([0.0, -1.0, 0.2])),
        field(_blob(mesh, anchors["lips"], 0.014), np.array([1.0, 0.0, 0.0])),  # mouth shift
        field(jaw, np.array([1.0, 0.0, 0.0])),                                  # jaw sideways
        field(jaw, np.array([0.0, 0.0, 1.0])),                                  # jaw forward
        _blob(mesh, anchors["cheeks"], 0.018)[:, None] * normals,               # cheek puff
        field(_blob(mesh, anchors["brows"], 0.015), np.array([0.0, 1.0, 0.0])),  # brow raise
        field(inner_brows, np.concatenate([-0.6 * side, -0.8 * ones, 0.1 * ones], 1)),
        field(_blob(mesh, anchors["left_upper_lid"], 0.005), np.array([0.0, -1.0, 0.3])),
        field(_blob(mesh, anchors["right_upper_lid"], 0.005), np.array([0.0, -1.0, 0.3])),
        field(_blob(mesh, anchors["lower_lids"], 0.008), np.array([0.0, 1.0, 0.1])),  # squint
        field(_blob(mesh, anchors["nostrils"], 0.010), np.array([0.0, 1.0, 0.2])),  # wrinkle
        field(left_corner, smile),                                              # left smile
        field(right_corner, smile),                                             # right smile
    ]
    return [f / np.linalg.norm(f, axis=1).max() for f in fields]


def _random_expressions(mesh: _Mesh, region: np.ndarray, lower_face: np.ndarray, count: int,
                        rng: np.random.Generator) -> list:
    """`count` (V, 3) fields of peak 1, each 1-3 geodesic blobs placed symmetrically,
    antisymmetrically or on one side, centred on the face with a bias to the lower face."""
    v = mesh.vertices
    if count == 0:
        return []
    # Blob centres come from a fixed set of face vertices and their mirror images, so one
    # multi-source Dijkstra call gives every distance field needed.
    right_half = np.flatnonzero((region > 0.5) & (v[:, 0] >= 0.0))
    candidates = right_half[_farthest_points(v[right_half], 120)]
    mirrors = mesh.nearest_head_vertex(v[candidates] * np.array([-1.0, 1.0, 1.0]))
    distance = dijkstra(mesh.graph, indices=np.concatenate([candidates, mirrors]))
    probability = region[candidates] * (1.0 + 3.0 * lower_face[candidates])
    probability /= probability.sum()
    mirror = np.array([-1.0, 1.0, 1.0])
    fields = []
    for _ in range(count):
        total = np.zeros_like(v)
        symmetry = rng.integers(3)  # 0 one-sided, 1 symmetric, 2 antisymmetric
        for _ in range(rng.integers(1, 4)):
            pick = rng.choice(len(candidates), p=probability)
            radius = rng.uniform(0.008, 0.02)
            direction = rng.standard_normal(3)
            blob = np.exp(-0.5 * (distance[pick] / radius) ** 2)
            if symmetry == 0 and rng.integers(2):
                blob = np.exp(-0.5 * (distance[len(candidates) + pick] / radius) ** 2)
            total += blob[:, None] * direction
            if symmetry:
                twin = np.exp(-0.5 * (distance[len(candidates) + pick] / radius) ** 2)
                total += (1.0 if symmetry == 1 else -1.0) * twin[:, None] * (direction * mirror)
        total *= region[:, None]
        fields.append(total / np.linalg.norm(total, axis=1).max())
    return fields


# ----------------------------------------------------------------------------- albedo

def _albedo(mesh: _Mesh, anchors: Dict[str, np.ndarray], count: int,
            rng: np.random.Generator) -> tuple:
    """albedo_mean (V, 3) in [0, 1] and albedo_basis (V, 3, count), smooth and decaying."""
    v, n = mesh.vertices, len(mesh.vertices)
    skin = np.array([0.78, 0.58, 0.48])
    mean = np.tile(skin, (n, 1))
    lips = _blob(mesh, anchors["lips"], 0.006)[:, None]
    mean = (1 - lips) * mean + lips * np.array([0.66, 0.38, 0.36])
    brows = _blob(mesh, anchors["brows"], 0.008)[:, None]
    mean = (1 - 0.8 * brows) * mean + 0.8 * brows * np.array([0.36, 0.26, 0.22])
    for key, (start, stop) in (("left_eyeball_centre", LEFT_EYEBALL),
                               ("right_eyeball_centre", RIGHT_EYEBALL)):
        offset = v[start:stop] - anchors[key]
        cosine = offset[:, 2] / np.linalg.norm(offset, axis=1)  # angle from the gaze (+z)
        colour = np.tile([0.92, 0.90, 0.88], (stop - start, 1))  # sclera
        colour[cosine > 0.88] = [0.35, 0.22, 0.12]  # iris
        colour[cosine > 0.985] = [0.04, 0.04, 0.04]  # pupil
        mean[start:stop] = colour
    head = mesh.head.astype(np.float64)
    fixed = [np.array([1.0, 0.9, 0.8]), np.array([1.0, -0.5, -0.5]), np.array([0.5, 0.5, -1.0])]
    num_random = max(count - len(fixed), 0)
    draws = [(rng.standard_normal(n), rng.standard_normal(3)) for _ in range(num_random)]
    noise = np.stack([d[0] for d in draws], axis=1) if draws else np.zeros((n, 0))
    scalars = mesh.smooth(noise * head[:, None], 25)
    colours = 1.0 + 0.5 * np.array([d[1] for d in draws]).reshape(num_random, 3)
    basis = np.zeros((n, 3, count))
    for k in range(count):
        if k < len(fixed):  # brightness, redness, yellowness of the whole skin
            scalar, colour = head, fixed[k]
        else:
            scalar, colour = scalars[:, k - len(fixed)], colours[k - len(fixed)]
        column = scalar[:, None] * colour[None]
        # Per-vertex RMS over the head of 0.12 (k + 1)^-0.6: the spectrum decays strictly.
        column *= 0.12 * (k + 1) ** -0.6 * np.sqrt(NUM_HEAD_VERTICES) / np.linalg.norm(column)
        basis[:, :, k] = column
    return np.clip(mean, 0.0, 1.0), basis


# ----------------------------------------------------------------------------- assembly

@functools.lru_cache(maxsize=8)
def _build(seed: int, num_shape: int, num_expression: int, num_texture: int) -> Dict:
    """Pure numpy builder behind `synthetic`; cached, arrays read-only."""
    real_arrays = _shipped()
    topology = {key: real_arrays[key] for key in ("v_template", "shapedirs_id60", "faces")}
    embedding = {key: real_arrays[key] for key in real_arrays if "lmk" in key}
    mesh = _Mesh(topology["v_template"], topology["faces"])
    anchors = _anchors(mesh, embedding)
    identity_rng, expression_rng, albedo_rng = [
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3)]

    masks = _masks(mesh, anchors)
    ears = masks["left_ear"] | masks["right_ear"]
    regressor = _j_regressor(mesh, anchors)
    joints = regressor @ mesh.vertices
    jaw = _jaw_weight(mesh, anchors, ears)
    lbs_weights = _lbs_weights(mesh, jaw)
    neck_band = mesh.smooth(lbs_weights[:, 1] * masks["neck"], 4)
    posedirs = _posedirs(mesh, anchors, neck_band)

    real = topology["shapedirs_id60"]
    shapedirs = np.concatenate(
        [real[..., :num_shape],
         _identity_components(mesh, real, max(num_shape - NUM_REAL_SHAPE, 0), identity_rng)],
        axis=-1)

    region = _expression_region(mesh, anchors, ears)
    eye_line = 0.5 * (anchors["left_eyeball_centre"][1] + anchors["right_eyeball_centre"][1])
    lower_face = (mesh.vertices[:, 1] < eye_line - 0.01).astype(np.float64)
    fields = _semantic_expressions(mesh, anchors, jaw, joints[2])[:num_expression]
    fields += _random_expressions(mesh, region, lower_face, num_expression - len(fields),
                                  expression_rng)
    amplitude = 0.005 * np.arange(1, num_expression + 1) ** -0.35  # metres per unit coefficient
    exprdirs = np.stack(fields, axis=-1) * amplitude
    exprdirs[~mesh.head] = 0.0

    albedo_mean, albedo_basis = _albedo(mesh, anchors, num_texture, albedo_rng)
    out = {
        "v_template": topology["v_template"],
        "shapedirs": shapedirs,
        "exprdirs": exprdirs,
        "posedirs": posedirs,
        "j_regressor": regressor,
        "lbs_weights": lbs_weights,
        "faces": topology["faces"],
        "albedo_mean": albedo_mean,
        "albedo_basis": albedo_basis,
        "masks": {name: np.flatnonzero(mask).astype(np.int32) for name, mask in masks.items()},
        **embedding,
    }
    _read_only(out["masks"])
    return _read_only({key: value for key, value in out.items() if key != "masks"}) | {
        "masks": out["masks"]}


def synthetic(seed: int = 0, *, num_shape: int = 300, num_expression: int = 100,
              num_texture: int = 50, dtype=jnp.float32) -> FlameModel:
    """The built-in FLAME-layout model: real template, triangles, first 60 identity components
    and landmark embeddings, with the other assets generated (see the module docstring).

    Args:
      seed: selects the generated identity components 61.., the random expression components
        21.. and the random albedo components 4..; everything else is seed-independent.
      num_shape: identity components (>= 1; 1..60 are FLAME 2023 Open's own).
      num_expression: expression components (>= 1).
      num_texture: albedo components (>= 0).
      dtype: floating dtype of the float arrays (int arrays are int32).

    Returns a `FlameModel` with shapedirs (5023, 3, num_shape), exprdirs (5023, 3,
    num_expression), posedirs (36, 15069), j_regressor (5, 5023), lbs_weights (5023, 5),
    albedo_mean (5023, 3), albedo_basis (5023, 3, num_texture), masks {name: (K,) int32}.
    Deterministic: the same arguments give identical arrays; built once per argument set.
    """
    for name, value, least in (("num_shape", num_shape, 1), ("num_expression", num_expression, 1),
                               ("num_texture", num_texture, 0)):
        if int(value) != value or value < least:
            raise ValueError(f"synthetic(): {name} must be an integer >= {least}, got {value!r}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"synthetic(): dtype must be a floating dtype, got {dtype!r}")
    arrays = _build(int(seed), int(num_shape), int(num_expression), int(num_texture))
    return from_numpy(arrays, dtype=dtype)
