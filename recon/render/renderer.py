"""Rasterizer + SH shading -> `RenderOutput` for a batch of FLAME-topology meshes.

Shading follows DECA: per-pixel normals are the barycentric interpolation of the model-frame
vertex normals (not re-normalised), shading = SH(normals, light), image = albedo * shading.
2D landmarks must come from `recon.render.camera.project_to_pixels` with the same camera, which this
module uses for the mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from recon.render import camera as camera_lib
from recon.render import rasterizer, shading

Array = jax.Array


@struct.dataclass
class RenderOutput:
    """Rendered batch; images are (B, H, W, C), pixel (i, j) sampled at (j + 0.5, i + 0.5).

    image: (B, H, W, 3) shaded colour albedo * SH shading, NOT multiplied by alpha: valid
      wherever alpha > 0 (outside the mesh it is extrapolated from the nearest triangle so that
      silhouettes get gradients), zero far from the mesh. Use `composite` over a background.
    alpha: (B, H, W) soft coverage in [0, 1] (-> hard coverage as sigma -> 0).
    albedo: (B, H, W, 3) interpolated per-vertex albedo (image = albedo * SH(normals, light)).
    normals: (B, H, W, 3) interpolated model-frame vertex normals.
    depth: (B, H, W) interpolated s * z (NDC units, larger is closer).
    face_index: (B, H, W) int32 visible triangle, -1 where the pixel centre is not covered.
    overflow: (B,) int32 triangles/tiles beyond the static capacities (0 = complete image).
    """

    image: Array
    alpha: Array
    albedo: Array
    normals: Array
    depth: Array
    face_index: Array
    overflow: Array

    @property
    def mask(self) -> Array:
        """(B, H, W) float hard coverage."""
        return (self.face_index >= 0).astype(self.alpha.dtype)


def composite(output: RenderOutput, background: Array) -> Array:
    """alpha * image + (1 - alpha) * background; background (B, H, W, 3) or broadcastable."""
    alpha = output.alpha[..., None]
    return alpha * output.image + (1.0 - alpha) * background


@functools.partial(jax.jit, static_argnames="settings")
def render(vertices: Array, faces: Array, camera: Array, light: Array, albedo: Array, *,
           settings: rasterizer.RasterSettings, sigma: float | Array = 0.5) -> RenderOutput:
    """Render B shaded meshes with the weak-perspective camera.

    Args:
      vertices: (B, V, 3) model-frame vertices in metres.
      faces: (F, 3) int32 triangles.
      camera: (B, 3) (scale, tx, ty), see `recon.render.camera`.
      light: (B, 9, 3) SH coefficients (`recon.types.Code.sh_light`).
      albedo: (B, V, 3) per-vertex albedo (`shading.albedo_from_texture`).
      settings: static `RasterSettings` (image size, capacities).
      sigma: soft-coverage temperature in pixels.
    Returns:
      `RenderOutput`; differentiable in vertices, camera, light and albedo.
    """
    if albedo.shape != vertices.shape:
        raise ValueError(f"albedo must be (B, V, 3) like vertices {vertices.shape}, "
                         f"got {albedo.shape}")
    image_size = (settings.height, settings.width)
    screen = camera_lib.project_to_pixels(vertices, camera, image_size)
    normals = shading.vertex_normals(vertices, faces)
    attributes = jnp.concatenate([albedo, normals, screen[..., 2:3]], axis=-1)
    fragments = rasterizer.rasterize(screen, faces, attributes, settings, sigma)
    albedo_image = fragments.attributes[..., 0:3]
    normal_image = fragments.attributes[..., 3:6]
    image = albedo_image * shading.sh_shading(normal_image, light)
    return RenderOutput(image=image, alpha=fragments.alpha, albedo=albedo_image,
                        normals=normal_image,
                        depth=fragments.attributes[..., 6], face_index=fragments.face_index,
                        overflow=fragments.overflow)
