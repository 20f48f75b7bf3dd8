"""The NoW protocol on arrays: scan crop, landmark Procrustes, rigid refinement, distances.

Checked against the official `now_evaluation` code (scan2mesh_computations[_metrical].py); all
arrays are numpy float64, scans in millimetres.

1. Crop (`crop_mask`): from the scan's 7 landmarks p (order of `LANDMARK_NAMES`),
   centre = p4 + 0.3 (bridge - p4) with bridge = (p1 + p2) / 2, radius =
   1.4 (|p0 - p3| + |bridge - p4|) / 2; keep the scan vertices with |v - centre| <= radius.
2. Procrustes (`similarity_procrustes`): MATLAB-style similarity fit of the predicted landmarks
   onto the scan's, scale included and a reflection allowed when it fits better ("best").
   Non-metrical: the mesh is mapped with that scale. Metrical: the scale is replaced by the unit
   factor (m -> 1000, cm -> 10, mm -> 1).
3. Refinement (`refine_alignment`): minimise sum_i d_i^2 over (s, r, t) of the transformed mesh
   s R(r) x + t, with d_i the unsigned distance from cropped scan vertex i to the transformed mesh
   and the extra residual 100 (|s| - s) (non-metrical), or over (r, t) only (metrical), starting
   at the identity. The official tool does this with chumpy's dogleg; we use a
   Levenberg-Marquardt on the 7 x 7 normal equations with the exact Jacobian of the distances
   (closest points recomputed at every evaluation, see `_Residuals`), coarse to fine. (An
   earlier version used `scipy.optimize.least_squares`; it reached the same optima but its SVD
   of the N x 7 Jacobian per iteration cost more than the closest-point queries.)
4. Error (`scan_to_mesh_distances`): the unsigned distance of every cropped scan vertex to the
   aligned predicted mesh.

Deliberate difference (documented in results.json's "protocol"): in the metrical mode the
official code keeps the Procrustes translation that was computed for the Procrustes scale while
replacing the scale by the unit factor; we recompute the translation that is optimal for the
fixed scale. The two agree when the prediction's scale is right or its landmarks are centred,
and the refinement over t starts from a better point otherwise.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from recon.now.distance import MeshDistance

LANDMARK_NAMES = ("right_eye_outer", "right_eye_inner", "left_eye_inner", "left_eye_outer",
                  "nose_bottom", "right_mouth_corner", "left_mouth_corner")
# The same 7 points on FLAME's 68 landmarks: `recon.types.NOW_LANDMARKS_68`.
UNIT_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
SCALE_PENALTY_WEIGHT = 100.0


@dataclasses.dataclass(frozen=True)
class RefineOptions:
    """Options of the rigid refinement (`levenberg_marquardt`, coarse to fine)."""

    max_evaluations: int = 100  # per stage
    ftol: float = 1e-4  # relative cost reduction at which a stage stops (the official e_3)
    xtol: float = 1e-8
    coarse_points: int = 2000  # stages end at this many points or fewer (0: one stage)
    stage_factor: int = 8  # each stage uses every stage_factor-th point of the next


@dataclasses.dataclass(frozen=True)
class Similarity:
    """x -> scale * x @ rotation + translation (row vectors, as the official Procrustes)."""

    scale: float
    rotation: np.ndarray  # (3, 3); may be a reflection after Procrustes with "best"
    translation: np.ndarray  # (3,)

    def apply(self, points: np.ndarray) -> np.ndarray:
        return self.scale * points @ self.rotation + self.translation


def unit_factor(unit: str) -> float:
    """Millimetres per prediction unit."""
    if unit not in UNIT_TO_MM:
        raise ValueError(f"unit must be one of {sorted(UNIT_TO_MM)}, got {unit!r}")
    return UNIT_TO_MM[unit]


def _check_landmarks(landmarks: np.ndarray, name: str) -> np.ndarray:
    landmarks = np.asarray(landmarks, dtype=np.float64)
    if landmarks.shape != (7, 3):
        raise ValueError(f"{name} must be (7, 3), got {landmarks.shape}")
    if not np.all(np.isfinite(landmarks)):
        raise ValueError(f"{name} hold NaN or infinite values")
    return landmarks


def crop_region(scan_landmarks_mm: np.ndarray) -> tuple[np.ndarray, float]:
    """(centre (3,), radius) of the NoW face crop from the scan's 7 landmarks (mm)."""
    p = _check_landmarks(scan_landmarks_mm, "scan landmarks")
    bridge = (p[1] + p[2]) / 2.0
    centre = p[4] + 0.3 * (bridge - p[4])
    radius = 1.4 * (np.linalg.norm(p[0] - p[3]) + np.linalg.norm(bridge - p[4])) / 2.0
    return centre, float(radius)


