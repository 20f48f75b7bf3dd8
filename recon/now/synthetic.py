"""A built-in NoW-layout split made from the synthetic FLAME model, for a fresh machine.

`ensure_synthetic_split(config)` builds it once under
`$FACERECON_CACHE_DIR/now_synthetic/<config hash>/` (default `~/.cache/facerecon_jax/...`) and
returns that root; it then reads exactly like the NoW download (`recon.now.io`).

Subjects: held-out identities of `flame_jax.synthetic(config.model_seed)`. Subject i (validation
i = 0..num_val_subjects-1, then the test subjects) draws its shape, texture and all its images
from `np.random.default_rng(config.first_seed + i)`; the default seeds 10_000_000..10_000_023
are reserved for this split: training data generators must not use seeds in
[10_000_000, 11_000_000).

Scans: the neutral FLAME head of the subject (zero pose and expression), eyeballs removed, cut
behind the ears and below the chin (partial, like a frontal scanner), subdivided twice linearly
(so the surface is unchanged, ~45k vertices), Gaussian noise of `scan_noise_mm` per axis on every
vertex, in millimetres, under a random rigid pose of the scanner frame. The `.pp` file holds the
7 NoW landmarks (`recon.types.NOW_LANDMARKS_68` of FLAME's 68 landmarks) in the same frame with
`landmark_noise_mm` annotation noise.

Images (rendered with `recon.render`, composited over a smooth random background, JPEG):
  multiview_neutral: neutral face, head yaw within +-45 degrees, pitch within +-10.
  multiview_expressions: random expressions (first 20 semantic components stronger), jaw open.
  multiview_occlusions: mild expressions plus 1-3 occluders (skin-coloured "hand" ellipses,
    dark "glasses/phone" bars, coloured "scarf" blocks) over the face.
  selfie: a close camera: vertices pass through a pinhole-like perspective warp
    x' = x D / (D - z) with D = 0.30 m before the orthographic camera (bigger nose and centre),
    larger face in the frame, slight upward view.
Extra (not in the NoW layout): `synthetic_ground_truth/<subject>.npz` holds the exact neutral
FLAME mesh of each validation subject (`vertices_m`, `faces`, `landmarks7_m`, FLAME frame), so
prediction folders with analytically known errors can be made (`benchmarks/now_scorer.py`).
Detected-face boxes: `recon.image.crop.box_from_landmarks` of the 68 projected landmarks (their
bounding box, raised by 15% of its height at the top: the forehead, like a face detector), as a
pickled dict (NoW's format).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io as _io
import json
import os
import pathlib
import shutil
from typing import Optional

import numpy as np
from scipy.spatial.transform import Rotation

from recon.image.crop import box_from_landmarks
from recon.now import io as now_io
from recon.now import protocol
from recon.types import NOW_LANDMARKS_68

NUM_HEAD_VERTICES = 3931  # FLAME vertices before the eyeballs
SELFIE_DISTANCE_M = 0.30
# Not part of the NoW layout: the exact neutral FLAME mesh of each validation subject (metres,
# FLAME frame), for prediction folders with known errors (benchmarks, tests).
GROUND_TRUTH_DIR = "synthetic_ground_truth"


@dataclasses.dataclass(frozen=True)
class SyntheticNowConfig:
    """Size and noise of the built-in split (the cache key is a hash of these fields)."""

    num_val_subjects: int = 20
    num_test_subjects: int = 4
    images_per_challenge: tuple = (("multiview_neutral", 6), ("multiview_expressions", 6),
                                   ("multiview_occlusions", 5), ("selfie", 3))
    image_size: int = 384
    subdivisions: int = 2
    scan_noise_mm: float = 0.2
    landmark_noise_mm: float = 0.3
    max_scan_vertices: Optional[int] = None  # random subset of the subdivided scan's vertices
    first_seed: int = 10_000_000
    model_seed: int = 0
    version: int = 2  # bump when the generator changes (2: no triangle lost to capacity)

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_root() -> pathlib.Path:
    return now_io.cache_base() / "now_synthetic"


def ensure_synthetic_split(config: SyntheticNowConfig = SyntheticNowConfig(), *,
                           root: Optional[os.PathLike] = None, progress: bool = True,
                           model=None) -> pathlib.Path:
    """The split's root folder, built on first use (in a temporary folder, then renamed).

    model: the `flame_jax.synthetic(config.model_seed)` model if the caller holds it already.
    """
    target = pathlib.Path(root) if root is not None else cache_root() / config.key()
    if (target / "complete.json").is_file():
        return target
    staging = target.with_name(f".{target.name}.building.{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        build_synthetic_split(staging, config, progress=progress, model=model)
        if target.exists():  # an incomplete earlier build
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


# ----------------------------------------------------------------------------- geometry

def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    return Rotation.from_euler("yxz", [yaw, pitch, roll]).as_matrix()


def scan_mesh(vertices_m: np.ndarray, faces: np.ndarray, landmarks_m: np.ndarray,
              rng: np.random.Generator, config: SyntheticNowConfig):
    """(scan vertices (N, 3) mm, scan faces (M, 3), landmarks (7, 3) mm) of a neutral head."""
    import trimesh

    head = vertices_m[:NUM_HEAD_VERTICES]
    tri = np.asarray(faces)
    tri = tri[np.all(tri < NUM_HEAD_VERTICES, axis=1)]
    centroid = head[tri].mean(1)
    nose_tip_z = head[:, 2].max()
    chin_y = landmarks_m[:, 1].min() - 0.06  # below the mouth corners by 6 cm
    keep = (centroid[:, 2] > nose_tip_z - 0.13) & (centroid[:, 1] > chin_y)
    tri = tri[keep]
    used = np.unique(tri)
    remap = np.full(len(head), -1)
    remap[used] = np.arange(len(used))
    v, f = head[used] * 1000.0, remap[tri]
    for _ in range(config.subdivisions):
        v, f = trimesh.remesh.subdivide(v, f)
    if config.max_scan_vertices and len(v) > config.max_scan_vertices:
        keep_vertex = np.zeros(len(v), bool)
        keep_vertex[rng.choice(len(v), config.max_scan_vertices, replace=False)] = True
        remap = np.cumsum(keep_vertex) - 1
        f = remap[f[np.all(keep_vertex[f], axis=1)]]
        v = v[keep_vertex]
    pose = _rotation(*rng.uniform(-0.15, 0.15, 3))
    shift = rng.uniform(-80.0, 80.0, 3)
    scan = (v + rng.normal(0.0, config.scan_noise_mm, v.shape)) @ pose.T + shift
    landmarks = (landmarks_m * 1000.0 + rng.normal(0.0, config.landmark_noise_mm, (7, 3)))
    return scan, f, landmarks @ pose.T + shift


# ----------------------------------------------------------------------------- images

def _background(rng, size):
    corners = rng.uniform(0.15, 0.85, (2, 2, 3))
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    top = corners[0, 0] * (1 - t) + corners[0, 1] * t
    bottom = corners[1, 0] * (1 - t) + corners[1, 1] * t
    image = top[None, :, 0] * (1 - t) + bottom[None, :, 0] * t
    return np.clip(image + rng.normal(0.0, 0.02, image.shape), 0, 1)


def _occlude(image, box, rng):
    """Paint 1-3 occluders over the face box (in place)."""
    size = image.shape[0]
    rows, cols = np.mgrid[0:size, 0:size]
    left, right, top, bottom = box["left"], box["right"], box["top"], box["bottom"]
    width, height = right - left, bottom - top
    for _ in range(rng.integers(1, 4)):
        kind = rng.integers(3)
        cx = rng.uniform(left + 0.2 * width, right - 0.2 * width)
        cy = rng.uniform(top + 0.3 * height, bottom)
        if kind == 0:  # hand: skin-coloured ellipse
            a, b = rng.uniform(0.15, 0.3) * width, rng.uniform(0.2, 0.35) * height
            mask = ((cols - cx) / a) ** 2 + ((rows - cy) / b) ** 2 <= 1.0
            colour = np.array([0.85, 0.6, 0.5]) * rng.uniform(0.7, 1.1)
        elif kind == 1:  # glasses / phone: dark horizontal bar
            cy = rng.uniform(top + 0.25 * height, top + 0.5 * height)
            mask = (np.abs(rows - cy) < rng.uniform(0.04, 0.08) * height) & \
                   (cols > left + 0.05 * width) & (cols < right - 0.05 * width)
            colour = rng.uniform(0.0, 0.15, 3)
        else:  # scarf / hair: coloured block
            mask = (np.abs(cols - cx) < rng.uniform(0.1, 0.25) * width) & \
                   (np.abs(rows - cy) < rng.uniform(0.1, 0.2) * height)
            colour = rng.uniform(0.1, 0.9, 3)
        image[mask] = np.clip(colour, 0, 1)


def _face_box(landmarks_px: np.ndarray) -> dict:
    left, top, right, bottom = (float(value) for value in box_from_landmarks(landmarks_px))
    return {"left": left, "right": right, "top": top, "bottom": bottom}


def _image_parameters(rng, challenge, model):
    """(expression (E,), jaw (3,), yaw, pitch, roll, scale factor, perspective) for one image."""
    num_expression = model.exprdirs.shape[-1]
    expression = np.zeros(num_expression)
    jaw = np.zeros(3)
    yaw, pitch, roll = rng.uniform(-0.8, 0.8), rng.uniform(-0.17, 0.17), rng.uniform(-0.1, 0.1)
    scale, perspective = rng.uniform(4.5, 6.0), False
    if challenge == "multiview_expressions":
        expression[:20] = rng.normal(0.0, 1.5, 20)
        expression[20:] = rng.normal(0.0, 0.5, num_expression - 20)
        jaw[0] = rng.uniform(0.0, 0.3)
    elif challenge == "multiview_occlusions":
        expression[:20] = rng.normal(0.0, 0.5, 20)
    elif challenge == "selfie":
        yaw, pitch = rng.uniform(-0.3, 0.3), rng.uniform(-0.25, 0.0)
        expression[:20] = rng.normal(0.0, 0.7, 20)
        scale, perspective = rng.uniform(7.0, 8.5), True
    return expression, jaw, (yaw, pitch, roll), scale, perspective


def build_synthetic_split(root: os.PathLike, config: SyntheticNowConfig = SyntheticNowConfig(),
                          *, progress: bool = True, with_images: bool = True,
                          model=None) -> None:
    """Write the whole split under `root` (see the module docstring).

    with_images=False writes only what scoring reads (scans, landmarks, ground truth, image
    lists; no images or face boxes): the same subjects and scans, much faster (benchmarks).
    """
    import jax
    import jax.numpy as jnp
    from PIL import Image
    from tqdm import tqdm

    import flame_jax
    from recon import render as render_lib
    from recon.render.camera import project_to_pixels
    from recon.render import shading
    from recon.render.rasterizer import RasterSettings

    root = pathlib.Path(root)
    model = flame_jax.synthetic(config.model_seed) if model is None else model
    faces = np.asarray(model.faces)
    size = config.image_size
    # Close-up heads (selfie) at 384 px cut FLAME's big triangles into many 8 x 8 tiles: room
    # for all of them, and every image is checked for overflow (a lost triangle is a hole).
    settings = RasterSettings(height=size, width=size, tile_capacity=65536)
    challenges = dict(config.images_per_challenge)
    images_per_subject = sum(challenges.values())
    forward = jax.jit(flame_jax.forward)
    num_shape = model.shapedirs.shape[-1]
    num_texture = 0 if model.albedo_basis is None else model.albedo_basis.shape[-1]
    lists = {"val": [], "test": []}
    total = config.num_val_subjects + config.num_test_subjects
    for index in tqdm(range(total), desc="NoW synthetic split", unit="subject", disable=not progress):
        split = "val" if index < config.num_val_subjects else "test"
        subject = f"SYN_{split}_{index:03d}"
        rng = np.random.default_rng(config.first_seed + index)
        shape = np.clip(rng.normal(0.0, 1.0, num_shape), -2.5, 2.5)
        texture = rng.normal(0.0, 0.8, num_texture)
        plans = [(challenge, j) + _image_parameters(rng, challenge, model)
                 for challenge, count in challenges.items() for j in range(count)]
        batch = 1 + images_per_subject
        params = flame_jax.FlameParams.zeros(batch_size=batch, model=model)
        expression = np.zeros((batch, model.exprdirs.shape[-1]))
        jaw = np.zeros((batch, 3))
        global_pose = np.zeros((batch, 3))
        for k, plan in enumerate(plans, start=1):
            expression[k], jaw[k] = plan[2], plan[3]
            global_pose[k] = Rotation.from_matrix(_rotation(*plan[4])).as_rotvec()
        params = params.replace(shape=jnp.asarray(np.tile(shape, (batch, 1)), jnp.float32),
                                expression=jnp.asarray(expression, jnp.float32),
                                jaw_pose=jnp.asarray(jaw, jnp.float32),
                                global_pose=jnp.asarray(global_pose, jnp.float32))
        out = forward(model, params)
        vertices = np.asarray(out.vertices, np.float64)
        landmarks68 = np.asarray(out.landmarks, np.float64)
        if split == "val":
            landmarks7 = landmarks68[0, list(NOW_LANDMARKS_68)]
            scan_v, scan_f, scan_lmk = scan_mesh(vertices[0], faces, landmarks7, rng, config)
            now_io.write_mesh(root / "scans" / subject / f"{subject}.obj", scan_v, scan_f)
            now_io.write_pp(root / "scans_lmks_onlypp" / subject / f"{subject}_picked_points.pp",
                            scan_lmk, names=protocol.LANDMARK_NAMES, model_file=f"{subject}.obj")
            truth = dict(vertices_m=vertices[0].astype(np.float32), faces=faces,
                         landmarks7_m=landmarks7.astype(np.float32))
            now_io.write_file(root / GROUND_TRUTH_DIR / f"{subject}.npz",
                              lambda handle, arrays=truth: np.savez(handle, **arrays))
        if not with_images:
            lists[split] += [now_io.ImageEntry(subject, plan[0], f"IMG_{plan[1]:04d}.jpg")
                             for plan in plans]
            continue
        # Images: centre each posed head, optionally warp (selfie), render the batch.
        posed = vertices[1:] - vertices[1:, :NUM_HEAD_VERTICES].mean(1, keepdims=True)
        points68 = landmarks68[1:] - vertices[1:, :NUM_HEAD_VERTICES].mean(1, keepdims=True)
        cameras = np.zeros((images_per_subject, 3))
        for k, plan in enumerate(plans):
            if plan[6]:
                posed[k] = _perspective(posed[k])
                points68[k] = _perspective(points68[k])
            cameras[k] = [plan[5], rng.uniform(-0.02, 0.02), rng.uniform(-0.02, 0.02)]
        light = np.zeros((images_per_subject, 9, 3))
        light[:, 0] = rng.uniform(1.2, 1.5, (images_per_subject, 1)) * [1.0, 0.97, 0.93]
        light[:, 1:4] = rng.uniform(-0.25, 0.25, (images_per_subject, 3, 1))
        light[:, 3] += 0.25
        if num_texture:
            albedo = shading.albedo_from_texture(model.albedo_mean, model.albedo_basis,
                                                 jnp.asarray(texture[None], jnp.float32))
            albedo = jnp.tile(albedo, (images_per_subject, 1, 1))
        else:
            albedo = jnp.full((images_per_subject, posed.shape[1], 3), 0.7, jnp.float32)
        rendered = render_lib.render(jnp.asarray(posed, jnp.float32), model.faces,
                                     jnp.asarray(cameras, jnp.float32),
                                     jnp.asarray(light, jnp.float32), albedo, settings=settings)
        overflow = np.asarray(rendered.overflow)
        if overflow.any():
            raise RuntimeError(f"synthetic NoW subject {subject}: the renderer dropped "
                               f"{int(overflow.max())} triangles/tiles (raise RasterSettings' "
                               f"capacities)")
        colour = np.asarray(rendered.image)
        alpha = np.asarray(rendered.alpha)[..., None]
        pixels = np.asarray(project_to_pixels(jnp.asarray(points68, jnp.float32),
                                              jnp.asarray(cameras, jnp.float32), (size, size)))
        for k, (challenge, j, *_rest) in enumerate(plans):
            image = alpha[k] * np.clip(colour[k], 0, 1) + (1 - alpha[k]) * _background(rng, size)
            box = _face_box(pixels[k, :, :2])
            if challenge == "multiview_occlusions":
                _occlude(image, box, rng)
            entry = now_io.ImageEntry(subject, challenge, f"IMG_{j:04d}.jpg")
            buffer = _io.BytesIO()
            Image.fromarray(np.round(image * 255).astype(np.uint8)).save(buffer, "JPEG", quality=92)
            now_io.write_file(root / now_io.IMAGES_DIR / subject / challenge / entry.image,
                              buffer.getvalue())
            now_io.write_face_box(root / now_io.FACE_BOXES_DIR / entry.relative(".npy"), box)
            lists[split].append(entry)
    for split, entries in lists.items():
        now_io.write_image_list(now_io.image_list_path(root, split), entries)
    now_io.write_file(root / "complete.json", json.dumps(
        {"config": dataclasses.asdict(config), "key": config.key()}, indent=1) + "\n")


def _perspective(points: np.ndarray) -> np.ndarray:
    """Close-camera warp x' = x D / (D - z) (z toward the camera, metres)."""
    factor = SELFIE_DISTANCE_M / (SELFIE_DISTANCE_M - points[:, 2:3])
    return np.concatenate([points[:, :2] * factor, points[:, 2:3]], axis=1)
