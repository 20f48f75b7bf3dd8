"""The differentiable renderer (pure JAX): camera, SH shading, soft rasterizer, renderer.

  camera:     DECA's weak-perspective camera (s, tx, ty) and the NDC <-> pixel mapping.
  shading:    vertex normals, DECA's 9-band SH shading, albedo from the texture basis.
  rasterizer: bucketed z-buffer visibility + differentiable interpolation + soft coverage.
  renderer:   `render(vertices, faces, camera, light, albedo, settings=...) -> RenderOutput`,
              `composite(output, background)`.
"""

from recon.render import camera, rasterizer, shading
from recon.render.rasterizer import RasterSettings
from recon.render.renderer import RenderOutput, composite, render

__all__ = ["camera", "rasterizer", "shading", "RasterSettings", "RenderOutput", "composite",
           "render"]
