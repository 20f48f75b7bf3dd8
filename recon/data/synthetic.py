"""Synthetic 2D-3D training pairs drawn from the FLAME model itself and our renderer.

Each subject is a random identity (FLAME shape coefficients, skin tone, texture coefficients,
hair colour and hairline), fixed by `(seed, subject_index)`. Each of its images is fixed by
`(seed, subject_index, image_index)`: expression, jaw, gaze, head pose (yaw up to +-40 degrees,
smaller pitch and roll), optional perspective distortion, light (DECA's 9-band SH, or Lambert
directional + ambient, plus a Blinn-Phong highlight), albedo beyond the basis (tint, per-vertex
noise, blotches), and the host-side randomisation of `recon.data.augment` (structured
backgrounds, occluders, blur, noise, JPEG, colour jitter).

The crop is the run's `recon.image.CropSpec`, made the way prediction makes it: the head's 68
landmarks in a reference photo frame, moved by a detector's error (`landmark_noise`: Gaussian,
a fraction of the landmark box side, per point and axis; for box crops also the box's
`box_scale_jitter` / `box_shift_jitter`), give the crop matrix through `recon.image.crop_matrix`
exactly as a photo's detected landmarks (or box) do (on `fallback_crop_probability` of the
images, from the jittered box alone, as prediction crops a face it found no landmarks for);
the head is then rendered straight into that
crop (`recon.image.crop.crop_camera`: an in-plane roll and a camera; no resampling) at the crop's
size. The 2D losses' image is that crop resized to `image_size` (`recon.image.preprocess.resize`).

Stages:
  `scene_landmarks(model, scenes)`: jitted FLAME forward of the landmarks (after distortion).
  `crop_geometry(landmarks_3d, scenes, config)`: host; the detector's view and the crop matrix.
  `render_scenes(model, scenes, rolls, cameras, settings=...)`: jitted; FLAME, render, shading,
    face-region mask and landmarks in the crop, for a batch of images in one call.
  `compose_example(...)`: numpy/cv2; background, occluders, skin mask, degradations, resize.
`make_subject` runs them for the K images of one subject; `make_subjects` for many subjects in
batched device calls; `make_example` is one image.

Subject-index ranges (identities never shared between them; the ranges only need to be
disjoint because every identity is drawn from its own random stream):
  TRAIN_SUBJECTS          0 .. 999,999        training.
  HELDOUT_SUBJECTS        1,000,000 .. 1,009,999   held-out evaluation during/after training.
  NOW_SYNTHETIC_SUBJECTS  2,000,000 .. 2,009,999   reserved for the synthetic NoW-style split.
"""

from __future__ import annotations

import dataclasses
import functools
import multiprocessing
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from scipy.spatial.transform import Rotation

import flame_jax
from recon import render as render_lib
from recon.data import augment
from recon.image import crop as crop_lib
from recon.image import preprocess
from recon.render import camera as camera_lib
from recon.render import rasterizer, shading

Array = jax.Array

TRAIN_SUBJECTS = range(0, 1_000_000)
HELDOUT_SUBJECTS = range(1_000_000, 1_010_000)
NOW_SYNTHETIC_SUBJECTS = range(2_000_000, 2_010_000)