def crop_mask(scan_vertices_mm: np.ndarray, scan_landmarks_mm: np.ndarray) -> np.ndarray:
    """(V,) bool: the scan vertices inside the NoW crop sphere (distance <= radius)."""
    centre, radius = crop_region(scan_landmarks_mm)
    return np.linalg.norm(np.asarray(scan_vertices_mm, np.float64) - centre, axis=1) <= radius


def similarity_procrustes(target: np.ndarray, source: np.ndarray, *,
                          scaling: bool = True) -> Similarity:
    """Least-squares similarity mapping `source` (N, 3) onto `target` (N, 3), reflection allowed.

    Returns T with T.apply(source) ~ target (the MATLAB `procrustes(X=target, Y=source)` with
    reflection 'best', the variant the official tool calls): the rotation is scipy's
    orthogonal Procrustes solution (any orthogonal matrix) of the normalised point sets, the
    scale its singular-value sum times the norms' ratio.
    """
    import scipy.linalg

    target = np.asarray(target, np.float64)
    source = np.asarray(source, np.float64)
    mean_t, mean_s = target.mean(0), source.mean(0)
    centred_t, centred_s = target - mean_t, source - mean_s
    norm_t, norm_s = np.linalg.norm(centred_t), np.linalg.norm(centred_s)
    if norm_t == 0 or norm_s == 0:
        raise ValueError("landmarks are all identical; no alignment is defined")
    rotation, singular_sum = scipy.linalg.orthogonal_procrustes(centred_s / norm_s,
                                                                centred_t / norm_t)
    scale = float(singular_sum * norm_t / norm_s) if scaling else 1.0
    return Similarity(scale, rotation, mean_t - scale * mean_s @ rotation)


def procrustes_initialisation(scan_landmarks_mm: np.ndarray, predicted_landmarks: np.ndarray, *,
                              metrical: bool, unit: str = "m") -> Similarity:
    """The protocol's initial alignment of a prediction (any unit) to the scan (mm)."""
    target = _check_landmarks(scan_landmarks_mm, "scan landmarks")
    source = _check_landmarks(predicted_landmarks, "predicted landmarks")
    fit = similarity_procrustes(target, source)
    if not metrical:
        return fit
    scale = unit_factor(unit)
    return Similarity(scale, fit.rotation, target.mean(0) - scale * source.mean(0) @ fit.rotation)


def rotation_matrix(rotvec: np.ndarray) -> np.ndarray:
    """(3,) axis-angle -> (3, 3) rotation (Rodrigues, series near zero)."""
    theta = float(np.linalg.norm(rotvec))
    k = _skew(rotvec)
    if theta < 1e-8:
        return np.eye(3) + k + 0.5 * k @ k
    return (np.eye(3) + np.sin(theta) / theta * k
            + (1.0 - np.cos(theta)) / theta ** 2 * k @ k)


def _skew(v: np.ndarray) -> np.ndarray:
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def _right_jacobian(rotvec: np.ndarray) -> np.ndarray:
    """J_r with R(r + d) ~ R(r) exp([J_r d]x) (SO(3) right Jacobian)."""
    theta = float(np.linalg.norm(rotvec))
    k = _skew(rotvec)
    if theta < 1e-6:
        return np.eye(3) - 0.5 * k + k @ k / 6.0
    return (np.eye(3) - (1.0 - np.cos(theta)) / theta ** 2 * k
            + (theta - np.sin(theta)) / theta ** 3 * k @ k)


