"""The training objective: L = w3d * L3d + w2d * L2d (PAPER.md, Eq. 1-7).

    L3d = vertex * vertex_mm + id_3d * id_3d
    L2d = landmark * landmark_ndc + eye_closure * eye_closure_ndc + lip_distance * lip_distance_ndc
          + photometric * photometric_l1 + identity * identity_1_minus_cos
          + shape_reg * shape_reg + expression_reg * expression_reg + texture_reg * texture_reg
          + light_reg * light_reg

    weights = LossWeights()                        # the paper's and DECA's numbers
    assets = make_assets(flame_model, encoder=frozen_coma, recognition=(module, variables))
    prediction = predict(code, assets, batch, render_settings=settings_or_None)
    loss, metrics = objective(prediction, batch, assets, weights, images_per_subject=2,
                              render_settings=settings, rng=rng)

`LossWeights` is static (hashable): a zero weight removes its term at trace time, so the term is
neither computed nor logged (that is how ablations run); `needs_render(weights)` says whether any
image term (photometric, identity) is on and thus whether `predict` must render.

Reductions: per-example losses are averaged over the batch; the 3D terms over the examples with
a ground-truth mesh (`Batch.has_3d`); the shape / expression / texture regularisers are summed
over the batch as DECA does (`LossWeights.regulariser_reduction`, "mean" to average). Shape consistency (DECA): the code with shapes exchanged
between images of a subject goes through `predict` and every term again; with weight c the loss
is (L(code) + c L(swapped)) / (1 + c), i.e. DECA's mean over its doubled batch at c = 1.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import flame_jax
import spectral_gcn
from recon.render import camera as camera_lib
from recon import losses
from recon import render as render_lib
from recon.render import shading
from recon.render.rasterizer import RasterSettings
from recon.types import Batch, Code, Prediction

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Static loss weights; 0 switches a term off (not computed, not logged).

    Paper: w3d 0.4, w2d 0.6, vertex 0.5, id_3d 0.5. DECA (decalib/utils/config.py): landmark
    1.0, eye_closure 1.0, lip_distance 0.5, photometric 2.0, identity 0.2, shape_consistency on,
    shape/expression/texture regularisers 1e-4 and light 1.0.

      id_3d_kind: "squared_l2" (default) or "cosine" (`losses.id_3d_loss`).
      identity_shape_only: DECA's `id_shape_only`: the identity loss sees the rendering with
        albedo and light under stop_gradient, so it shapes the geometry only.
      regulariser_reduction: how the shape / expression / texture regularisers reduce over the
        batch: "sum" (DECA's: sum(x^2) / 2 summed over every image of the batch, the
        shape-swapped copies included, so their weight 1e-4 means what it means in DECA) or
        "mean" (per-image mean, independent of the batch size). The light regulariser is a
        mean in DECA and here.
    """

    w3d: float = 0.4
    w2d: float = 0.6
    vertex: float = 0.5
    id_3d: float = 0.5
    landmark: float = 1.0
    eye_closure: float = 1.0
    lip_distance: float = 0.5
    photometric: float = 2.0
    identity: float = 0.2
    shape_consistency: float = 1.0
    shape_reg: float = 1e-4
    expression_reg: float = 1e-4
    texture_reg: float = 1e-4
    light_reg: float = 1.0
    id_3d_kind: str = "squared_l2"
    identity_shape_only: bool = True
    regulariser_reduction: str = "sum"
    image_subjects: int = 0

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in ("float", float):
                if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                    raise ValueError(f"LossWeights.{field.name} must be a finite number >= 0, "
                                     f"got {value!r}")
        if not isinstance(self.image_subjects, int) or self.image_subjects < 0:
            raise ValueError(f"LossWeights.image_subjects must be an int >= 0, got "
                             f"{self.image_subjects!r}")
        if self.regulariser_reduction not in ("sum", "mean"):
            raise ValueError(f"LossWeights.regulariser_reduction must be 'sum' or 'mean', got "
                             f"{self.regulariser_reduction!r}")
        if self.id_3d_kind not in losses.ID_3D_KINDS:
            raise ValueError(f"LossWeights.id_3d_kind must be one of {losses.ID_3D_KINDS}, got "
                             f"{self.id_3d_kind!r}")

    def on(self, name: str) -> bool:
        """Whether term `name` contributes (its weight and its group weight are non-zero)."""
        group = self.w3d if name in ("vertex", "id_3d") else self.w2d
        return getattr(self, name) > 0 and group > 0