# Independent random streams per subject / image (numpy SeedSequence entropy words).
_IDENTITY_STREAM = 0
_IMAGE_STREAM = 1
_COMPOSE_STREAM = 2


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
    """What a synthetic example looks like. Angles in degrees, lengths in metres.

    shape_std: std of the identity coefficients (FLAME's are in units of their std).
    expression_std: std of the first 20 expression coefficients; the rest get half of it.
    neutral_probability: chance of a zero-expression, closed-jaw image.
    jaw_open_max_rad: jaw pitch ~ U(0, max) on non-neutral images.
    eye_rotation_max_rad: gaze ~ U(-max, max) about x and y (both eyes alike).
    max_yaw_deg, max_pitch_deg, max_roll_deg: head pose ~ U(-max, max) each, composed
      yaw (about y) * pitch (about x) * roll (about z).
    texture_std: std of the albedo-basis coefficients.
    skin_brightness: range of the per-subject albedo scale (light to dark skin).
    vertex_noise_std: iid per-vertex albedo noise; blotch_count: max random albedo blotches.
    hair_probability: chance that a subject has hair painted on its scalp.
    crop: the run's crop (`recon.image.CropSpec`); images are rendered at crop.size.
    image_size: the 2D losses' image: the crop resized to this size (0 = crop.size).
    landmark_noise: a detector's landmark error: std of the Gaussian moving each of the 68
      points in x and y, as a fraction of the landmark box's mean side (0: exact landmarks).
    box_scale_jitter: box crops: the detector box's side is scaled by U(1 - j, 1 + j).
    box_shift_jitter: box crops: its centre moves by U(-j, j) box sides in x and y.
    fallback_crop_probability: chance that an image is cropped as a prediction crops a face
      whose landmarks were not found (`recon.now.predict`'s fallback): the FLAME template's
      landmarks placed on the face box (with the box jitter, `recon.image.crop.place_on_box`),
      so the model also learns faces that the crop does not align (occluded, missed).
    perspective_probability, camera_distance_m: chance of a pinhole-like distortion of the
      image (camera at U(range) metres); the ground-truth meshes are never distorted.
    lambert_probability: chance of Lambert directional + ambient light instead of SH.
    specular_probability: chance of a Blinn-Phong highlight on top.
    augment: host-side randomisation (`recon.data.augment.AugmentConfig`).
    """

    crop: crop_lib.CropSpec = crop_lib.CropSpec()
    image_size: int = 0
    shape_std: float = 1.0
    expression_std: float = 0.7
    neutral_probability: float = 0.2
    jaw_open_max_rad: float = 0.35
    eye_rotation_max_rad: float = 0.2
    max_yaw_deg: float = 40.0
    max_pitch_deg: float = 20.0
    max_roll_deg: float = 12.0
    texture_std: float = 0.5
    skin_brightness: Tuple[float, float] = (0.35, 1.1)
    vertex_noise_std: float = 0.025
    blotch_count: int = 6
    hair_probability: float = 0.75
    landmark_noise: float = 0.0
    box_scale_jitter: float = 0.12
    box_shift_jitter: float = 0.07
    fallback_crop_probability: float = 0.0
    perspective_probability: float = 0.5
    camera_distance_m: Tuple[float, float] = (0.4, 3.0)
    lambert_probability: float = 0.4
    specular_probability: float = 0.5
    augment: augment.AugmentConfig = augment.AugmentConfig()

    @property
    def loss_size(self) -> int:
        """The side of the 2D losses' image."""
        return int(self.image_size or self.crop.size)

    @property
    def raster_settings(self) -> rasterizer.RasterSettings:
        """The renderer draws the crop at its own size."""
        return rasterizer.RasterSettings(self.crop.size, self.crop.size)


@struct.dataclass
class Scenes:
    """Everything random about N images that the device part needs (numpy or jax arrays).

      shape (N, S), expression (N, E), global_pose (N, 3), jaw_pose (N, 3), eye_pose (N, 6),
      texture (N, T) FLAME / albedo coefficients (axis-angle radians for poses).
      albedo_gain (N, 3) skin tone and tint; albedo_offset (N, V, 3) per-vertex noise and blotches;
      hair_weight (N, V) in [0, 1]; hair_colour (N, 3).
      sh_light (N, 9, 3) and sh_weight (N,) (0 switches SH off); ambient (N, 3);
      light_directions (N, 2, 3) unit vectors toward the lights; light_colours (N, 2, 3);
      specular (N, 3) highlight colour and strength; shininess (N,).
      inverse_distance (N,) 1 / camera distance in 1/m (0: orthographic).
      landmark_noise (N, 68, 2) standard normal draws of the detector's landmark error;
      box_jitter (N, 3) U(-1, 1) draws of its box error (scale, shift x, shift y).
      fallback_crop (N,) 1 where the crop is made from the face box alone (see
        `SyntheticConfig.fallback_crop_probability`), else 0.
    """

    shape: Array
    expression: Array
    global_pose: Array
    jaw_pose: Array
    eye_pose: Array
    texture: Array
    albedo_gain: Array
    albedo_offset: Array
    hair_weight: Array
    hair_colour: Array
    sh_light: Array
    sh_weight: Array
    ambient: Array
    light_directions: Array
    light_colours: Array
    specular: Array
    shininess: Array
    inverse_distance: Array
    landmark_noise: Array
    box_jitter: Array
    fallback_crop: Array


@struct.dataclass
class RenderedScenes:
    """Device output for N crops of S x S pixels (S = the crop's size).

      foreground (N, S, S, 3) shaded face (valid where alpha > 0, not clipped);
      alpha (N, S, S) soft coverage; face_region (N, S, S) float 0/1, pixels whose visible
      triangle lies in the face mask and not under hair;
      landmarks (N, 68, 2) the 68 landmarks in crop pixels (distorted, rolled, projected);
      neutral_vertices (N, V, 3) metres, the identity's neutral mesh; camera (N, 3);
      overflow (N,) int32 from the rasterizer (0 = complete image).
    """

    foreground: Array
    alpha: Array
    face_region: Array
    landmarks: Array
    neutral_vertices: Array
    camera: Array
    overflow: Array


