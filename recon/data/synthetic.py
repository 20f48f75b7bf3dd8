"""Synthetic 2D-3D training pairs drawn from the FLAME model itself and our renderer.

Each subject is a random identity (FLAME shape coefficients, skin tone, texture coefficients,
hair colour and hairline), fixed by `(seed, subject_index)`. Each of its images is fixed by
`(seed, subject_index, image_index)`: expression, jaw, gaze, head pose (yaw up to +-40 degrees,
smaller pitch and roll), a face-detector-like crop (box from the projected landmarks, scale and
shift jitter), optional perspective distortion, light (DECA's 9-band SH, or Lambert directional
+ ambient, plus a Blinn-Phong highlight), albedo beyond the basis (tint, per-vertex noise,
blotches), and the host-side randomisation of `recon.data.augment` (structured backgrounds,
occluders, blur, noise, JPEG, colour jitter).

Two stages:
  `render_scenes(model, scenes, settings=...)`: jitted; FLAME forward, crop camera, render,
    shading, face-region mask, landmarks, for a batch of images in one call (the renderer is
    the cost).
  `compose_example(...)`: numpy/cv2; background, occluders, skin mask, degradations, the 112
    backbone input.
`make_subject` runs both for the K images of one subject; `make_example` is one image of it.

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
from recon import camera as camera_lib
from recon import rasterizer, shading
from recon import render as render_lib
from recon.backbone.preprocess import backbone_input_from_crop
from recon.data import augment

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

    image_size: the square crop (224: the 2D losses' image).
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
    box_scale: crop side / mean side of the 68-landmark box (DECA: 1.1 * 1.25).
    box_scale_jitter: the side is scaled by U(1 - j, 1 + j) (a detector's box size error).
    box_shift_jitter: the centre moves by U(-j, j) crop sides in x and y.
    perspective_probability, camera_distance_m: chance of a pinhole-like distortion of the
      image (camera at U(range) metres); the ground-truth meshes are never distorted.
    lambert_probability: chance of Lambert directional + ambient light instead of SH.
    specular_probability: chance of a Blinn-Phong highlight on top.
    augment: host-side randomisation (`recon.data.augment.AugmentConfig`).
    """

    image_size: int = 224
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
    box_scale: float = 1.375
    box_scale_jitter: float = 0.12
    box_shift_jitter: float = 0.07
    perspective_probability: float = 0.5
    camera_distance_m: Tuple[float, float] = (0.4, 3.0)
    lambert_probability: float = 0.4
    specular_probability: float = 0.5
    augment: augment.AugmentConfig = augment.AugmentConfig()

    @property
    def raster_settings(self) -> rasterizer.RasterSettings:
        return rasterizer.RasterSettings(self.image_size, self.image_size)


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
      box_scale (N,) crop side / landmark-box side; box_shift (N, 2) in crop sides.
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
    box_scale: Array
    box_shift: Array


@struct.dataclass
class RenderedScenes:
    """Device output for N images of H x W pixels.

      foreground (N, H, W, 3) shaded face (valid where alpha > 0, not clipped);
      alpha (N, H, W) soft coverage; face_region (N, H, W) float 0/1, pixels whose visible
XX
      landmarks_3d (N, 68, 3) metres, posed and undistorted (FLAME's);
      posed_vertices and neutral_vertices (N, V, 3) metres (undistorted); camera (N, 3);
      overflow (N,) int32 from the rasterizer (0 = complete image).
    """

    foreground: Array
    alpha: Array
    face_region: Array
    landmarks: Array
    landmarks_3d: Array
    posed_vertices: Array
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
        return cls(template=template, num_shape=model.num_shape,
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
            box_scale=np.float32(config.box_scale * rng.uniform(1.0 - config.box_scale_jitter,
                                                                1.0 + config.box_scale_jitter)),
            box_shift=rng.uniform(-config.box_shift_jitter, config.box_shift_jitter,
                                  2).astype(np.float32),
            **_light(rng, config))
        rows.append(row)
    return Scenes(**{name: np.stack([np.asarray(row[name], np.float32) for row in rows])
                     for name in rows[0]})


