"""Analysis-by-synthesis fitting of FLAME to one face crop through `recon.render`.

Everything happens in one square face crop (`recon.image.crop_image`; `python -m recon.predict`
cuts `recon.predict.FIT_CROP`, 224 px, or the regressor's own crop) at the size of the images
it is given (`FitTarget.size`), with the conventions of `recon.render.camera` (the camera is in
NDC, so a code means the same view at any size). Four stages, each a Python loop over one
jitted Adam step (`fit_step`; the stage is a traced `StageControl`, so only two programs
compile per crop size: with and without the renderer), deterministic (no randomness at all):

  1. "rigid":       camera and head rotation on the 68 landmarks;
  2. "landmarks":   + shape, expression and jaw, with L2 priors;
  3. "appearance":  texture and SH light alone (geometry frozen) on the photometric loss: L1
     colour difference in the skin region (rendered FLAME "face" region, intersected with a
     YCbCr skin-colour mask of the photo), texture prior and a light regulariser (penalises
     coloured light). Without it the first photometric steps, with the mean albedo and a
     default light, would pull the geometry away from the landmarks to explain colours;
  4. "photometric": everything together: photometric + landmarks + all priors.

Variables are optimised in comparable units so that one learning rate fits all: shape,
expression and texture in standard deviations, poses in radians, the camera as
log(scale / scale0) and an NDC offset, the light in shading units (the SH code divided by
DECA's constant factors, so a unit changes the shading by about one).

Losses are `recon.losses`' (DECA's, per example): `landmark_loss_ndc` (L1 in NDC units, our
per-landmark weights as the visibility), `photometric_loss` (mean over the crop of
mask * |alpha * render - photo|), `squared_norm_regularizer` (shape, expression, texture, jaw)
and `light_regularizer` (coloured light) on the SH code.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

import flame_jax
from recon import losses
from recon import render as render_lib
from recon.render import camera as camera_lib
from recon.render import rasterizer, shading
from recon.types import Code

Array = jax.Array
STAGES = ("rigid", "landmarks", "appearance", "photometric")
# Fields each stage optimises (the rest get zero updates).
_TRAINABLE = {
    "rigid": ("log_scale", "offset", "global_pose"),
    "landmarks": ("log_scale", "offset", "global_pose", "jaw_pose", "shape", "expression"),
    "appearance": ("texture", "light"),
    "photometric": ("log_scale", "offset", "global_pose", "jaw_pose", "shape", "expression",
                    "texture", "light"),
}
# Inner (non-contour) iBUG points used for the closed-form camera initialisation.
_INNER = slice(17, 68)


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """Fitting schedule and loss weights (hashable: a static argument of the jitted step).

    Weights follow DECA's coarse stage (landmark 1, photometric 2, shape / expression /
    texture priors 1e-4 on half the squared norm, light 1); the jaw prior keeps an
    unconstrained jaw from opening to explain lip landmarks.
    """

    rigid_steps: int = 100
    landmark_steps: int = 200
    appearance_steps: int = 40
    photometric_steps: int = 60
    learning_rate: float = 0.01
    appearance_learning_rate: float = 0.05
    photometric_learning_rate: float = 0.005
    landmark_weight: float = 1.0
    photometric_weight: float = 2.0
    shape_prior: float = 1e-4
    expression_prior: float = 1e-4
    texture_prior: float = 1e-4
    jaw_prior: float = 1e-2
    light_prior: float = 1.0
    num_shape: int = 300
    num_expression: int = 100
    num_texture: int = 50
    sigma: float = 0.5
    skin_colour_mask: bool = True

    def __post_init__(self):
        for name in ("rigid_steps", "landmark_steps", "appearance_steps", "photometric_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"FitOptions.{name} must be >= 0, got {getattr(self, name)}")
        if min(self.learning_rate, self.appearance_learning_rate,
               self.photometric_learning_rate) <= 0:
            raise ValueError("FitOptions learning rates must be positive")


@struct.dataclass
class FitAssets:
    """What the fit needs besides the photo (an argument of the jitted step, never captured).

      model: `flame_jax.FlameModel`.
      albedo_mean: (V, 3), albedo_basis: (V, 3, n_texture) per-vertex albedo space.
      face_region: (F,) float32, 1 for triangles of the face region (photometric loss).
    """

    model: flame_jax.FlameModel
    albedo_mean: Array
    albedo_basis: Array
    face_region: Array


@struct.dataclass
class FitTarget:
    """One batch of B crops of S x S pixels to fit (S: `size`, any square size).

      image: (B, S, S, 3) float32 RGB in [0, 1].
      landmarks: (B, 68, 2) float32 iBUG-68 targets, crop pixels.
      landmark_weights: (B, 68) float32.
      skin: (B, S, S) float32 in [0, 1], where the photo may be compared (skin colour).
      camera0: (B, 3) reference camera the camera variables are relative to.
    """

    image: Array
    landmarks: Array
    landmark_weights: Array
    skin: Array
    camera0: Array

    @property
    def size(self) -> int:
        """S, the crops' side in pixels (static under jit: it is a shape)."""
        return int(self.image.shape[1])