def _rng(seed: int, *words: int) -> np.random.Generator:
    if seed < 0 or any(w < 0 for w in words):
        raise ValueError(f"seed and indices must be non-negative, got seed {seed}, {words}")
    return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, words)]))


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-9)


@dataclasses.dataclass(frozen=True)
class HostModel:
    """The few numpy arrays of the FLAME model that the host-side sampling needs."""

    template: np.ndarray      # (V, 3) metres
    num_shape: int
    num_expression: int
    num_texture: int
    face: np.ndarray          # (V,) bool, FLAME's face mask (all False when the model has none)
    no_hair: np.ndarray       # (V,) bool, where hair is never painted (ears, eyes, nose, lips)
    template_points: np.ndarray  # (68, 2) the template's landmarks (fallback crops' points)

    @classmethod
    def from_model(cls, model: flame_jax.FlameModel) -> "HostModel":
        template = np.asarray(model.v_template, np.float32)
        masks = model.masks or {}

        def mask(*names):
            out = np.zeros(len(template), bool)
            for name in names:
                if name in masks:
                    out[np.asarray(masks[name])] = True
            return out

        face = mask("face")
        return cls(template=template, template_points=crop_lib.template_points(model),
                   num_shape=model.num_shape,
                   num_expression=model.num_expression, num_texture=model.num_texture,
                   face=face, no_hair=mask("left_ear", "right_ear", "left_eyeball",
                                           "right_eyeball", "eye_region", "nose", "lips"))


def _identity(host: HostModel, config: SyntheticConfig, seed: int, subject_index: int) -> Dict:
    """Per-subject randomness: shape, texture, skin tone, hair."""
    rng = _rng(seed, subject_index, _IDENTITY_STREAM)
    template = host.template
    shape = rng.normal(0.0, config.shape_std, host.num_shape).astype(np.float32)
    texture = rng.normal(0.0, config.texture_std, host.num_texture).astype(np.float32)
    brightness = rng.uniform(*config.skin_brightness)
    # Darker skin is also a little redder relative to green/blue in albedo measurements.
    tone = np.asarray([1.0, 0.97, 0.95]) ** (1.0 - brightness)
    gain = (brightness * tone * (1.0 + rng.normal(0.0, 0.04, 3))).astype(np.float32)
    hair = np.zeros(len(template), np.float32)
    hair_colour = np.zeros(3, np.float32)
    if rng.random() < config.hair_probability:
        # Hairline: a tilted plane 2-5 cm above the brows (the highest static landmarks sit
        # near y = 0.045 m on FLAME), plus the back of the head above the nape.
        level = rng.uniform(0.065, 0.1)
        slope = rng.uniform(0.0, 0.4)
        height = template[:, 1] - (level + slope * template[:, 2])
        back = np.minimum(-0.03 - template[:, 2], template[:, 1] - rng.uniform(-0.06, 0.0))
        hair = np.clip(np.maximum(height, back) / 0.008 + 0.5, 0.0, 1.0)
        hair[host.no_hair] = 0.0
        base = np.asarray([[0.05, 0.04, 0.03], [0.25, 0.15, 0.08], [0.45, 0.3, 0.15],
                           [0.75, 0.62, 0.4], [0.55, 0.55, 0.55], [0.5, 0.2, 0.08]])
        hair_colour = (base[rng.integers(0, len(base))] * rng.uniform(0.8, 1.2)).astype(
            np.float32)
    return dict(shape=shape, texture=texture, gain=gain, hair=hair.astype(np.float32),
                hair_colour=np.clip(hair_colour, 0, 1))


def _head_rotation(yaw_deg: float, pitch_deg: float, roll_deg: float) -> np.ndarray:
    """Axis-angle (3,) of yaw (about y) * pitch (about x) * roll (about z)."""
    rotation = Rotation.from_euler("YXZ", [yaw_deg, pitch_deg, roll_deg], degrees=True)
    return rotation.as_rotvec().astype(np.float32)


