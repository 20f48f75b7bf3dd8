"""The pytrees that travel through the reconstruction pipeline: `Code`, `Batch`, `Prediction`.

`split_code` is the one place the regressor's 486-d vector is cut, and `Code.flame_params` the one
place FLAME parameters are built from a code. Units: metres for vertices, pixels of the 224 crop
for 2D landmarks, radians (axis-angle) for poses.
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
      camera:     (B, 3) (s, tx, ty) of `recon.camera` (NDC units per metre, metres).
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
        """(B, 9, 3) SH coefficients for `recon.shading` / `recon.render`."""
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

      images:          (B, 224, 224, 3) float32 RGB in [0, 1], the face crop of the 2D losses.
      backbone_images: (B, 112, 112, 3) float32 RGB, ArcFace normalised ((pixel - 127.5) / 127.5).
      landmarks:       (B, 68, 2) float32 iBUG-68 landmarks in pixels of the 224 crop
                       (pixel centres at +0.5, `recon.camera`).
      landmark_weights:(B, 68) float32, 0 where a landmark is missing/unknown, else 1.
      skin_masks:      (B, 224, 224) float32 in [0, 1], where the photometric loss applies.
      vertices:        (B, 5023, 3) float32 metres, ground-truth NEUTRAL mesh (zero pose and
                       expression) of the subject.
      posed_vertices:  (B, 5023, 3) float32 metres, ground-truth posed mesh when known (synthetic
                       data), else a copy of `vertices`.
      has_3d:          (B,) float32, 1 where `vertices` is a real ground truth, else 0.
      subject_ids:     (B,) int32.
    """

    images: jax.Array
    backbone_images: jax.Array
    landmarks: jax.Array
    landmark_weights: jax.Array
    skin_masks: jax.Array
    vertices: jax.Array
    posed_vertices: jax.Array
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
      landmarks_2d:     (B, 68, 2) pixels in the 224 crop (`recon.camera.project_to_pixels`).
      render:           `recon.render.RenderOutput` at 224 x 224, or None when no 2D term runs.
    """

    code: Code
    flame: flame_jax.FlameOutput
    neutral_vertices: jax.Array
    landmarks_2d: jax.Array
    render: Optional[object] = None