def _unit_light(batch: int, dtype) -> Array:
    """(B, 9, 3) SH light whose shading is exactly 1: render then returns the albedo."""
    return jnp.zeros((batch, 9, 3), dtype).at[:, 0, :].set(1.0 / float(shading.SH_CONSTANTS[0]))


@functools.partial(jax.jit, static_argnames="settings")
def render_scenes(model: flame_jax.FlameModel, scenes: Scenes, *,
                  settings: rasterizer.RasterSettings) -> RenderedScenes:
    """FLAME + crop camera + renderer + light for N images in one call (see `Scenes`)."""
    batch = scenes.shape.shape[0]
    dtype = model.v_template.dtype
    zeros = jnp.zeros((batch, 3), dtype)
    params = flame_jax.FlameParams(
        shape=scenes.shape, expression=scenes.expression, global_pose=scenes.global_pose,
        neck_pose=zeros, jaw_pose=scenes.jaw_pose, eye_pose=scenes.eye_pose, translation=zeros)
    posed = flame_jax.forward(model, params)
    neutral = flame_jax.forward(model, params.replace(
        expression=jnp.zeros_like(scenes.expression), global_pose=zeros, jaw_pose=zeros,
        eye_pose=jnp.zeros_like(scenes.eye_pose))).vertices

    # Pinhole-like distortion about the face centre: x, y scale by d / (d - (z - z_centre)).
    centre = jnp.mean(posed.landmarks, axis=1, keepdims=True)

    def distort(points):
        depth = (points[..., 2:3] - centre[..., 2:3]) * scenes.inverse_distance[:, None, None]
        factor = 1.0 / jnp.clip(1.0 - depth, 0.2, None)
        return jnp.concatenate([centre[..., :2] + (points[..., :2] - centre[..., :2]) * factor,
                                points[..., 2:]], -1)

    vertices = distort(posed.vertices)
    landmarks = distort(posed.landmarks)

    # Face-detector-like crop: the landmark box, scaled and shifted, fills the image.
    low = jnp.min(landmarks[..., :2], axis=1)
    high = jnp.max(landmarks[..., :2], axis=1)
    side = jnp.mean(high - low, axis=-1) * scenes.box_scale
    box_centre = (low + high) / 2 + scenes.box_shift * side[:, None]
    camera = jnp.concatenate([(2.0 / side)[:, None], -box_centre], axis=-1)

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
                          landmarks_3d=posed.landmarks, posed_vertices=posed.vertices,
                          neutral_vertices=neutral, camera=camera, overflow=out.overflow)


@dataclasses.dataclass(frozen=True)
class Composition:
    """Host-side layers of one image, for tests and figures: background (H, W, 3),
    occluder_alpha (H, W) in [0, 1], face_box (4,) [left, top, right, bottom] pixels."""

    background: np.ndarray
    occluder_alpha: np.ndarray
    face_box: np.ndarray


def compose_example(rendered: Dict[str, np.ndarray], config: SyntheticConfig, *, seed: int,
                    subject_index: int, image_index: int) -> Tuple[Dict[str, np.ndarray],
                                                                   Composition]:
    """One rendered image (numpy, no batch axis) -> (example dict, its composition layers).

    The example has the `recon.types.Batch` fields without the batch axis; the skin mask is
    the face region times (occluder alpha == 0), so no occluder pixel is ever skin.
    """
    rng = _rng(seed, subject_index, _COMPOSE_STREAM, image_index)
    size = (config.image_size, config.image_size)
    landmarks = np.asarray(rendered["landmarks"], np.float32)
    face_box = np.concatenate([landmarks.min(0), landmarks.max(0)]).astype(np.float32)
    back = augment.background(rng, size, config.augment)
    alpha = np.asarray(rendered["alpha"], np.float32)[..., None]
    image = alpha * np.clip(np.asarray(rendered["foreground"], np.float32), 0, 1) + (
        1 - alpha) * back
    occluder_colour, occluder_alpha = augment.occluders(rng, size, face_box, config.augment)
    image = occluder_alpha[..., None] * occluder_colour + (1 - occluder_alpha[..., None]) * image
    image = augment.degrade(rng, image.astype(np.float32), config.augment)
    skin = np.asarray(rendered["face_region"], np.float32) * (occluder_alpha == 0)
    inside = np.all((landmarks >= 0) & (landmarks < np.asarray(size[::-1], np.float32)), -1)
    example = dict(
        images=image,
        backbone_images=backbone_input_from_crop(image, max_value=1.0),
        landmarks=landmarks,
        landmark_weights=inside.astype(np.float32),
        skin_masks=skin.astype(np.float32),
        vertices=np.asarray(rendered["neutral_vertices"], np.float32),
        posed_vertices=np.asarray(rendered["posed_vertices"], np.float32),
        has_3d=np.float32(1.0),
        subject_ids=np.int32(subject_index))
    return example, Composition(background=back, occluder_alpha=occluder_alpha,
                                face_box=face_box)