def needs_render(weights: LossWeights) -> bool:
    """True when an image term (photometric or identity) is on: `predict` must render."""
    return weights.on("photometric") or weights.on("identity")


@struct.dataclass
class ObjectiveAssets:
    """Everything the objective reads besides the batch: pass to jitted code as an argument.

      flame: `flame_jax.FlameModel` (with albedo_mean/albedo_basis when rendering).
      region_weights: (V,) float32 vertex-loss weights (`losses.region_weights`).
      face_region_faces: (F,) float32, 1 for triangles whose three vertices are in the face mask
        (the rendered face region, the photometric mask where the data has none).
      face_vertices: (F,) int32 indices of FLAME's face-region vertices (the face errors).
      encoder: frozen CoMA `spectral_gcn.FrozenEncoder` (None: the 3D-ID term must be off).
      recognition_variables: variables of the frozen recognition network (None: identity off).
      recognition_network: static Flax module `(inputs, train=False) -> (B, D)`.
      recognition_input_kind: static, how that network reads an image
        (`recon.image.backbone_input_jax` kind: "arcface" or "dlib").
    """

    flame: flame_jax.FlameModel
    region_weights: Array
    face_region_faces: Array
    face_vertices: Array
    encoder: Optional[spectral_gcn.FrozenEncoder] = None
    recognition_variables: Optional[dict] = None
    recognition_network: Optional[nn.Module] = struct.field(pytree_node=False, default=None)
    recognition_input_kind: str = struct.field(pytree_node=False, default="arcface")


def make_assets(flame: flame_jax.FlameModel, *,
                encoder: Optional[spectral_gcn.FrozenEncoder] = None,
                recognition: Optional[tuple] = None, recognition_input_kind: str = "arcface",
                face_weight: float = 150.0, eyeball_weight: float = 0.01,
                ear_weight: float = 0.01) -> ObjectiveAssets:
    """`ObjectiveAssets` from a FLAME model with face/eyeball/ear masks.

    recognition: (module, variables) of the frozen face-recognition network, e.g.
    `recon.model.import_arcface(path)` (input kind "arcface") or
    `recon.model.import_dlib_resnet()` ("dlib").
    """
    weights = losses.region_weights(flame, face=face_weight, eyeballs=eyeball_weight,
                                    ears=ear_weight)
    face = np.asarray(flame.vertex_mask("face"))
    face_faces = face[np.asarray(flame.faces)].all(axis=1).astype(np.float32)
    network, variables = recognition if recognition is not None else (None, None)
    return ObjectiveAssets(flame=flame, region_weights=weights,
                           face_region_faces=jnp.asarray(face_faces),
                           face_vertices=jnp.asarray(np.flatnonzero(face), jnp.int32),
                           encoder=encoder, recognition_variables=variables,
                           recognition_network=network,
                           recognition_input_kind=recognition_input_kind)


def check_assets(assets: ObjectiveAssets, weights: LossWeights) -> None:
    """Raise ValueError when an enabled term lacks its asset (before any computation)."""
    if weights.on("id_3d") and assets.encoder is None:
        raise ValueError("the 3D-ID term is on but ObjectiveAssets.encoder is None")
    if weights.on("identity") and (assets.recognition_network is None
                                   or assets.recognition_variables is None):
        raise ValueError("the identity term is on but ObjectiveAssets has no recognition network")


def _image_size(batch: Batch) -> tuple[int, int]:
    return int(batch.images.shape[1]), int(batch.images.shape[2])