class _Residuals:
    """Distances of the scan points to the mesh under x -> s R(r) x + t, and their Jacobian.

    Parameters: (r (3) axis-angle, t (3) mm[, s]). The AABB tree is built once on the
    (Procrustes-aligned) mesh; each evaluation maps the scan points by the inverse transform
    q = R^T (p - t) / s, queries the tree, and scales back: d(p, sRM + t) = s d(q, M) for s > 0.
    The Jacobian is the exact derivative of the unsigned distance wherever the closest point is
    unique (envelope theorem): with n the unit vector from the closest point c = s R x + t to p,
    dd/dtheta = -n^T dc/dtheta with x held fixed. Where the distance is zero the row is zero (a
    subgradient). Non-metrical: one extra residual 100 (|s| - s).
    """

    def __init__(self, mesh: MeshDistance, points: np.ndarray, fit_scale: bool):
        self.mesh, self.points, self.fit_scale = mesh, points, fit_scale

    def unpack(self, params):
        rotvec, translation = params[:3], params[3:6]
        scale = params[6] if self.fit_scale else 1.0
        return rotvec, translation, scale

    def __call__(self, params) -> tuple[np.ndarray, np.ndarray]:
        """(residuals (N[+1],), Jacobian (N[+1], 6|7))."""
        rotvec, translation, scale = self.unpack(params)
        rotation = rotation_matrix(rotvec)
        safe_scale = scale if scale > 1e-9 else 1e-9
        local = (self.points - translation) @ rotation / safe_scale  # R^T (p - t) / s, row form
        squared, _, closest = self.mesh.query(local)
        local_distance = np.sqrt(squared)
        distances = safe_scale * local_distance
        with np.errstate(invalid="ignore", divide="ignore"):
            # R^T n in the local frame: p - c = s R (q - x).
            local_normal = np.where(local_distance[:, None] > 0,
                                    (local - closest) / local_distance[:, None], 0.0)
        # d(R x)/dr = -R [x]x J_r  =>  -n^T d(sRx)/dr = s ((R^T n) x x)^T J_r
        columns = [scale * np.cross(local_normal, closest) @ _right_jacobian(rotvec),
                   -(local_normal @ rotation.T)]
        if not self.fit_scale:
            return distances, np.concatenate(columns, axis=1)
        columns.append(-np.sum(local_normal * closest, axis=1, keepdims=True))
        jacobian = np.concatenate(columns, axis=1)
        penalty_row = np.zeros((1, 7))
        penalty_row[0, 6] = SCALE_PENALTY_WEIGHT * (np.sign(scale) - 1.0)
        return (np.append(distances, SCALE_PENALTY_WEIGHT * (abs(scale) - scale)),
                np.concatenate([jacobian, penalty_row]))


def levenberg_marquardt(evaluate, x0: np.ndarray, *, max_evaluations: int, ftol: float,
                        xtol: float) -> tuple[np.ndarray, np.ndarray, int]:
    """Minimise |r(x)|^2 with Marquardt-scaled damping on the normal equations.

    evaluate(x) -> (r (N,), J (N, P)). Only the P x P normal equations are solved (P = 6 or 7),
    so an iteration costs one evaluation plus O(N P^2). Stops when the next step's predicted
    (Gauss-Newton model) or an accepted step's actual cost decrease is below `ftol` (relative),
    a step is below `xtol` (relative to |x|), or after `max_evaluations`. Returns (x, r(x),
    evaluations).
    """
    x = np.asarray(x0, np.float64)
    residuals, jacobian = evaluate(x)
    cost = residuals @ residuals
    evaluations, damping = 1, 1e-4
    while evaluations < max_evaluations:
        normal = jacobian.T @ jacobian
        gradient = jacobian.T @ residuals
        diagonal = np.maximum(np.diag(normal), 1e-12)
        try:
            step = -np.linalg.solve(normal + damping * np.diag(diagonal), gradient)
        except np.linalg.LinAlgError:
            damping *= 10.0
            continue
        # Converged when even the local Gauss-Newton model promises less than ftol: this
        # saves a closest-point evaluation per stage once the previous stage got it right.
        predicted = -(2.0 * gradient @ step + step @ normal @ step)
        if predicted <= ftol * cost and damping <= 1e-4:
            break
        candidate = x + step
        new_residuals, new_jacobian = evaluate(candidate)
        evaluations += 1
        new_cost = new_residuals @ new_residuals
        if new_cost < cost:
            decrease = (cost - new_cost) / max(cost, 1e-300)
            x, residuals, jacobian, cost = candidate, new_residuals, new_jacobian, new_cost
            damping = max(damping / 10.0, 1e-9)
            if decrease < ftol or np.linalg.norm(step) < xtol * (np.linalg.norm(x) + xtol):
                break
        else:
            damping *= 10.0
            if np.linalg.norm(step) < xtol * (np.linalg.norm(x) + xtol):
                break
    return x, residuals, evaluations


