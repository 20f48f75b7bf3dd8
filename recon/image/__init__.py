"""The image contract: one reader, one crop (a 2 x 3 similarity with its inverse, built by a
`CropSpec` that is part of a run's config), one backbone preprocessing (host and device).

  io:         `read_image(path) -> (H, W, 3) uint8 RGB`, `ImageReadError` naming the file.
  crop:       `CropSpec`, `crop_matrix`, `crop_image(image, spec, box=, landmarks=) -> Crop`, `warp`,
              `invert`, `transform_points`, `box_from_landmarks`, `crop_camera`,
              `template_camera`.
  dlib_align: dlib's `get_face_chip` alignment (5 or 68 points) and its iBUG-68 mapping.
  preprocess: `backbone_input` / `backbone_input_jax` ("arcface" 112 px, "dlib" 150 px),
              `resize` / `resize_jax` (one set of resampling matrices for host and device).
"""

from recon.image.crop import (ARCFACE_TEMPLATE_112, Crop, CropError, CropSpec, box_from_landmarks,
                              crop_camera, crop_image, crop_matrix, invert, template_camera,
                              transform_points, warp)
from recon.image.io import ImageReadError, read_image, to_float
from recon.image.preprocess import (BACKBONE_INPUT_SIZE, backbone_input, backbone_input_jax,
                                    resize, resize_jax)

__all__ = ["ARCFACE_TEMPLATE_112", "BACKBONE_INPUT_SIZE", "Crop", "CropError", "CropSpec",
           "ImageReadError", "backbone_input", "backbone_input_jax", "box_from_landmarks", "crop_camera",
           "crop_image", "crop_matrix", "invert", "read_image", "resize", "resize_jax",
           "template_camera", "to_float", "transform_points", "warp"]