def predict(code: Code, assets: ObjectiveAssets, batch: Batch, *,
            render_settings: Optional[RasterSettings] = None, sigma: float = 0.5,
            render_rows: Optional[int] = None, neutral: bool = True) -> Prediction:
    """FLAME (posed and neutral), 2D landmarks in the crop and, when asked, the rendering.

    Args:
      code: `Code` of B faces.
      assets: `ObjectiveAssets`.
      batch: `Batch`; only its image size (H, W) is read (landmarks are projected into it).
      render_settings: static `RasterSettings` of size (H, W), or None for no rendering
        (`needs_render(weights)` tells which the objective needs).
      sigma: soft-rasterizer temperature in pixels.
      render_rows: render only the first this-many faces (None: all).
      neutral: also the neutral meshes (False: `neutral_vertices` is None).
    Returns:
      `Prediction` (render None when not rendered).
    """
    image_size = _image_size(batch)
    posed = flame_jax.forward(assets.flame, code.flame_params())
    neutral_vertices = None
    if neutral:
        neutral_vertices = flame_jax.forward(assets.flame, code.neutral_flame_params()).vertices
    landmarks_2d = camera_lib.project_to_pixels(posed.landmarks, code.camera, image_size)[..., :2]
    rendered = None
    if render_settings is not None:
        if (render_settings.height, render_settings.width) != image_size:
            raise ValueError(f"render_settings are {render_settings.height} x "
                             f"{render_settings.width} but the batch images are "
                             f"{image_size[0]} x {image_size[1]}")
        flame = assets.flame
        if flame.albedo_mean is None or flame.albedo_basis is None:
            raise ValueError("rendering needs a FLAME model with albedo_mean and albedo_basis "
                             "(the texture space); this model has none")
        rows = code.batch_size if render_rows is None else int(render_rows)
        rendered = _render(assets, posed.vertices[:rows], jax.tree.map(lambda x: x[:rows], code),
                           render_settings, sigma)
    return Prediction(code=code, flame=posed, neutral_vertices=neutral_vertices,
                      landmarks_2d=landmarks_2d, render=rendered)


def _render(assets: ObjectiveAssets, vertices: Array, code: Code, settings: RasterSettings,
            sigma: float):
    flame = assets.flame
    albedo = shading.albedo_from_texture(flame.albedo_mean, flame.albedo_basis, code.texture)
    return render_lib.render(vertices, flame.faces, code.camera, code.sh_light, albedo,
                             settings=settings, sigma=sigma)


def render_rows(weights: LossWeights, images_per_subject: int, batch_size: int) -> int:
    """How many rows of a batch the rendered terms use (`LossWeights.image_subjects`)."""
    if not weights.image_subjects:
        return batch_size
    return min(batch_size, weights.image_subjects * images_per_subject)


def _masked_mean(values: Array, mask: Array) -> Array:
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _terms(prediction: Prediction, batch: Batch, assets: ObjectiveAssets,
           weights: LossWeights) -> tuple[dict, dict]:
    """({term: batch-mean value} of the enabled terms, {diagnostic: value})."""
    terms, diagnostics = {}, {}
    image_size = _image_size(batch)
    code = prediction.code
    has_3d = batch.has_3d.astype(jnp.float32)
    if prediction.neutral_vertices is None:  # the caller reuses another prediction's 3D terms
        pass
    elif weights.on("vertex"):
        per_example = losses.vertex_loss_mm(prediction.neutral_vertices, batch.vertices,
                                            assets.region_weights)
        terms["vertex"] = _masked_mean(per_example, has_3d)
        error = jnp.mean(jnp.linalg.norm(prediction.neutral_vertices - batch.vertices, axis=-1),
                         axis=-1)
        diagnostics["neutral_vertex_error_mm"] = 1000.0 * _masked_mean(error, has_3d)
    if weights.on("id_3d") and prediction.neutral_vertices is not None:
        per_example = losses.id_3d_loss(assets.encoder, prediction.neutral_vertices,
                                        batch.vertices, kind=weights.id_3d_kind)
        terms["id_3d"] = _masked_mean(per_example, has_3d)
    landmark_args = (prediction.landmarks_2d, batch.landmarks, batch.landmark_weights)
    if weights.on("landmark"):
        terms["landmark"] = jnp.mean(losses.landmark_loss_ndc(*landmark_args,
                                                              image_size=image_size))
        diagnostics["landmark_error_px"] = jnp.mean(losses.landmark_error_px(*landmark_args))
    if weights.on("eye_closure"):
        terms["eye_closure"] = jnp.mean(losses.eye_closure_loss_ndc(*landmark_args,
                                                                    image_size=image_size))
    if weights.on("lip_distance"):
        terms["lip_distance"] = jnp.mean(losses.lip_distance_loss_ndc(*landmark_args,
                                                                      image_size=image_size))
    if needs_render(weights):
        rendered = prediction.render
        if rendered is None:
            raise ValueError("an image term (photometric/identity) is on but the prediction "
                             "was not rendered: call predict with render_settings")
        diagnostics["render_overflow"] = jnp.sum(rendered.overflow).astype(jnp.float32)
        rows = rendered.image.shape[0]  # the rendered sub-batch (LossWeights.image_subjects)
        images, skin_masks = batch.images[:rows], batch.skin_masks[:rows]
        face_region = jnp.where(rendered.face_index >= 0,
                                assets.face_region_faces[jnp.maximum(rendered.face_index, 0)],
                                0.0)
        if weights.on("photometric"):
            mask = losses.photometric_mask(skin_masks, face_region)
            terms["photometric"] = jnp.mean(losses.photometric_loss(
                rendered.image, rendered.alpha, images, mask))
        if weights.on("identity"):
            image = rendered.image
            if weights.identity_shape_only:
                image = _shape_only_image(rendered, jax.tree.map(lambda x: x[:rows], code))
            # DECA's overlay: the rendered face region over the input image.
            region = face_region[..., None]
            overlay = region * image + (1.0 - region) * images
            terms["identity"] = jnp.mean(losses.identity_loss(
                assets.recognition_network, assets.recognition_variables, overlay, images,
                input_kind=assets.recognition_input_kind))
    regularisers = {"shape_reg": code.shape, "expression_reg": code.expression,
                    "texture_reg": code.texture}
    reduce = jnp.sum if weights.regulariser_reduction == "sum" else jnp.mean
    for name, coefficients in regularisers.items():
        if weights.on(name):
            terms[name] = reduce(losses.squared_norm_regularizer(coefficients))
    if weights.on("light_reg"):
        terms["light_reg"] = jnp.mean(losses.light_regularizer(code.sh_light))
    return terms, diagnostics