def refine_alignment(scan_points_mm: np.ndarray, mesh_vertices_mm: np.ndarray,
                     mesh_faces: np.ndarray, *, fit_scale: bool,
                     options: RefineOptions = RefineOptions()
                     ) -> tuple[Similarity, MeshDistance, np.ndarray]:
    """Rigid (fit_scale=False) or similarity refinement of the mesh onto the scan points.

    Coarse to fine: the solve first runs on evenly strided subsets of the scan points (each
    stage_factor times smaller, down to about `coarse_points`), then on all points from there,
    so the full-size closest-point queries are spent only near the optimum. The result is a
    stationary point of the full objective (the last stage converges on all points); the
    subsets only make the path there cheaper.

    Returns (T, tree, distances) with T the refinement to apply to the mesh vertices (row form),
    `tree` the AABB of the untransformed mesh, and the (N,) distances of all scan points to the
    refined mesh.
    """
    mesh = MeshDistance(mesh_vertices_mm, mesh_faces)
    points = np.ascontiguousarray(scan_points_mm, np.float64)
    x = np.zeros(7 if fit_scale else 6)
    if fit_scale:
        x[6] = 1.0
    stages = [points]
    while options.coarse_points > 0 and len(stages[0]) > options.coarse_points * options.stage_factor:
        stages.insert(0, stages[0][::options.stage_factor])
    for stage_points in stages:
        residuals = _Residuals(mesh, stage_points, fit_scale)
        x, values, _ = levenberg_marquardt(residuals, x, max_evaluations=options.max_evaluations,
                                           ftol=options.ftol, xtol=options.xtol)
    distances = values[:len(points)]
    rotvec, translation, scale = residuals.unpack(x)
    rotation = rotation_matrix(rotvec)
    return (Similarity(float(scale), rotation.T, np.asarray(translation, np.float64)), mesh,
            distances)


@dataclasses.dataclass(frozen=True)
class ImageScore:
    """Per-image result: distances (N,) mm of the cropped scan vertices, and the alignment."""

    distances_mm: np.ndarray
    alignment: Similarity  # prediction units -> scan mm (Procrustes then refinement)


def score_prediction(scan_vertices_mm: np.ndarray, scan_landmarks_mm: np.ndarray,
                     predicted_vertices: np.ndarray, predicted_faces: np.ndarray,
                     predicted_landmarks: np.ndarray, *, metrical: bool = False,
                     unit: str = "m", options: RefineOptions = RefineOptions()) -> ImageScore:
    """The whole protocol for one image: crop, Procrustes, refinement, distances (mm)."""
    scan_vertices_mm = _as_vertices(scan_vertices_mm, "scan vertices")
    predicted_vertices = _as_vertices(predicted_vertices, "predicted vertices")
    keep = crop_mask(scan_vertices_mm, scan_landmarks_mm)
    if not np.any(keep):
        raise ValueError("the NoW crop keeps no scan vertex (scan landmarks far from the scan?)")
    cropped = scan_vertices_mm[keep]
    initial = procrustes_initialisation(scan_landmarks_mm, predicted_landmarks,
                                        metrical=metrical, unit=unit)
    aligned = initial.apply(predicted_vertices)
    refinement, _, distances = refine_alignment(cropped, aligned, predicted_faces,
                                                fit_scale=not metrical, options=options)
    total = Similarity(initial.scale * refinement.scale, initial.rotation @ refinement.rotation,
                       refinement.scale * initial.translation @ refinement.rotation
                       + refinement.translation)
    return ImageScore(distances_mm=distances, alignment=total)


def _as_vertices(vertices, name):
    vertices = np.asarray(vertices, np.float64)
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise ValueError(f"{name} must be (V, 3), got {vertices.shape}")
    if not np.all(np.isfinite(vertices)):
        raise ValueError(f"{name} hold NaN or infinite values")
    return vertices
