"""Face reconstruction: camera, shading, rasterizer and renderer (more modules join here)."""