@struct.dataclass
class FitVariables:
    """Optimised quantities (B rows each), in the comparable units of the module docstring."""

    shape: Array         # (B, num_shape)
    expression: Array    # (B, num_expression)
    global_pose: Array   # (B, 3) radians
    jaw_pose: Array      # (B, 3) radians
    texture: Array       # (B, num_texture)
    light: Array         # (B, 9, 3) shading units
    log_scale: Array     # (B, 1) log(s / s0)
    offset: Array        # (B, 2) NDC offset of the projection


@struct.dataclass
class FitResult:
    """code: the fitted `Code`; landmarks_2d: (B, 68, 2) crop pixels; history: {stage: (steps,)
    total loss per step (numpy)}; initial/final landmark errors: (B,) mean crop pixels."""

    code: Code
    landmarks_2d: Array
    initial_error_px: np.ndarray
    final_error_px: np.ndarray
    history: dict = struct.field(pytree_node=False, default_factory=dict)


# ----------------------------------------------------------------------------- assets

def make_assets(model: flame_jax.FlameModel,
                albedo_source: Optional[flame_jax.FlameModel] = None) -> FitAssets:
    """FitAssets from a FLAME model; albedo and the face mask from `albedo_source` when the
    model has none (a real FLAME file ships neither; the built-in model has both, on the same
    topology)."""
    source = model if model.albedo_basis is not None else albedo_source
    if source is None or source.albedo_basis is None:
        raise ValueError("the FLAME model has no albedo space; pass albedo_source "
                         "(e.g. flame_jax.synthetic(), same topology)")
    mask_source = model if (model.masks and "face" in model.masks) else albedo_source
    if mask_source is None or not mask_source.masks or "face" not in mask_source.masks:
        raise ValueError("the FLAME model has no 'face' vertex mask; pass albedo_source "
                         "(e.g. flame_jax.synthetic(), same topology)")
    if source.albedo_mean.shape[0] != model.num_vertices:
        raise ValueError(f"albedo source has {source.albedo_mean.shape[0]} vertices, the model "
                         f"{model.num_vertices}")
    in_face = np.zeros(model.num_vertices, bool)
    in_face[np.asarray(mask_source.masks["face"])] = True
    region = in_face[np.asarray(model.faces)].all(axis=1).astype(np.float32)
    return FitAssets(model=model, albedo_mean=jnp.asarray(source.albedo_mean),
                     albedo_basis=jnp.asarray(source.albedo_basis),
                     face_region=jnp.asarray(region))


def skin_colour_mask(image: np.ndarray) -> np.ndarray:
    """(..., H, W, 3) float RGB in [0, 1] -> (..., H, W) float32 {0, 1} skin-coloured pixels.

    The fixed YCbCr box of Chai & Ngan (1999): 77 <= Cb <= 127, 133 <= Cr <= 173 (8-bit
    units). It removes hair, eyebrows, teeth, glasses and background from the photometric term.
    """
    rgb = np.asarray(image, np.float32) * 255.0
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    cb = 128.0 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418688 * g - 0.081312 * b
    return ((cb >= 77) & (cb <= 127) & (cr >= 133) & (cr <= 173)).astype(np.float32)


