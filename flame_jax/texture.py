"""FLAME albedo spaces (`FLAME_texture.npz`, `FLAME_albedo_from_BFM.npz`) -> per-vertex albedo.

The UV texture images are sampled bilinearly at every triangle corner's texture coordinate and
averaged per vertex (`load_texture`). Errors raise `FlameFileError` naming the file.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import numpy as np

from flame_jax.errors import FlameFileError
from flame_jax.fileio import ZIP_MAGIC, open_binary, read_npz, sniff
from flame_jax.validate import as_array, check_count, check_index_range, require_keys

PathLike = Union[str, os.PathLike]


def read_obj_uv(path: PathLike) -> tuple:
    """`vt` lines (Nvt, 2) and the texture indices (F, 3) of triangular `f v/vt[/vn]` lines.

    Our own parser on purpose: trimesh turns `vt` into per-vertex UVs, splitting or merging
    vertices on UV seams, while the albedo lookup needs the file's per-corner `ft` indices.
    """
    source = str(path)
    vt, ft = [], []
    with open_binary(path) as handle:
        try:
            for line in handle.read().decode("utf-8").splitlines():
                parts = line.split()
                if not parts:
                    continue
                if parts[0] == "vt":
                    vt.append([float(parts[1]), float(parts[2])])
                elif parts[0] == "f":
                    if len(parts) != 4:
                        raise ValueError(f"face line is not a triangle: {line!r}")
                    ft.append([int(p.split("/")[1]) - 1 for p in parts[1:]])
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise FlameFileError(f"{source}: cannot read OBJ texture coordinates ({exc})") from exc
    if not vt or not ft:
        raise FlameFileError(f"{source}: OBJ has no 'vt' texture coordinates or no faces")
    return np.asarray(vt), np.asarray(ft)


def _texture_uv(data: Mapping, source: str, texture_uv: Optional[PathLike]) -> tuple:
    if texture_uv is not None:
        uv_source = str(texture_uv)
        if sniff(texture_uv).startswith(ZIP_MAGIC):
            uv_data = read_npz(texture_uv)
            require_keys(uv_data, ("vt", "ft"), uv_source)
            vt, ft = uv_data["vt"], uv_data["ft"]
        else:
            vt, ft = read_obj_uv(texture_uv)
    elif "vt" in data and "ft" in data:
        vt, ft, uv_source = data["vt"], data["ft"], source
    else:
        raise FlameFileError(f"{source}: texture space has no 'vt'/'ft' UV keys (e.g. "
                             f"FLAME_albedo_from_BFM.npz); pass texture_uv= an .npz with vt/ft "
                             f"or the FLAME UV template .obj")
    vt = as_array(vt, "vt", uv_source, dtype=np.float64, shape=(None, 2))
    ft = as_array(ft, "ft", uv_source, dtype=np.int64, shape=(None, 3))
    check_index_range(ft, vt.shape[0], "ft", uv_source, "texture-coordinate")
    return vt, ft


def sample_uv_bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinear lookup of an (H, W, ...) texture at (N, 2) UV coordinates -> (N, ...).

    Convention (OBJ / OpenGL, and BFM_to_FLAME's `col_to_tex.py`): u runs along columns, v runs
    bottom-up, so image row 0 is v = 1; texel (row, col) has its centre at
    u = (col + 0.5) / W, v = 1 - (row + 0.5) / H. Lookups beyond the outer texel centres clamp.
    """
    height, width = image.shape[:2]
    x = np.clip(uv[:, 0] * width - 0.5, 0.0, width - 1.0)
    y = np.clip((1.0 - uv[:, 1]) * height - 0.5, 0.0, height - 1.0)
    x0 = np.minimum(np.floor(x).astype(np.int64), width - 2) if width > 1 else np.zeros_like(
        x, np.int64)
    y0 = np.minimum(np.floor(y).astype(np.int64), height - 2) if height > 1 else np.zeros_like(
        y, np.int64)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    wx = (x - x0).reshape((-1,) + (1,) * (image.ndim - 2))
    wy = (y - y0).reshape((-1,) + (1,) * (image.ndim - 2))
    top = image[y0, x0] * (1 - wx) + image[y0, x1] * wx
    bottom = image[y1, x0] * (1 - wx) + image[y1, x1] * wx
    return top * (1 - wy) + bottom * wy