def _light(rng: np.random.Generator, config: SyntheticConfig) -> Dict:
    """SH or Lambert + ambient light, and an optional highlight, for one image."""
    tint = (1.0 + rng.normal(0.0, 0.06, 3)).astype(np.float32)
    key = _unit(rng.normal(0.0, 1.0, 3) + np.asarray([0.0, 0.3, 1.2]))
    sh = np.zeros((9, 3), np.float32)
    ambient = np.zeros(3, np.float32)
    directions = np.stack([key, _unit(rng.normal(0.0, 1.0, 3))]).astype(np.float32)
    colours = np.zeros((2, 3), np.float32)
    if rng.random() < config.lambert_probability:
        sh_weight = 0.0
        ambient = rng.uniform(0.1, 0.6) * tint
        colours[0] = rng.uniform(0.4, 1.0) * tint
        colours[1] = rng.uniform(0.0, 0.35) * (1.0 + rng.normal(0.0, 0.1, 3))
    else:
        sh_weight = 1.0
        base = rng.uniform(2.0, 3.6)
        sh[0] = base * tint
        sh[1:4] = (rng.uniform(0.0, 1.0) * base * key)[:, None] * tint[None]
        sh[4:] = rng.normal(0.0, 0.08 * base, (5, 3)) * tint[None]
    specular = np.zeros(3, np.float32)
    if rng.random() < config.specular_probability:
        specular = (rng.uniform(0.02, 0.25) * (1.0 + rng.normal(0.0, 0.05, 3))).astype(np.float32)
    return dict(sh_light=sh, sh_weight=np.float32(sh_weight), ambient=ambient.astype(np.float32),
                light_directions=directions, light_colours=np.clip(colours, 0, None),
                specular=specular, shininess=np.float32(rng.uniform(5.0, 60.0)))


def _albedo_offset(rng: np.random.Generator, host: HostModel, config: SyntheticConfig
                   ) -> np.ndarray:
    """(V, 3) per-vertex noise plus a few soft blotches (moles, make-up, redness)."""
    template = host.template
    offset = rng.normal(0.0, config.vertex_noise_std, template.shape).astype(np.float32)
    for _ in range(int(rng.integers(0, config.blotch_count + 1))):
        centre = template[rng.integers(0, len(template))]
        radius = rng.uniform(0.003, 0.03)
        weight = np.exp(-np.sum((template - centre) ** 2, -1) / (2 * radius ** 2))
        offset += weight[:, None] * rng.normal(0.0, 0.06, 3).astype(np.float32)
    return offset


def sample_scenes(host: HostModel, config: SyntheticConfig, subject_index: int,
                  image_indices: Sequence[int], seed: int) -> Scenes:
    """Numpy `Scenes` for the given images of one subject (deterministic)."""
    identity = _identity(host, config, seed, subject_index)
    rows = []
    for image_index in image_indices:
        rng = _rng(seed, subject_index, _IMAGE_STREAM, image_index)
        expression = np.zeros(host.num_expression, np.float32)
        jaw = np.zeros(3, np.float32)
        if rng.random() >= config.neutral_probability:
            std = np.full(host.num_expression, config.expression_std * 0.5)
            std[:20] = config.expression_std
            expression = rng.normal(0.0, std).astype(np.float32)
            jaw[0] = rng.uniform(0.0, config.jaw_open_max_rad)
            jaw[1:] = rng.normal(0.0, 0.02, 2)
        gaze = rng.uniform(-config.eye_rotation_max_rad, config.eye_rotation_max_rad, 2)
        eye = np.asarray([gaze[0], gaze[1], 0.0] * 2, np.float32)
        pose = _head_rotation(rng.uniform(-config.max_yaw_deg, config.max_yaw_deg),
                              rng.uniform(-config.max_pitch_deg, config.max_pitch_deg),
                              rng.uniform(-config.max_roll_deg, config.max_roll_deg))
        inverse_distance = 0.0
        if rng.random() < config.perspective_probability:
            inverse_distance = 1.0 / rng.uniform(*config.camera_distance_m)
        row = dict(
            shape=identity["shape"], expression=expression, global_pose=pose, jaw_pose=jaw,
            eye_pose=eye,
            texture=(identity["texture"] + rng.normal(0.0, 0.1, host.num_texture)).astype(
                np.float32),
            albedo_gain=(identity["gain"] * (1.0 + rng.normal(0.0, 0.03, 3))).astype(np.float32),
            albedo_offset=_albedo_offset(rng, host, config),
            hair_weight=identity["hair"], hair_colour=identity["hair_colour"],
            inverse_distance=np.float32(inverse_distance),
            landmark_noise=rng.normal(0.0, 1.0, (68, 2)).astype(np.float32),
            box_jitter=rng.uniform(-1.0, 1.0, 3).astype(np.float32),
            **_light(rng, config))
        # Drawn last, so every other draw of the image is the same whatever the probability.
        row["fallback_crop"] = np.float32(rng.random() < config.fallback_crop_probability)
        rows.append(row)
    return Scenes(**{name: np.stack([np.asarray(row[name], np.float32) for row in rows])
                     for name in rows[0]})