def make_target(images: np.ndarray, landmarks: np.ndarray, landmark_weights: np.ndarray,
                camera0: np.ndarray, *, skin_colour_mask_on: bool = True) -> FitTarget:
    """FitTarget from numpy crops (B, S, S, 3) of any square size S, landmarks (B, 68, 2)
    pixels of those crops, weights (B, 68) and reference cameras (B, 3)."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be square RGB crops (B, S, S, 3), got {images.shape}")
    batch = images.shape[0]
    landmarks = np.asarray(landmarks, np.float32)
    weights = np.asarray(landmark_weights, np.float32)
    if landmarks.shape != (batch, 68, 2) or weights.shape != (batch, 68):
        raise ValueError(f"landmarks must be ({batch}, 68, 2) and weights ({batch}, 68), got "
                         f"{landmarks.shape} and {weights.shape}")
    if not (np.isfinite(landmarks).all() and np.isfinite(images).all()):
        raise ValueError("images and landmarks must be finite")
    skin = (skin_colour_mask(images) if skin_colour_mask_on
            else np.ones(images.shape[:3], np.float32))
    return FitTarget(image=jnp.asarray(images), landmarks=jnp.asarray(landmarks),
                     landmark_weights=jnp.asarray(weights), skin=jnp.asarray(skin),
                     camera0=jnp.asarray(camera0, jnp.float32))


# ----------------------------------------------------------------------------- variables

def _light_units(dtype) -> Array:
    return jnp.asarray(shading.SH_CONSTANTS, dtype)[:, None]


def default_light(batch_size: int) -> np.ndarray:
    """(B, 27) SH code of a soft white frontal light (shading ~0.8 facing the camera)."""
    units = np.zeros((9, 3), np.float32)
    units[0] = 0.7   # ambient, in shading units
    units[3] = 0.15  # from the camera (+z)
    code = units / shading.SH_CONSTANTS[:, None]
    return np.repeat(code.reshape(1, 27), batch_size, axis=0)


def variables_from_code(code: Code, options: FitOptions) -> FitVariables:
    """Start the fit at `code` (the camera becomes the reference camera0)."""
    batch = code.batch_size

    def fit_width(x, n):
        x = jnp.asarray(x, jnp.float32)[:, :n]
        return jnp.pad(x, ((0, 0), (0, n - x.shape[1])))

    light = jnp.asarray(code.light, jnp.float32).reshape(batch, 9, 3) * _light_units(jnp.float32)
    return FitVariables(
        shape=fit_width(code.shape, options.num_shape),
        expression=fit_width(code.expression, options.num_expression),
        global_pose=jnp.asarray(code.global_pose, jnp.float32),
        jaw_pose=jnp.asarray(code.jaw_pose, jnp.float32),
        texture=fit_width(code.texture, options.num_texture),
        light=light, log_scale=jnp.zeros((batch, 1), jnp.float32),
        offset=jnp.zeros((batch, 2), jnp.float32))


def to_code(variables: FitVariables, camera0: Array) -> Code:
    """FitVariables -> `Code` (camera = (s0 e^log_scale, t0 + offset / s), light in code units)."""
    scale = camera0[:, 0:1] * jnp.exp(variables.log_scale)
    translation = camera0[:, 1:3] + variables.offset * jnp.asarray([1.0, -1.0]) / scale
    batch = variables.shape.shape[0]
    light = (variables.light / _light_units(variables.light.dtype)).reshape(batch, 27)
    return Code(shape=variables.shape, expression=variables.expression,
                pose=jnp.concatenate([variables.global_pose, variables.jaw_pose], -1),
                texture=variables.texture,
                camera=jnp.concatenate([scale, translation], -1), light=light)


# The one compiled FLAME forward outside the fitting step (initialisation, reporting, outputs).
flame_forward = jax.jit(flame_jax.forward, static_argnames="chunk_size")


def initial_camera(model: flame_jax.FlameModel, code: Code, landmarks_px: np.ndarray,
                   weights: np.ndarray, *, image_size: int) -> np.ndarray:
    """(B, 3) weak-perspective camera aligning `code`'s landmarks to the targets (no rotation).

    landmarks_px: (B, 68, 2) pixels of image_size x image_size crops. Least squares over the 51
    inner points: s X + s t = target_ndc (y flipped), linear in (s, s tx, s ty).
    """
    points = np.asarray(flame_forward(model, code.flame_params()).landmarks)[:, _INNER]
    target = np.asarray(camera_lib.pixels_to_ndc(jnp.asarray(landmarks_px),
                                                 (image_size, image_size)))[:, _INNER]
    cameras = []
    for b in range(points.shape[0]):
        w = np.sqrt(np.asarray(weights)[b, _INNER])
        x, y = points[b, :, 0], points[b, :, 1]
        ones, zeros = np.ones_like(x), np.zeros_like(x)
        rows = np.concatenate([np.stack([x, ones, zeros], 1) * w[:, None],
                               np.stack([y, zeros, ones], 1) * w[:, None]])
        rhs = np.concatenate([target[b, :, 0], -target[b, :, 1]]) * np.concatenate([w, w])
        (s, stx, sty), *_ = np.linalg.lstsq(rows, rhs, rcond=None)
        s = max(float(s), 1e-3)
        cameras.append([s, stx / s, sty / s])
    return np.asarray(cameras, np.float32)


# ----------------------------------------------------------------------------- losses

def landmark_error_px(landmarks_2d: Array, target: Array) -> Array:
    """(B, 68, 2) pixels -> (B,) unweighted mean Euclidean distance, pixels."""
    return losses.landmark_error_px(landmarks_2d, target, jnp.ones(landmarks_2d.shape[:2]))


# ----------------------------------------------------------------------------- model

def raster_settings(size: int) -> rasterizer.RasterSettings:
    """Raster settings for a size x size render of a face crop (fitting and overlays).

    Up to 224 px, the renderer's defaults (8,192 tiles; a head at camera scale s = 6...14 needs
    3,300...7,100). Larger, FLAME's triangles grow with the size: one more window class (8 px)
    and tiles in proportion to the area: 24,576 at 448 px, where s = 6...14 needs
    9,500...21,200 (measured on the built-in FLAME).
    """
    size = int(size)
    if size <= 224:
        return rasterizer.RasterSettings(height=size, width=size)
    tiles = int(np.ceil(24576 * max(1.0, (size / 448.0) ** 2)))
    return rasterizer.RasterSettings(height=size, width=size, window_sizes=(2, 4, 8),
                                     tile_capacity=tiles)


def synthesise(variables: FitVariables, assets: FitAssets, target: FitTarget, *,
               with_render: bool, sigma: float = 0.5):
    """-> (code, FlameOutput, landmarks_2d (B, 68, 2) crop px, RenderOutput or None), at the
    target's size."""
    code = to_code(variables, target.camera0)
    flame = flame_jax.forward(assets.model, code.flame_params())
    landmarks_2d = camera_lib.project_to_pixels(flame.landmarks, code.camera,
                                                (target.size, target.size))[..., :2]
    rendered = None
    if with_render:
        albedo = shading.albedo_from_texture(assets.albedo_mean, assets.albedo_basis,
                                             code.texture)
        rendered = render_lib.render(flame.vertices, assets.model.faces, code.camera,
                                     code.sh_light, albedo, settings=raster_settings(target.size),
                                     sigma=sigma)
    return code, flame, landmarks_2d, rendered