def _shape_only_image(rendered, code: Code) -> Array:
    """The rendered colour with gradients through the geometry (normals) only, DECA's
    id_shape_only: the renderer's albedo image and the light under stop_gradient."""
    light = jax.lax.stop_gradient(code.sh_light)
    return jax.lax.stop_gradient(rendered.albedo) * shading.sh_shading(rendered.normals, light)


TERM_METRIC_NAMES = {
    "vertex": "vertex_mm", "id_3d": "id_3d", "landmark": "landmark_ndc",
    "eye_closure": "eye_closure_ndc", "lip_distance": "lip_distance_ndc",
    "photometric": "photometric_l1", "identity": "identity_1_minus_cos",
    "shape_reg": "shape_reg", "expression_reg": "expression_reg", "texture_reg": "texture_reg",
    "light_reg": "light_reg"}
_3D_TERMS = ("vertex", "id_3d")


_SUMMED_REGULARISERS = ("shape_reg", "expression_reg", "texture_reg")


def _combine(terms: dict, weights: LossWeights, regulariser_scale: float = 1.0
             ) -> tuple[Array, Array, Array]:
    """(weighted loss, L3d, L2d); `regulariser_scale` multiplies the summed regularisers."""
    zero = jnp.zeros((), jnp.float32)

    def weight(name):
        scale = regulariser_scale if (name in _SUMMED_REGULARISERS and
                                      weights.regulariser_reduction == "sum") else 1.0
        return getattr(weights, name) * scale

    loss_3d = sum((weight(name) * value for name, value in terms.items()
                   if name in _3D_TERMS), zero)
    loss_2d = sum((weight(name) * value for name, value in terms.items()
                   if name not in _3D_TERMS), zero)
    return weights.w3d * loss_3d + weights.w2d * loss_2d, loss_3d, loss_2d


def objective(prediction: Prediction, batch: Batch, assets: ObjectiveAssets,
              weights: LossWeights, *, images_per_subject: int = 2,
              render_settings: Optional[RasterSettings] = None, sigma: float = 0.5,
              rng: Optional[Array] = None) -> tuple[Array, dict]:
    """(loss scalar, metrics) of a prediction.

    Args:
      prediction: `predict(code, assets, batch, render_settings=...)`.
      batch: `Batch` (subject-major, `images_per_subject` consecutive rows per subject).
      assets: `ObjectiveAssets`.
      weights: static `LossWeights`.
      images_per_subject: K, used by shape consistency.
      render_settings, sigma: how the shape-consistency prediction renders (as `prediction`).
      rng: PRNG key for the shape-consistency exchange (None: a fixed cyclic shift).
    Returns:
      loss: scalar. metrics: {"loss", "loss_3d", "loss_2d", every enabled term under its
      unit-named key (vertex_mm, id_3d, landmark_ndc, eye_closure_ndc, lip_distance_ndc,
      photometric_l1, identity_1_minus_cos, *_reg), the same terms of the shape-swapped code
      under "consistency/<name>", and diagnostics (neutral_vertex_error_mm, landmark_error_px,
      render_overflow)}. All unweighted batch means (the summed regularisers: batch sums).
    """
    if needs_render(weights) and prediction.render is None:
        raise ValueError("an image term (photometric/identity) is on but the prediction was not "
                         "rendered: call predict with render_settings")
    check_assets(assets, weights)
    swapped = None
    if weights.shape_consistency > 0:
        swapped_code = losses.shape_consistency_code(prediction.code, images_per_subject, rng)
        rows = prediction.render.image.shape[0] if prediction.render is not None else None
        swapped = predict(swapped_code, assets, batch,
                          render_settings=render_settings if needs_render(weights) else None,
                          sigma=sigma, render_rows=rows, neutral=False)
    return _objective_of(prediction, swapped, batch, assets, weights)