def render_subject(model: flame_jax.FlameModel, config: SyntheticConfig, subject_index: int,
                   image_indices: Sequence[int], seed: int,
                   host: Optional[HostModel] = None) -> Dict[str, np.ndarray]:
    """The device stage for K images of one subject: numpy dict of `RenderedScenes` fields
    with a leading (K,) axis. Raises if the rasterizer's static capacities overflowed."""
    host = host or HostModel.from_model(model)
    scenes = sample_scenes(host, config, subject_index, image_indices, seed)
    out = render_scenes(model, jax.tree.map(jnp.asarray, scenes),
                        settings=config.raster_settings)
    out = {field.name: np.asarray(getattr(out, field.name)) for field in dataclasses.fields(out)}
    if np.any(out["overflow"] > 0):
        raise RuntimeError(f"synthetic subject {subject_index}: rasterizer capacity overflow "
                           f"{out['overflow'].tolist()} (raise RasterSettings capacities)")
    return out


def make_subject(model: flame_jax.FlameModel, config: SyntheticConfig, subject_index: int,
                 image_indices: Sequence[int], seed: int,
                 host: Optional[HostModel] = None) -> Dict[str, np.ndarray]:
    """K examples of one subject rendered in one call: dict of `Batch` fields, leading (K,)."""
    rendered = render_subject(model, config, subject_index, image_indices, seed, host)
    examples = []
    for k, image_index in enumerate(image_indices):
        example, _ = compose_example({name: value[k] for name, value in rendered.items()},
                                     config, seed=seed, subject_index=subject_index,
                                     image_index=image_index)
        examples.append(example)
    return {name: np.stack([example[name] for example in examples]) for name in examples[0]}


def make_example(model: flame_jax.FlameModel, config: SyntheticConfig, subject_index: int,
                 image_index: int, seed: int) -> Dict[str, np.ndarray]:
    """One synthetic example (numpy, no batch axis) with the fields of `recon.types.Batch`.

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
    (`make_subject`, one render call for the K images). Picklable for grain's worker processes
    (see `PicklableModel`)."""

    def __init__(self, model: flame_jax.FlameModel, config: SyntheticConfig = SyntheticConfig(),
                 *, subjects: range = TRAIN_SUBJECTS, images_per_subject: int = 2, seed: int = 0):
        if images_per_subject < 1:
            raise ValueError(f"images_per_subject must be >= 1, got {images_per_subject}")
        if len(subjects) == 0:
            raise ValueError("subjects is empty")
        self.config = config
        self.subjects = subjects
        self.images_per_subject = int(images_per_subject)
        self.seed = int(seed)
        self._model = PicklableModel(model)
        self._host = HostModel.from_model(model)

    def __len__(self) -> int:
        return len(self.subjects)

    def __getitem__(self, record_key: int) -> Dict[str, np.ndarray]:
        return make_subject(self._model.get(), self.config, self.subjects[int(record_key)],
                            range(self.images_per_subject), self.seed, self._host)

    def __repr__(self) -> str:
        return (f"SyntheticSource(subjects={self.subjects}, images_per_subject="
                f"{self.images_per_subject}, seed={self.seed}, image_size="
                f"{self.config.image_size})")