@struct.dataclass
class StageControl:
    """What distinguishes the stages, as traced values, so that the two landmark-only stages
    share one compiled step and the two photometric stages another (compiling the rendered
    step dominates a fit's run time on the CPU).

      mask: FitVariables of scalar 0/1, the fields this stage updates.
      learning_rate: scalar Adam step size.
      landmark_on, priors_on: scalar 0/1 switches of the landmark term and the geometry priors.
    """

    mask: FitVariables
    learning_rate: Array
    landmark_on: Array
    priors_on: Array


def stage_control(stage: str, options: FitOptions) -> StageControl:
    """StageControl of one of `STAGES`."""
    if stage not in _TRAINABLE:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    trainable = _TRAINABLE[stage]
    mask = FitVariables(**{field.name: jnp.asarray(float(field.name in trainable), jnp.float32)
                           for field in dataclasses.fields(FitVariables)})
    rate = {"appearance": options.appearance_learning_rate,
            "photometric": options.photometric_learning_rate}.get(stage, options.learning_rate)
    return StageControl(mask=mask, learning_rate=jnp.asarray(rate, jnp.float32),
                        landmark_on=jnp.asarray(float(stage != "appearance"), jnp.float32),
                        priors_on=jnp.asarray(float(stage in ("landmarks", "photometric")),
                                              jnp.float32))