def _unit_light(batch: int, dtype) -> Array:
    """(B, 9, 3) SH light whose shading is exactly 1: render then returns the albedo."""
    return jnp.zeros((batch, 9, 3), dtype).at[:, 0, :].set(1.0 / float(shading.SH_CONSTANTS[0]))


def _posed(model: flame_jax.FlameModel, scenes: Scenes):
    """(posed FlameOutput, distort) of the scenes: FLAME forward and the pinhole-like
    distortion about the face centre (x, y scale by d / (d - (z - z_centre)))."""
    batch = scenes.shape.shape[0]
    zeros = jnp.zeros((batch, 3), model.v_template.dtype)
    params = flame_jax.FlameParams(
        shape=scenes.shape, expression=scenes.expression, global_pose=scenes.global_pose,
        neck_pose=zeros, jaw_pose=scenes.jaw_pose, eye_pose=scenes.eye_pose, translation=zeros)
    posed = flame_jax.forward(model, params)
    centre = jnp.mean(posed.landmarks, axis=1, keepdims=True)

    def distort(points):
        depth = (points[..., 2:3] - centre[..., 2:3]) * scenes.inverse_distance[:, None, None]
        factor = 1.0 / jnp.clip(1.0 - depth, 0.2, None)
        return jnp.concatenate([centre[..., :2] + (points[..., :2] - centre[..., :2]) * factor,
                                points[..., 2:]], -1)

    return posed, params, distort


@jax.jit
def scene_landmarks(model: flame_jax.FlameModel, scenes: Scenes) -> Array:
    """(N, 68, 3) metres: the landmarks the camera sees (posed, distorted; model frame)."""
    posed, _, distort = _posed(model, scenes)
    return distort(posed.landmarks)


@dataclasses.dataclass(frozen=True)
class CropGeometry:
    """The detector's view of N images and the crops it gives (host numpy).

      detected (N, 68, 2): the landmarks a detector reports, in the reference photo frame
        (`recon.image.crop.reference_points`); box (N, 4): the detector-like box;
      matrix (N, 2, 3): reference frame -> crop pixels (`recon.image.crop_matrix`);
      roll (N,) radians and camera (N, 3): how the renderer draws that crop directly.
    """

    detected: np.ndarray
    box: np.ndarray
    matrix: np.ndarray
    roll: np.ndarray
    camera: np.ndarray


def crop_geometry(landmarks_3d: np.ndarray, scenes: Scenes, config: SyntheticConfig,
                  template: Optional[np.ndarray] = None) -> CropGeometry:
    """The crop of each image, made from what a detector would report (see the module
    docstring): the landmarks plus `config.landmark_noise`, the box around them (plus the box
    jitter for box crops), then `recon.image.crop_matrix` as for a photo. Images marked
    `scenes.fallback_crop` are cropped from the jittered box alone: `template` (68, 2), the
    template's landmarks (`recon.image.crop.template_points`), placed on it."""
    detected, boxes, matrices, rolls, cameras = [], [], [], [], []
    spec = config.crop
    for index in range(len(landmarks_3d)):
        points = crop_lib.reference_points(landmarks_3d[index])
        side = float(np.mean(points.max(0) - points.min(0)))
        points = points + config.landmark_noise * side * np.asarray(
            scenes.landmark_noise[index], np.float64)
        box = crop_lib.box_from_landmarks(points)
        fallback = bool(scenes.fallback_crop[index] > 0)
        if spec.anchor == "box" or fallback:
            jitter = np.asarray(scenes.box_jitter[index], np.float64)
            centre = (box[:2] + box[2:]) / 2.0 + config.box_shift_jitter * jitter[1:] * (
                box[2:] - box[:2])
            half = (box[2:] - box[:2]) / 2.0 * (1.0 + config.box_scale_jitter * jitter[0])
            box = np.concatenate([centre - half, centre + half])
        if fallback:
            if template is None:
                raise ValueError("crop_geometry: fallback crops need the template's landmarks")
            points = crop_lib.place_on_box(template, box)
        matrix = crop_lib.crop_matrix(spec, box=box, landmarks=points)
        roll, camera = crop_lib.crop_camera(matrix, spec.size)
        detected.append(points)
        boxes.append(box)
        matrices.append(matrix)
        rolls.append(roll)
        cameras.append(camera)
    return CropGeometry(detected=np.asarray(detected), box=np.asarray(boxes),
                        matrix=np.asarray(matrices), roll=np.asarray(rolls, np.float32),
                        camera=np.asarray(cameras, np.float32))


