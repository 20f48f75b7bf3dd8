"""Auxiliary FLAME files: landmark embeddings, vertex masks, the MediaPipe embedding.

Readers of the official files (`flame_static_embedding.pkl`, `flame_dynamic_embedding.npy`,
`FLAME_masks.pkl`, `mediapipe_landmark_embedding.npz`) and of our `.npz` landmark layout (the
shipped RingNet embedding, see `flame_jax.shipped`). Pickles go through the restricted unpickler;
every problem raises `FlameFileError` naming the file, the key and the problem.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Union

import numpy as np

from flame_jax.errors import FlameFileError
from flame_jax.fileio import NPY_MAGIC, ZIP_MAGIC, describe_content, read_npz, sniff
from flame_jax.model import NUM_CONTOUR_LANDMARKS, NUM_DYNAMIC_BINS
from flame_jax.safe_pickle import load_npy, load_pickle_file
from flame_jax.validate import as_array, check_index_range, require_keys

PathLike = Union[str, os.PathLike]
LANDMARK_KEYS = ("static_lmk_faces", "static_lmk_bary", "dynamic_lmk_faces", "dynamic_lmk_bary")


def load_landmark_embedding(path: PathLike) -> dict:
    """Static (51) and dynamic (79 x 17) landmark embedding from our `.npz` layout.

    Returns {static_lmk_faces (51,) int32, static_lmk_bary (51, 3) float32,
             dynamic_lmk_faces (79, 17) int32, dynamic_lmk_bary (79, 17, 3) float32}.
    (`flame_jax.shipped.load_landmark_embedding()` reads the shipped file with this function.)
    """
    data = read_npz(path)
    require_keys(data, LANDMARK_KEYS, str(path))
    return landmark_arrays(data, str(path), *LANDMARK_KEYS)


def landmark_arrays(data: Mapping, source: str, static_faces_key: Optional[str],
                    static_bary_key: Optional[str], dynamic_faces_key: Optional[str],
                    dynamic_bary_key: Optional[str]) -> dict:
    """Validated static and/or dynamic landmark arrays under our field names, read from `data`
    under the given keys (None skips that half); see `load_landmark_embedding` for shapes."""
    out = {}
    if static_faces_key is not None:
        faces = as_array(data[static_faces_key], static_faces_key, source, dtype=np.int64,
                       shape=(None,))
        out["static_lmk_faces"] = faces.astype(np.int32)
        out["static_lmk_bary"] = as_array(data[static_bary_key], static_bary_key, source,
                                        dtype=np.float32, shape=(faces.shape[0], 3))
    if dynamic_faces_key is not None:
        faces = as_array(data[dynamic_faces_key], dynamic_faces_key, source, dtype=np.int64,
                       shape=(NUM_DYNAMIC_BINS, NUM_CONTOUR_LANDMARKS))
        out["dynamic_lmk_faces"] = faces.astype(np.int32)
        out["dynamic_lmk_bary"] = as_array(data[dynamic_bary_key], dynamic_bary_key, source,
                                         dtype=np.float32,
                                         shape=(NUM_DYNAMIC_BINS, NUM_CONTOUR_LANDMARKS, 3))
    return out


def mediapipe_arrays(data: Mapping, source: str, faces_key: str, bary_key: str,
                     ids_key: str) -> dict:
    """Validated mediapipe_lmk_faces (M,) int32, mediapipe_lmk_bary (M, 3), mediapipe_lmk_ids."""
    require_keys(data, (faces_key, bary_key, ids_key), source)
    faces = as_array(data[faces_key], faces_key, source, dtype=np.int64, shape=(None,))
    count = faces.shape[0]
    return dict(
        mediapipe_lmk_faces=faces.astype(np.int32),
        mediapipe_lmk_bary=as_array(data[bary_key], bary_key, source, dtype=np.float32,
                                  shape=(count, 3)),
        mediapipe_lmk_ids=as_array(data[ids_key], ids_key, source, dtype=np.int32,
                                 shape=(count,)),
    )


def mask_arrays(masks: Mapping, num_vertices: int, source: str) -> dict:
    """{name: (K,) int32 vertex ids}, each checked to lie in [0, num_vertices)."""
    out = {}
    for name, indices in masks.items():
        key = str(name)
        array = as_array(indices, key, source, dtype=np.int64, shape=(None,))
        check_index_range(array, num_vertices, key, source, "vertex")
        out[key] = array.astype(np.int32)
    return out



def load_static_landmarks(path: PathLike) -> dict:
    """Official `flame_static_embedding.pkl` (dict lmk_face_idx (51,), lmk_b_coords (51, 3)),
    or an `.npz` with `static_lmk_faces` / `static_lmk_bary`.

    Returns {static_lmk_faces (51,) int32, static_lmk_bary (51, 3) float32}."""
    source = str(path)
    if sniff(path).startswith(ZIP_MAGIC):
        data = read_npz(path)
        require_keys(data, ("static_lmk_faces", "static_lmk_bary"), source)
        return landmark_arrays(data, source, "static_lmk_faces", "static_lmk_bary", None, None)
    data = load_pickle_file(path)
    require_keys(data, ("lmk_face_idx", "lmk_b_coords"), source)
    return landmark_arrays(data, source, "lmk_face_idx", "lmk_b_coords", None, None)


def load_dynamic_landmarks(path: PathLike) -> dict:
    """Official `flame_dynamic_embedding.npy` (0-d object array holding a dict whose
    lmk_face_idx is a list of 79 (17,) arrays and lmk_b_coords a list of 79 (17, 3) arrays),
    or an `.npz` with `dynamic_lmk_faces` / `dynamic_lmk_bary`.

    Returns {dynamic_lmk_faces (79, 17) int32, dynamic_lmk_bary (79, 17, 3) float32}."""
    source = str(path)
    head = sniff(path)
    if head.startswith(ZIP_MAGIC):
        data = read_npz(path)
        require_keys(data, ("dynamic_lmk_faces", "dynamic_lmk_bary"), source)
        return landmark_arrays(data, source, None, None, "dynamic_lmk_faces", "dynamic_lmk_bary")
    if not head.startswith(NPY_MAGIC):
        raise FlameFileError(f"{source}: expected the .npy dynamic landmark embedding"
                             f"{describe_content(head)}")
    data = load_npy(path)
    require_keys(data, ("lmk_face_idx", "lmk_b_coords"), source)
    return landmark_arrays(data, source, None, None, "lmk_face_idx", "lmk_b_coords")


def load_masks(path: PathLike, num_vertices: int) -> dict:
    """`FLAME_masks.pkl` (dict name -> int vertex indices) -> {name: (K,) int32}."""
    data = load_pickle_file(path)
    if not isinstance(data, dict) or not data:
        raise FlameFileError(f"{path}: expected a non-empty dict of vertex-index arrays, got "
                             f"{type(data).__name__}")
    return mask_arrays(data, num_vertices, str(path))


def load_mediapipe(path: PathLike) -> dict:
    """`mediapipe_landmark_embedding.npz` (lmk_face_idx (M,), lmk_b_coords (M, 3),
    landmark_indices (M,)) -> mediapipe_lmk_faces / mediapipe_lmk_bary / mediapipe_lmk_ids."""
    data = read_npz(path)
    return mediapipe_arrays(data, str(path), "lmk_face_idx", "lmk_b_coords", "landmark_indices")


__all__ = ["load_landmark_embedding", "load_static_landmarks", "load_dynamic_landmarks",
           "load_masks", "load_mediapipe", "landmark_arrays", "mediapipe_arrays", "mask_arrays",
           "LANDMARK_KEYS"]