def fit_loss(variables: FitVariables, assets: FitAssets, target: FitTarget,
             options: FitOptions, control: StageControl, *,
             photometric: bool) -> tuple[Array, dict]:
    """Scalar loss (mean over the batch) and per-term metrics (weighted, switched) of a stage."""
    code, _, landmarks_2d, rendered = synthesise(variables, assets, target,
                                                 with_render=photometric, sigma=options.sigma)
    size = (target.size, target.size)
    terms = {
        # Our per-landmark weights (contour down-weighted) enter as the visibility; no DECA
        # emphasis on jaw points, whose MediaPipe counterparts are the least iBUG-like.
        "landmark": control.landmark_on * options.landmark_weight * losses.landmark_loss_ndc(
            landmarks_2d, target.landmarks, target.landmark_weights, image_size=size,
            landmark_weights=jnp.ones((target.landmarks.shape[1],), jnp.float32)),
        "shape_prior": control.priors_on * options.shape_prior
        * losses.squared_norm_regularizer(variables.shape),
        "expression_prior": control.priors_on * options.expression_prior
        * losses.squared_norm_regularizer(variables.expression),
        "jaw_prior": control.priors_on * options.jaw_prior
        * losses.squared_norm_regularizer(variables.jaw_pose),
    }
    if photometric:
        # Face-region pixels of the render (hard visibility: the region mask needs no gradient;
        # colours and geometry get theirs through the interpolated attributes).
        visible = rendered.face_index >= 0
        region = jnp.where(visible, assets.face_region[jnp.maximum(rendered.face_index, 0)], 0.0)
        mask = jax.lax.stop_gradient(region * target.skin)
        terms["photometric"] = options.photometric_weight * losses.photometric_loss(
            rendered.image, rendered.alpha, target.image, mask)
        terms["texture_prior"] = (options.texture_prior
                                  * losses.squared_norm_regularizer(variables.texture))
        terms["light_prior"] = options.light_prior * losses.light_regularizer(code.sh_light)
    per_example = sum(terms.values())
    metrics = {name: jnp.mean(value) for name, value in terms.items()}
    metrics["error_px"] = jnp.mean(landmark_error_px(landmarks_2d, target.landmarks))
    return jnp.mean(per_example), metrics


_ADAM = optax.scale_by_adam()


@functools.partial(jax.jit, static_argnames=("options", "photometric"))
def fit_step(variables: FitVariables, opt_state, assets: FitAssets, target: FitTarget,
             control: StageControl, *, options: FitOptions, photometric: bool):
    """One Adam step -> (variables, opt_state, loss, metrics). Frozen fields (mask 0) get zero
    gradients, hence zero Adam moments and exactly zero updates."""
    (loss, metrics), grads = jax.value_and_grad(fit_loss, has_aux=True)(
        variables, assets, target, options, control, photometric=photometric)
    grads = jax.tree_util.tree_map(lambda g, m: g * m, grads, control.mask)
    updates, opt_state = _ADAM.update(grads, opt_state, variables)
    updates = jax.tree_util.tree_map(lambda u, m: -control.learning_rate * m * u, updates,
                                     control.mask)
    return optax.apply_updates(variables, updates), opt_state, loss, metrics