def _roll(points: Array, roll: Array) -> Array:
    """(N, P, 3) points rotated by roll (N,) about the model z axis (counter-clockwise seen
    from the camera)."""
    cos, sin = jnp.cos(roll)[:, None], jnp.sin(roll)[:, None]
    x, y = points[..., 0], points[..., 1]
    return jnp.stack([cos * x - sin * y, sin * x + cos * y, points[..., 2]], axis=-1)


@functools.partial(jax.jit, static_argnames="settings")
def render_scenes(model: flame_jax.FlameModel, scenes: Scenes, rolls: Array, cameras: Array, *,
                  settings: rasterizer.RasterSettings) -> RenderedScenes:
    """FLAME + crop roll and camera (`crop_geometry`) + renderer + light for N images."""
    batch = scenes.shape.shape[0]
    dtype = model.v_template.dtype
    posed, params, distort = _posed(model, scenes)
    neutral = flame_jax.forward(model, params.replace(
        expression=jnp.zeros_like(scenes.expression), global_pose=jnp.zeros_like(
            scenes.global_pose), jaw_pose=jnp.zeros_like(scenes.jaw_pose),
        eye_pose=jnp.zeros_like(scenes.eye_pose))).vertices
    vertices = _roll(distort(posed.vertices), rolls)
    landmarks = _roll(distort(posed.landmarks), rolls)
    camera = cameras.astype(dtype)

    albedo = shading.albedo_from_texture(model.albedo_mean, model.albedo_basis, scenes.texture)
    albedo = albedo * scenes.albedo_gain[:, None, :] + scenes.albedo_offset
    hair = scenes.hair_weight[..., None]
    albedo = jnp.clip(albedo * (1 - hair) + scenes.hair_colour[:, None, :] * hair, 0.0, 1.0)

    out = render_lib.render(vertices, model.faces, camera, _unit_light(batch, dtype), albedo,
                            settings=settings)
    normals = out.normals
    unit_normals = normals * jax.lax.rsqrt(jnp.maximum(jnp.sum(normals ** 2, -1, keepdims=True),
                                                       1e-12))
    irradiance = scenes.sh_weight[:, None, None, None] * shading.sh_shading(normals,
                                                                           scenes.sh_light)
    cosines = jnp.einsum("bhwc,blc->bhwl", unit_normals, scenes.light_directions)
    irradiance += scenes.ambient[:, None, None, :] + jnp.einsum(
        "bhwl,blc->bhwc", jnp.maximum(cosines, 0.0), scenes.light_colours)
    half = scenes.light_directions[:, 0] + jnp.asarray([0.0, 0.0, 1.0], dtype)
    half = half / jnp.linalg.norm(half, axis=-1, keepdims=True)
    highlight = jnp.maximum(jnp.einsum("bhwc,bc->bhw", unit_normals, half), 0.0)
    highlight = highlight ** scenes.shininess[:, None, None]
    foreground = out.image * irradiance + highlight[..., None] * scenes.specular[:, None, None, :]

    if model.masks is not None and "face" in model.masks:
        face_vertices = model.vertex_mask("face")[None] & (scenes.hair_weight < 0.5)
    else:  # no face mask in this model: every visible hairless triangle counts
        face_vertices = scenes.hair_weight < 0.5
    face_faces = jnp.all(face_vertices[:, model.faces], axis=-1)  # (N, F)
    visible = out.face_index >= 0
    face_region = visible & jnp.take_along_axis(
        face_faces, jnp.where(visible, out.face_index, 0).reshape(batch, -1), axis=1
    ).reshape(visible.shape)

    pixels = camera_lib.project_to_pixels(landmarks, camera, (settings.height, settings.width))
    return RenderedScenes(foreground=foreground, alpha=out.alpha,
                          face_region=face_region.astype(dtype), landmarks=pixels[..., :2],
                          neutral_vertices=neutral, camera=camera, overflow=out.overflow)


@dataclasses.dataclass(frozen=True)
class Composition:
    """Host-side layers of one crop, for tests and figures: background (S, S, 3),
    occluder_alpha (S, S) in [0, 1], face_box (4,) [left, top, right, bottom] crop pixels."""

    background: np.ndarray
    occluder_alpha: np.ndarray
    face_box: np.ndarray


