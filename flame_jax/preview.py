"""Quick CPU preview images of FLAME meshes (numpy + OpenCV painter's algorithm).

Only for looking at meshes; the differentiable renderer used in training is `recon.render`.
"""

import cv2
import numpy as np


def shade_mesh(vertices, faces, *, size=256, colors=None, light_direction=(0.3, 0.4, 1.0),
               background=255):
    """(V, 3) metres, (F, 3) -> (size, size, 3) uint8 RGB, orthographic view from +z.

    Triangles are filled back to front with Lambert shading of their normals; the mesh is fitted
    to the image with a margin. `colors` (V, 3) in [0, 1] tints the faces (default light grey).
    """
    vertices = np.asarray(vertices, np.float64)
    faces = np.asarray(faces)
    triangles = vertices[faces]
    normals = np.cross(triangles[:, 1] - triangles[:, 0], triangles[:, 2] - triangles[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-12)
    light = np.asarray(light_direction, np.float64)
    light = light / np.linalg.norm(light)  # not in place: the caller's array stays as it was
    brightness = 0.15 + 0.85 * np.clip(normals @ light, 0.0, 1.0)
    base = np.full((len(faces), 3), 0.82) if colors is None else np.asarray(colors)[faces].mean(1)
    face_rgb = np.clip(base * brightness[:, None], 0, 1)

    xy = vertices[:, :2]
    centre = (xy.max(0) + xy.min(0)) / 2
    scale = 0.9 * size / max((xy.max(0) - xy.min(0)).max(), 1e-9)
    pixels = (xy - centre) * scale * np.array([1.0, -1.0]) + size / 2  # image y points down
    image = np.full((size, size, 3), background, np.uint8)
    visible = normals[:, 2] > 0
    order = np.argsort(triangles[:, :, 2].mean(1))  # far (small z) first
    points = np.round(pixels[faces] * 16).astype(np.int32)  # 4 bits of sub-pixel precision
    for index in order[visible[order]]:
        color = tuple(int(c) for c in np.round(face_rgb[index] * 255))
        cv2.fillConvexPoly(image, points[index], color, lineType=cv2.LINE_AA, shift=4)
    return image


def grid(images, columns):
    """Tile equally sized (H, W, 3) images into one image, row-major."""
    height, width = images[0].shape[:2]
    rows = -(-len(images) // columns)
    canvas = np.full((rows * height, columns * width, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * height:(r + 1) * height, c * width:(c + 1) * width] = image
    return canvas