def landmarks_2d(code: Code, model: flame_jax.FlameModel, *, image_size: int) -> Array:
    """(B, 68, 2) pixels of `code`'s FLAME landmarks in an image_size x image_size crop."""
    landmarks = flame_forward(model, code.flame_params()).landmarks
    return camera_lib.project_to_pixels(landmarks, code.camera, (image_size, image_size))[..., :2]


def _landmarks_2d(variables: FitVariables, assets: FitAssets, target: FitTarget) -> Array:
    return landmarks_2d(to_code(variables, target.camera0), assets.model,
                        image_size=target.size)


def fit(assets: FitAssets, target: FitTarget, init: Code,
        options: FitOptions = FitOptions(), *, progress=None) -> FitResult:
    """Fit B crops, starting from `init` (its camera is the reference camera of `target`).

    Args:
      assets: `make_assets(model)`.
      target: `make_target(...)` with camera0 == init.camera.
      init: starting `Code` (B rows), e.g. `initial_code(...)` or the regressor's output.
      progress: optional callable(stage, step, metrics dict of floats) called every 20 steps.
    Returns:
      `FitResult`.
    """
    variables = variables_from_code(init, options)
    # The step does not depend on the step counts: leave them out of its static key so that
    # schedules of different lengths share one compiled step.
    step_options = dataclasses.replace(options, rigid_steps=0, landmark_steps=0,
                                       appearance_steps=0, photometric_steps=0)
    initial = np.asarray(landmark_error_px(_landmarks_2d(variables, assets, target),
                                           target.landmarks))
    history = {}
    for stage, steps in zip(STAGES, (options.rigid_steps, options.landmark_steps,
                                     options.appearance_steps, options.photometric_steps)):
        opt_state = _ADAM.init(variables)
        control = stage_control(stage, options)
        photometric = stage in ("appearance", "photometric")
        losses = []
        for step in range(steps):
            variables, opt_state, loss, metrics = fit_step(
                variables, opt_state, assets, target, control, options=step_options,
                photometric=photometric)
            losses.append(loss)
            if progress is not None and (step % 20 == 0 or step == steps - 1):
                progress(stage, step, {k: float(v) for k, v in metrics.items()})
        history[stage] = np.asarray(jnp.stack(losses)) if losses else np.zeros(0, np.float32)
    if not all(np.isfinite(h).all() for h in history.values()):
        raise FloatingPointError(f"fit diverged: non-finite loss in {history}")
    landmarks_2d = _landmarks_2d(variables, assets, target)
    final = np.asarray(landmark_error_px(landmarks_2d, target.landmarks))
    return FitResult(code=to_code(variables, target.camera0), landmarks_2d=landmarks_2d,
                     initial_error_px=initial, final_error_px=final, history=history)


def initial_code(model: flame_jax.FlameModel, landmarks_px: np.ndarray,
                 landmark_weights: np.ndarray, options: FitOptions = FitOptions(), *,
                 image_size: int) -> Code:
    """The mean face, frontal, white light, camera aligned to the landmarks (closed form).

    landmarks_px: (B, 68, 2) pixels of image_size x image_size crops; weights (B, 68).
    """
    batch = np.asarray(landmarks_px).shape[0]
    zeros = lambda n: jnp.zeros((batch, n), jnp.float32)  # noqa: E731
    code = Code(shape=zeros(options.num_shape), pose=zeros(6),
                expression=zeros(options.num_expression), texture=zeros(options.num_texture),
                camera=jnp.asarray(np.tile([[9.0, 0.0, 0.0]], (batch, 1)), jnp.float32),
                light=jnp.asarray(default_light(batch)))
    camera = initial_camera(model, code, landmarks_px, landmark_weights, image_size=image_size)
    return code.replace(camera=jnp.asarray(camera))