def compose_example(rendered: Dict[str, np.ndarray], config: SyntheticConfig, *, seed: int,
                    subject_index: int, image_index: int) -> Tuple[Dict[str, np.ndarray],
                                                                   Composition]:
    """One rendered crop (numpy, no batch axis) -> (example dict, its composition layers).

    The example holds `crops` (S, S, 3) float32 in [0, 1] (the crop at its own size, from which
    the backbone input is made) and, at the losses' size L, `images`, `landmarks`,
    `landmark_weights`, `skin_masks`, plus `vertices`, `has_3d`, `subject_ids`. The skin mask
    is the face region times (occluder alpha == 0), so no occluder pixel is ever skin.
    """
    rng = _rng(seed, subject_index, _COMPOSE_STREAM, image_index)
    size = (config.crop.size, config.crop.size)
    landmarks = np.asarray(rendered["landmarks"], np.float32)
    face_box = np.concatenate([landmarks.min(0), landmarks.max(0)]).astype(np.float32)
    back = augment.background(rng, size, config.augment)
    alpha = np.asarray(rendered["alpha"], np.float32)[..., None]
    image = alpha * np.clip(np.asarray(rendered["foreground"], np.float32), 0, 1) + (
        1 - alpha) * back
    occluder_colour, occluder_alpha = augment.occluders(rng, size, face_box, config.augment)
    image = occluder_alpha[..., None] * occluder_colour + (1 - occluder_alpha[..., None]) * image
    image = np.clip(augment.degrade(rng, image.astype(np.float32), config.augment), 0.0, 1.0)
    skin = np.asarray(rendered["face_region"], np.float32) * (occluder_alpha == 0)
    loss_size = config.loss_size
    ratio = loss_size / config.crop.size
    if loss_size != config.crop.size:
        images = preprocess.resize(image[None], loss_size)[0]
        skin_masks = preprocess.resize(skin[None, ..., None], loss_size)[0, ..., 0]
    else:
        images, skin_masks = image, skin
    landmarks_loss = landmarks * np.float32(ratio)
    inside = np.all((landmarks_loss >= 0) & (landmarks_loss < loss_size), -1)
    example = dict(
        crops=image.astype(np.float32),
        images=np.clip(images, 0.0, 1.0).astype(np.float32),
        landmarks=landmarks_loss.astype(np.float32),
        landmark_weights=inside.astype(np.float32),
        skin_masks=np.clip(skin_masks, 0.0, 1.0).astype(np.float32),
        vertices=np.asarray(rendered["neutral_vertices"], np.float32),
        has_3d=np.float32(1.0),
        subject_ids=np.int32(subject_index))
    return example, Composition(background=back, occluder_alpha=occluder_alpha,
                                face_box=face_box)


def render_batch(model: flame_jax.FlameModel, config: SyntheticConfig, scenes: Scenes,
                 template: Optional[np.ndarray] = None
                 ) -> Tuple[Dict[str, np.ndarray], CropGeometry]:
    """The device stages for the images of `scenes`: (numpy dict of `RenderedScenes` fields
    with a leading (N,) axis, their `CropGeometry`). Raises if the rasterizer overflowed.
    template: the model's `HostModel.template_points` when the caller holds them (fallback
    crops need them; computed here otherwise)."""
    device_scenes = jax.tree.map(jnp.asarray, scenes)
    landmarks_3d = np.asarray(scene_landmarks(model, device_scenes), np.float64)
    if template is None and np.any(np.asarray(scenes.fallback_crop) > 0):
        template = crop_lib.template_points(model)
    geometry = crop_geometry(landmarks_3d, scenes, config, template)
    out = render_scenes(model, device_scenes, jnp.asarray(geometry.roll),
                        jnp.asarray(geometry.camera), settings=config.raster_settings)
    out = {field.name: np.asarray(getattr(out, field.name)) for field in dataclasses.fields(out)}
    if np.any(out["overflow"] > 0):
        raise RuntimeError(f"synthetic images: rasterizer capacity overflow "
                           f"{out['overflow'].tolist()} (raise RasterSettings capacities)")
    return out, geometry