def _objective_of(prediction: Prediction, swapped: Optional[Prediction], batch: Batch,
                  assets: ObjectiveAssets, weights: LossWeights) -> tuple[Array, dict]:
    terms, diagnostics = _terms(prediction, batch, assets, weights)
    # DECA sums its regularisers over the whole batch, the shape-swapped copies included; the
    # two halves are averaged below with weights 1 and c, so (1 + c) restores that sum.
    scale = 1.0 + weights.shape_consistency if swapped is not None else 1.0
    loss, loss_3d, loss_2d = _combine(terms, weights, scale)
    metrics = {"loss_3d": loss_3d, "loss_2d": loss_2d, **diagnostics}
    metrics.update({TERM_METRIC_NAMES[name]: value for name, value in terms.items()})
    if swapped is not None:
        swapped_terms, _ = _terms(swapped, batch, assets, weights)
        # The swap permutes shapes within each subject: the neutral meshes of the swapped copy
        # are the original's, permuted among images with one ground truth, so its 3D terms are
        # the original's exactly (and are not computed again).
        swapped_terms.update({name: terms[name] for name in _3D_TERMS if name in terms})
        swapped_loss, _, _ = _combine(swapped_terms, weights, scale)
        metrics.update({f"consistency/{TERM_METRIC_NAMES[name]}": value
                        for name, value in swapped_terms.items()})
        metrics["consistency/loss"] = swapped_loss
        loss = (loss + weights.shape_consistency * swapped_loss) / (1.0 + weights.shape_consistency)
    metrics["loss"] = loss
    return loss, metrics


def code_objective(code: Code, batch: Batch, assets: ObjectiveAssets, weights: LossWeights, *,
                   images_per_subject: int = 2, render_settings: Optional[RasterSettings] = None,
                   sigma: float = 0.5, rng: Optional[Array] = None) -> tuple[Array, dict]:
    """`predict` (rendering only when `needs_render(weights)`) then `objective`: the loss of
    a code, for `jax.value_and_grad` in the training step. Same values as `objective`."""
    check_assets(assets, weights)
    settings = render_settings if needs_render(weights) else None
    if needs_render(weights) and settings is None:
        raise ValueError("an image term (photometric/identity) is on: pass render_settings")
    rows = render_rows(weights, images_per_subject, code.batch_size)
    if weights.shape_consistency <= 0:
        prediction = predict(code, assets, batch, render_settings=settings, sigma=sigma,
                             render_rows=rows)
        return _objective_of(prediction, None, batch, assets, weights)
    # The code and its shape-swapped copy go through FLAME as one 2B batch, their rendered rows
    # through the renderer as one batch (one call: half the compiled program of two); the
    # neutral meshes only for the code (the swapped copy's 3D terms are the code's).
    swapped_code = losses.shape_consistency_code(code, images_per_subject, rng)
    size = code.batch_size
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b], 0), code, swapped_code)
    posed = predict(both, assets, batch, neutral=False)
    neutral = flame_jax.forward(assets.flame, code.neutral_flame_params()).vertices
    rendered = None
    if settings is not None:
        pick = lambda x: jnp.concatenate([x[:rows], x[size:size + rows]], 0)  # noqa: E731
        rendered = _render(assets, pick(posed.flame.vertices), jax.tree.map(pick, both),
                           settings, sigma)
    half = lambda tree, start, stop: jax.tree.map(lambda x: x[start:stop], tree)  # noqa: E731
    prediction = Prediction(code=code, flame=half(posed.flame, 0, size),
                            neutral_vertices=neutral,
                            landmarks_2d=posed.landmarks_2d[:size],
                            render=None if rendered is None else half(rendered, 0, rows))
    swapped = Prediction(code=swapped_code, flame=half(posed.flame, size, 2 * size),
                         neutral_vertices=None, landmarks_2d=posed.landmarks_2d[size:],
                         render=None if rendered is None else half(rendered, rows, 2 * rows))
    return _objective_of(prediction, swapped, batch, assets, weights)
