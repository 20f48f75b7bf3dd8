"""The pytrees that travel through the reconstruction pipeline: `Code`, `Batch`, `Prediction`.

`split_code` is the one place the regressor's 486-d vector is cut, and `Code.flame_params` the one
place FLAME parameters are built from a code; `NOW_LANDMARKS_68` the one place NoW's 7 points are
named on FLAME's landmarks. Units: metres for vertices, pixels of the image (crop) for 2D
landmarks, radians (axis-angle) for poses.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

import flame_jax

# (name, width) in the order the regressor's output vector is cut. Fixed: other code reads it.
CODE_LAYOUT = (("shape", 300), ("pose", 6), ("expression", 100), ("texture", 50),
               ("camera", 3), ("light", 27))
CODE_SIZE = sum(width for _, width in CODE_LAYOUT)  # 486

# NoW's 7 scan landmarks (right-eye outer, right-eye inner, left-eye inner, left-eye outer, nose
# bottom, right and left mouth corner) as iBUG-68 indices of FLAME's 68 landmarks (= static-51
# indices 19, 22, 25, 28, 16, 31, 37 plus the 17 contour points).
NOW_LANDMARKS_68 = (36, 39, 42, 45, 33, 48, 54)


def code_slices() -> dict:
    """{field: slice} of each code field inside the 486-d vector."""
    slices, start = {}, 0
    for name, width in CODE_LAYOUT:
        slices[name] = slice(start, start + width)
        start += width
    return slices


@struct.dataclass
class Code:
    """The regressed parameters of B faces.

      shape:      (B, 300) FLAME identity coefficients.
      pose:       (B, 6) axis-angle radians: global (head) rotation 3, then jaw 3.
      expression: (B, 100) FLAME expression coefficients.
      texture:    (B, 50) albedo-basis coefficients.
      camera:     (B, 3) (s, tx, ty) of `recon.render.camera` (NDC units per metre, metres).
      light:      (B, 27) SH light, 9 bands x RGB, band-major (DECA's reshape(-1, 9, 3)).
    """

    shape: jax.Array
    pose: jax.Array
    expression: jax.Array
    texture: jax.Array
    camera: jax.Array
    light: jax.Array

    @property
    def batch_size(self) -> int:
        return int(self.shape.shape[0])

    @property
    def global_pose(self) -> jax.Array:
        """(B, 3) head rotation."""
        return self.pose[:, :3]

    @property
    def jaw_pose(self) -> jax.Array:
        """(B, 3) jaw rotation."""
        return self.pose[:, 3:6]

    @property
    def sh_light(self) -> jax.Array:
        """(B, 9, 3) SH coefficients for `recon.render.shading` / `recon.render`."""
        return self.light.reshape(self.light.shape[0], 9, 3)

    def flame_params(self) -> flame_jax.FlameParams:
        """FLAME parameters of the posed head (neck, eyes and translation zero)."""
        zeros = jnp.zeros_like(self.pose[:, :3])
        return flame_jax.FlameParams(
            shape=self.shape, expression=self.expression, global_pose=self.global_pose,
            neck_pose=zeros, jaw_pose=self.jaw_pose, eye_pose=jnp.concatenate([zeros, zeros], -1),
            translation=zeros)

    def neutral_flame_params(self) -> flame_jax.FlameParams:
        """The same identity with zero pose and zero expression (the neutral mesh)."""
        params = self.flame_params()
        return params.replace(expression=jnp.zeros_like(params.expression),
                              global_pose=jnp.zeros_like(params.global_pose),
                              jaw_pose=jnp.zeros_like(params.jaw_pose))

    def to_vector(self) -> jax.Array:
        """(B, 486), the inverse of `split_code`."""
        return jnp.concatenate([getattr(self, name) for name, _ in CODE_LAYOUT], axis=-1)


def split_code(vector: jax.Array) -> Code:
    """(B, 486) regressor output -> `Code`, cut in the order of `CODE_LAYOUT`."""
    if vector.ndim != 2 or vector.shape[-1] != CODE_SIZE:
        raise ValueError(f"code vector must be (B, {CODE_SIZE}), got shape {vector.shape}")
    return Code(**{name: vector[:, part] for name, part in code_slices().items()})


@struct.dataclass
class Batch:
    """One training or evaluation batch of B = subjects x images_per_subject examples.

    Images of one subject are consecutive (rows s*K .. s*K+K-1), which the shape-consistency
    loss relies on.

      images:          (B, H, W, 3) float32 RGB in [0, 1], the face crop (`recon.image.CropSpec`)
                       at the 2D losses' resolution H = W = `data.image_size`.
      backbone_inputs: what the regressor reads: (B, n, n, 3) float32 backbone input of the same
                       crop (`recon.image.backbone_input`: ArcFace-normalised 112 px, or dlib's
                       150 px in 0..255), or, when the run caches its frozen trunk
                       (`model.trunk_cache`), that trunk's features (B, h, w, C).
      landmarks:       (B, 68, 2) float32 iBUG-68 landmarks in pixels of `images`
                       (pixel centres at +0.5, `recon.render.camera`).
      landmark_weights:(B, 68) float32, 0 where a landmark is missing/unknown, else 1.
      skin_masks:      (B, H, W) float32 in [0, 1], where the photometric loss applies.
      vertices:        (B, 5023, 3) float32 metres, ground-truth NEUTRAL mesh (zero pose and
                       expression) of the subject.
      has_3d:          (B,) float32, 1 where `vertices` is a real ground truth, else 0.
      subject_ids:     (B,) int32.
    """

    images: jax.Array
    backbone_inputs: jax.Array
    landmarks: jax.Array
    landmark_weights: jax.Array
    skin_masks: jax.Array
    vertices: jax.Array
    has_3d: jax.Array
    subject_ids: jax.Array

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])


@struct.dataclass
class Prediction:
    """What the model predicts for a batch.

      code:             `Code`.
      flame:            `flame_jax.FlameOutput` of the posed head (vertices (B, V, 3) metres,
                        landmarks (B, 68, 3) metres).
      neutral_vertices: (B, V, 3) metres, same identity with zero pose and expression.
      landmarks_2d:     (B, 68, 2) pixels of the batch images (`recon.render.camera.project_to_pixels`).
      render:           `recon.render.RenderOutput` at the batch images' size, or None when no 2D
                        term runs.
    """

    code: Code
    flame: flame_jax.FlameOutput
    neutral_vertices: jax.Array
    landmarks_2d: jax.Array
    render: Optional[object] = None