def load_texture(path: PathLike, faces: np.ndarray, num_vertices: int, *,
                 num_texture: int = 50, texture_uv: Optional[PathLike] = None,
                 bgr: bool = True) -> dict:
    """A FLAME UV albedo space -> per-vertex albedo mean (V, 3) and basis (V, 3, n) in [0, 1].

    Accepted files:
      * `FLAME_texture.npz`: `mean` (H, W, 3) and `tex_dir` (H, W, 3, n) in 0..255 (scaled by
        1/255 here), `vt` (Nvt, 2), `ft` (F, 3).
      * `FLAME_albedo_from_BFM.npz`: `MU` (H * W * 3,) and `PC` (H * W * 3, n) in 0..1, no UVs:
        give `texture_uv` (an `.npz` with vt/ft or FLAME's UV template `.obj`).
    Both store the channels as BGR (written with OpenCV; DECA flips them with [2, 1, 0]); with
    `bgr=True` they are returned as RGB.

    Each triangle corner `faces[i, k]` samples the texture at `vt[ft[i, k]]` (bilinear, see
    `sample_uv_bilinear`); a vertex's albedo is the mean over all its corners, so vertices on
    UV seams average both sides. `ft` must have the shape of `faces`.
    """
    source = str(path)
    data = read_npz(path)
    if "mean" in data and "tex_dir" in data:
        tex_dir = np.asarray(data["tex_dir"])
        if tex_dir.ndim != 4 or tex_dir.shape[2] != 3:
            raise FlameFileError(f"{source}: key 'tex_dir' has shape {tex_dir.shape}, expected "
                                 f"(H, W, 3, n)")
        height, width, _, available = tex_dir.shape
        keep = check_count(num_texture, available, "num_texture", source)
        mean = as_array(data["mean"], "mean", source, dtype=np.float32, shape=(height, width, 3))
        basis = as_array(tex_dir[..., :keep], "tex_dir", source, dtype=np.float32,
                       shape=(height, width, 3, keep))
        mean, basis = mean / 255.0, basis / 255.0
    elif "MU" in data and "PC" in data:
        pc = np.asarray(data["PC"])
        if pc.ndim != 2:
            raise FlameFileError(f"{source}: key 'PC' has shape {pc.shape}, expected "
                                 f"(H * W * 3, n)")
        side = int(round(np.sqrt(pc.shape[0] / 3)))
        if side * side * 3 != pc.shape[0]:
            raise FlameFileError(f"{source}: key 'PC' has {pc.shape[0]} rows, not a square "
                                 f"H * W * 3 texture")
        keep = check_count(num_texture, pc.shape[1], "num_texture", source)
        mean = as_array(data["MU"], "MU", source, dtype=np.float32,
                      shape=(side * side * 3,)).reshape(side, side, 3)
        basis = as_array(pc[:, :keep], "PC", source, dtype=np.float32,
                       shape=(side * side * 3, keep)).reshape(side, side, 3, keep)
    else:
        raise FlameFileError(f"{source}: not a FLAME texture space: expected keys "
                             f"'mean'/'tex_dir' (FLAME_texture.npz) or 'MU'/'PC' "
                             f"(FLAME_albedo_from_BFM.npz); keys present: {sorted(data)}")
    vt, ft = _texture_uv(data, source, texture_uv)
    faces = np.asarray(faces)
    if ft.shape != faces.shape:
        raise FlameFileError(f"{source}: 'ft' has shape {ft.shape} but the model has "
                             f"{faces.shape} faces")
    if bgr:
        mean, basis = mean[:, :, ::-1], basis[:, :, ::-1]
    height, width = mean.shape[:2]
    stacked = np.concatenate([mean[..., None], basis], axis=-1)  # (H, W, 3, 1 + n)
    corner_colours = sample_uv_bilinear(stacked, vt[ft.reshape(-1)])  # (F * 3, 3, 1 + n)
    corners = faces.reshape(-1)
    counts = np.bincount(corners, minlength=num_vertices)
    if np.any(counts == 0):
        raise FlameFileError(f"{source}: {int(np.sum(counts == 0))} vertices belong to no "
                             f"triangle, so they have no texture coordinate")
    summed = np.zeros((num_vertices,) + corner_colours.shape[1:], np.float64)
    np.add.at(summed, corners, corner_colours)
    per_vertex = (summed / counts[:, None, None]).astype(np.float32)
    return dict(albedo_mean=per_vertex[..., 0], albedo_basis=per_vertex[..., 1:])


__all__ = ["load_texture", "sample_uv_bilinear", "read_obj_uv"]