def _stack(examples: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    return {name: np.stack([example[name] for example in examples]) for name in examples[0]}


def make_subjects(model: flame_jax.FlameModel, config: SyntheticConfig,
                  subject_indices: Sequence[int], image_indices: Sequence[int], seed: int,
                  host: Optional[HostModel] = None) -> list:
    """[one dict per subject with a leading (K,) axis] for several subjects, rendered in one
    device call (faster than one call per subject; each image stays fixed by its indices)."""
    host = host or HostModel.from_model(model)
    per_subject = [sample_scenes(host, config, subject, image_indices, seed)
                   for subject in subject_indices]
    scenes = jax.tree.map(lambda *rows: np.concatenate(rows), *per_subject)
    rendered, _ = render_batch(model, config, scenes, host.template_points)
    k = len(image_indices)
    subjects = []
    for s, subject in enumerate(subject_indices):
        examples = []
        for j, image_index in enumerate(image_indices):
            row = {name: value[s * k + j] for name, value in rendered.items()}
            examples.append(compose_example(row, config, seed=seed, subject_index=subject,
                                            image_index=image_index)[0])
        subjects.append(_stack(examples))
    return subjects


def make_subject(model: flame_jax.FlameModel, config: SyntheticConfig, subject_index: int,
                 image_indices: Sequence[int], seed: int,
                 host: Optional[HostModel] = None) -> Dict[str, np.ndarray]:
    """K examples of one subject rendered in one call: dict of fields with a leading (K,)."""
    return make_subjects(model, config, [subject_index], image_indices, seed, host)[0]


def make_example(model: flame_jax.FlameModel, config: SyntheticConfig, subject_index: int,
                 image_index: int, seed: int) -> Dict[str, np.ndarray]:
    """One synthetic example (numpy, no batch axis; fields of `compose_example`).

    Each image depends only on (seed, subject_index, image_index): it equals the matching row
    of `make_subject` bit for bit when rendered in a batch of the same size, and to float
    rounding (measured <= 1e-4 in pixel values and 2e-7 m) otherwise, because XLA compiles a
    batch of 1 differently.
    """
    subject = make_subject(model, config, subject_index, [image_index], seed)
    return {name: value[0] for name, value in subject.items()}


def _in_worker_process() -> bool:
    return multiprocessing.parent_process() is not None


class PicklableModel:
    """A FLAME model that pickles as numpy arrays and becomes jax arrays on first use.

    For grain worker processes: when unpickled in a child process, JAX is pinned to the CPU
    before any jax array exists there, so workers never claim an accelerator the trainer owns.
    """

    def __init__(self, model: flame_jax.FlameModel):
        self._numpy = jax.tree.map(np.asarray, model)
        self._model: Optional[flame_jax.FlameModel] = model

    def get(self) -> flame_jax.FlameModel:
        if self._model is None:
            self._model = jax.tree.map(jnp.asarray, self._numpy)
        return self._model

    def __getstate__(self):
        return {"_numpy": self._numpy, "_model": None}

    def __setstate__(self, state):
        if _in_worker_process():
            jax.config.update("jax_platforms", "cpu")
        self.__dict__.update(state)


class SyntheticSource:
    """A grain random-access source: record i = subject `subjects[i]` with its K images
    (`make_subject`, one render call for the K images), with `backbone_inputs` made from the
    crops (`recon.image.backbone_input` of `backbone_kind`). Picklable for grain's worker
    processes (see `PicklableModel`)."""

    def __init__(self, model: flame_jax.FlameModel, config: SyntheticConfig = SyntheticConfig(),
                 *, backbone_kind: str = "arcface", subjects: range = TRAIN_SUBJECTS,
                 images_per_subject: int = 2, seed: int = 0):
        if images_per_subject < 1:
            raise ValueError(f"images_per_subject must be >= 1, got {images_per_subject}")
        if len(subjects) == 0:
            raise ValueError("subjects is empty")
        preprocess.BACKBONE_INPUT_SIZE[backbone_kind]  # noqa: B018 - a KeyError names the kind
        self.config = config
        self.backbone_kind = backbone_kind
        self.subjects = subjects
        self.images_per_subject = int(images_per_subject)
        self.seed = int(seed)
        self._model = PicklableModel(model)
        self._host = HostModel.from_model(model)

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, record_key: int) -> Dict[str, np.ndarray]:
        record = make_subject(self._model.get(), self.config, self.subjects[int(record_key)],
                              range(self.images_per_subject), self.seed, self._host)
        record["backbone_inputs"] = preprocess.backbone_input(record.pop("crops"),
                                                              self.backbone_kind)
        return record

    def __repr__(self) -> str:
        return (f"SyntheticSource(subjects={self.subjects}, images_per_subject="
                f"{self.images_per_subject}, seed={self.seed}, crop={self.config.crop}, "
                f"image_size={self.config.loss_size}, backbone={self.backbone_kind})")
