"""FLAME model files -> `FlameModel`, and our own `.npz` back and forth.

`load` reads, without chumpy or torch:
  * the official FLAME 2020 `generic_model.pkl` (a Python-2 pickle whose arrays are chumpy `Ch`
    objects and whose `J_regressor` is a scipy CSC matrix),
  * `flame2023_Open.pkl` (the same keys as plain numpy / scipy objects),
  * an `.npz` with the official keys (`f`, `weights`, `J_regressor` dense, ...),
  * our own `.npz` written by `save` (the layout of `flame_jax.model.to_numpy`),
plus the auxiliary files (landmarks, masks, MediaPipe: `flame_jax.auxiliary`; albedo:
`flame_jax.texture`). Every pickle goes through `flame_jax.safe_pickle.restricted_unpickle`.

Errors: every problem with a file raises `FlameFileError` (a `ValueError`) whose message names the
file and the problem; a missing path raises `FlameFileNotFoundError` (also a `FileNotFoundError`).

The other readers are re-exported here, so `flame_jax.io.load_masks` etc. keep working.
"""

from __future__ import annotations

import os
import pathlib
from typing import Mapping, Optional, Union

import numpy as np

from flame_jax import shipped
from flame_jax.auxiliary import (landmark_arrays, load_dynamic_landmarks, load_masks,
                                 load_mediapipe, load_static_landmarks, mask_arrays,
                                 mediapipe_arrays)
from flame_jax.errors import FlameFileError, FlameFileNotFoundError
from flame_jax.fileio import NPY_MAGIC, ZIP_MAGIC, atomic_write, read_npz, sniff
from flame_jax.model import FLAME_PARENTS, FlameModel, from_numpy, required_array_fields, to_numpy
from flame_jax.safe_pickle import (DEFAULT_ALLOWED_GLOBALS, ChumpyStandIn, SparseStandIn,
                                   chumpy_to_numpy, load_npy, load_pickle_file,
                                   restricted_unpickle)
from flame_jax.shipped import load_landmark_embedding  # path defaults to the shipped file
from flame_jax.texture import load_texture, sample_uv_bilinear
from flame_jax.validate import as_array, check_count, check_index_range, require_keys

PathLike = Union[str, os.PathLike]

NUM_IDENTITY_COMPONENTS = 300  # official shapedirs: first 300 identity, the rest expression
NUM_POSE_FEATURES = 36  # 4 non-root joints x 9 entries of (R - I)

_OFFICIAL_KEYS = ("v_template", "f", "shapedirs", "posedirs", "weights", "J_regressor",
                  "kintree_table")


def _parents_from_kintree(kintree: np.ndarray, source: str) -> tuple:
    parents = kintree[0].astype(np.int64)
    # The root's parent is stored as -1 or as uint32 max (4294967295) in the official files.
    parents[0] = -1
    return _check_parents(tuple(int(p) for p in parents), source)


def _check_parents(parents: tuple, source: str) -> tuple:
    if parents != FLAME_PARENTS:
        raise FlameFileError(f"{source}: kinematic tree parents {parents} are not FLAME's "
                             f"{FLAME_PARENTS}")
    return parents


def _official_arrays(data: Mapping, source: str) -> dict:
    """Arrays of an official-layout dict (2020 pkl, 2023 pkl or an npz with the same keys)."""
    require_keys(data, _OFFICIAL_KEYS, source)
    v_template = as_array(data["v_template"], "v_template", source, dtype=np.float32,
                        shape=(None, 3))
    num_vertices = v_template.shape[0]
    shapedirs = as_array(data["shapedirs"], "shapedirs", source, dtype=np.float32,
                       shape=(num_vertices, 3, None))
    if shapedirs.shape[-1] <= NUM_IDENTITY_COMPONENTS:
        raise FlameFileError(f"{source}: key 'shapedirs' has {shapedirs.shape[-1]} components; "
                             f"the official layout has {NUM_IDENTITY_COMPONENTS} identity "
                             f"components followed by the expression components")
    posedirs = as_array(data["posedirs"], "posedirs", source, dtype=np.float32,
                      shape=(num_vertices, 3, NUM_POSE_FEATURES))
    j_regressor = as_array(data["J_regressor"], "J_regressor", source, dtype=np.float32,
                         shape=(len(FLAME_PARENTS), num_vertices))
    weights = as_array(data["weights"], "weights", source, dtype=np.float32,
                     shape=(num_vertices, len(FLAME_PARENTS)))
    faces = as_array(data["f"], "f", source, dtype=np.int64, shape=(None, 3))
    check_index_range(faces, num_vertices, "f", source, "vertex")
    kintree = as_array(data["kintree_table"], "kintree_table", source, dtype=np.int64,
                     shape=(2, len(FLAME_PARENTS)))
    return dict(
        v_template=v_template,
        shapedirs=shapedirs[..., :NUM_IDENTITY_COMPONENTS],
        exprdirs=shapedirs[..., NUM_IDENTITY_COMPONENTS:],
        # smplx layout: (V, 3, 36) -> (V * 3, 36) -> (36, V * 3), so pose_feature @ posedirs.
        posedirs=posedirs.reshape(-1, NUM_POSE_FEATURES).T,
        j_regressor=j_regressor,
        lbs_weights=weights,
        faces=faces.astype(np.int32),
        parents=_parents_from_kintree(kintree, source),
    )


def _own_arrays(data: Mapping, source: str) -> dict:
    """Arrays of our `.npz` (written by `save`), validated like the official ones."""
    require_keys(data, required_array_fields() + ("parents",), source)
    out = {}
    v_template = as_array(data["v_template"], "v_template", source, dtype=np.float32,
                        shape=(None, 3))
    num_vertices = v_template.shape[0]
    out["v_template"] = v_template
    out["shapedirs"] = as_array(data["shapedirs"], "shapedirs", source, dtype=np.float32,
                              shape=(num_vertices, 3, None))
    out["exprdirs"] = as_array(data["exprdirs"], "exprdirs", source, dtype=np.float32,
                             shape=(num_vertices, 3, None))
    out["posedirs"] = as_array(data["posedirs"], "posedirs", source, dtype=np.float32,
                             shape=(NUM_POSE_FEATURES, num_vertices * 3))
    out["j_regressor"] = as_array(data["j_regressor"], "j_regressor", source, dtype=np.float32,
                                shape=(len(FLAME_PARENTS), num_vertices))
    out["lbs_weights"] = as_array(data["lbs_weights"], "lbs_weights", source, dtype=np.float32,
                                shape=(num_vertices, len(FLAME_PARENTS)))
    out["faces"] = as_array(data["faces"], "faces", source, dtype=np.int32, shape=(None, 3))
    check_index_range(out["faces"], num_vertices, "faces", source, "vertex")
    parents = as_array(data["parents"], "parents", source, dtype=np.int64,
                     shape=(len(FLAME_PARENTS),))
    out["parents"] = _check_parents(tuple(int(p) for p in parents), source)
    out.update(landmark_arrays(data, source, "static_lmk_faces", "static_lmk_bary",
                                "dynamic_lmk_faces", "dynamic_lmk_bary"))
    if any(k in data for k in ("mediapipe_lmk_faces", "mediapipe_lmk_bary",
                               "mediapipe_lmk_ids")):
        out.update(mediapipe_arrays(data, source, "mediapipe_lmk_faces", "mediapipe_lmk_bary",
                                     "mediapipe_lmk_ids"))
    if "albedo_mean" in data or "albedo_basis" in data:
        require_keys(data, ("albedo_mean", "albedo_basis"), source)
        out["albedo_mean"] = as_array(data["albedo_mean"], "albedo_mean", source,
                                    dtype=np.float32, shape=(num_vertices, 3))
        out["albedo_basis"] = as_array(data["albedo_basis"], "albedo_basis", source,
                                     dtype=np.float32, shape=(num_vertices, 3, None))
    masks = {key[len("mask_"):]: data[key] for key in data if key.startswith("mask_")}
    if masks:
        out["masks"] = mask_arrays(masks, num_vertices, source)
    return out


def _read_model_file(path: PathLike) -> dict:
    source = str(path)
    head = sniff(path)
    if head.startswith(NPY_MAGIC):
        raise FlameFileError(f"{source}: is a single .npy array, not a FLAME model (.pkl/.npz)")
    if head.startswith(ZIP_MAGIC):
        data = read_npz(path)
        if "exprdirs" in data or "j_regressor" in data:
            return _own_arrays(data, source)
        return _official_arrays(data, source)
    data = load_pickle_file(path)
    if not isinstance(data, dict):
        raise FlameFileError(f"{source}: expected a pickled dict of FLAME arrays, got "
                             f"{type(data).__name__}")
    return _official_arrays(data, source)



# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def load(path: PathLike, *, num_shape: Optional[int] = None,
         num_expression: Optional[int] = None, static_landmarks: Optional[PathLike] = None,
         dynamic_landmarks: Optional[PathLike] = None, masks: Optional[PathLike] = None,
         mediapipe: Optional[PathLike] = None, texture: Optional[PathLike] = None,
         num_texture: int = 50, texture_uv: Optional[PathLike] = None,
         texture_bgr: bool = True) -> FlameModel:
    """Read a FLAME model file (and optional auxiliary files) into a `FlameModel`.

    Args:
      path: `generic_model.pkl` (FLAME 2020, chumpy), `flame2023_Open.pkl`, an `.npz` with the
        official keys, or our `.npz` from `save`. The kind is detected from the content.
      num_shape, num_expression: keep the first n identity / expression components
        (None = all; official files: 300 identity and 100 expression).
      static_landmarks: `flame_static_embedding.pkl` overriding the 51 static landmarks.
      dynamic_landmarks: `flame_dynamic_embedding.npy` overriding the 79 x 17 contour landmarks.
        Without these two (and for official files, which carry no landmarks) the shipped MIT
        RingNet embedding `assets/flame_landmark_embedding_ringnet.npz` is used.
      masks: `FLAME_masks.pkl` -> `model.masks` {name: (K,) int32 vertex ids}.
      mediapipe: `mediapipe_landmark_embedding.npz` -> `model.mediapipe_lmk_*`.
      texture: `FLAME_texture.npz` or `FLAME_albedo_from_BFM.npz` -> per-vertex albedo
        (see `load_texture`); `num_texture` components kept; `texture_uv` supplies UVs for
        files without vt/ft; `texture_bgr` says the stored channels are BGR.

    Auxiliary arguments replace what our `.npz` holds. Raises `FlameFileError` naming the file
    and the problem; `FlameFileNotFoundError` (also a `FileNotFoundError`) for a missing path.
    """
    source = str(path)
    arrays = _read_model_file(path)
    num_vertices = arrays["v_template"].shape[0]
    keep_shape = check_count(num_shape, arrays["shapedirs"].shape[-1], "num_shape", source)
    keep_expression = check_count(num_expression, arrays["exprdirs"].shape[-1],
                                   "num_expression", source)
    arrays["shapedirs"] = arrays["shapedirs"][..., :keep_shape]
    arrays["exprdirs"] = arrays["exprdirs"][..., :keep_expression]

    if "static_lmk_faces" not in arrays or "dynamic_lmk_faces" not in arrays:
        arrays.update(shipped.load_landmark_embedding())
    if static_landmarks is not None:
        arrays.update(load_static_landmarks(static_landmarks))
    if dynamic_landmarks is not None:
        arrays.update(load_dynamic_landmarks(dynamic_landmarks))
    if mediapipe is not None:
        arrays.update(load_mediapipe(mediapipe))
    if masks is not None:
        arrays["masks"] = load_masks(masks, num_vertices)
    if texture is not None:
        arrays.update(load_texture(texture, arrays["faces"], num_vertices,
                                   num_texture=num_texture, texture_uv=texture_uv,
                                   bgr=texture_bgr))

    num_faces = arrays["faces"].shape[0]
    for key in ("static_lmk_faces", "dynamic_lmk_faces", "mediapipe_lmk_faces"):
        if key in arrays:
            check_index_range(arrays[key], num_faces, key, source, "triangle")

    return from_numpy(arrays)


def save(model: FlameModel, path: PathLike) -> None:
    """Write `model` to `path` as an uncompressed `.npz` (layout of `model.to_numpy`).

    The file is written to a temporary file in the same folder and moved into place with
    `os.replace`, so an interrupted save never leaves a partial file at `path`. The name is used
    as given (no `.npz` is appended).
    """
    path = pathlib.Path(path)
    arrays = to_numpy(model)
    for name in arrays:
        if name.startswith("mask_") and not name[len("mask_"):]:
            raise ValueError("mask names must be non-empty")
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


__all__ = ["FlameFileError", "FlameFileNotFoundError", "load", "save", "restricted_unpickle",
           "chumpy_to_numpy", "load_npy", "load_landmark_embedding", "load_static_landmarks",
           "load_dynamic_landmarks", "load_masks", "load_mediapipe", "load_texture",
           "sample_uv_bilinear", "DEFAULT_ALLOWED_GLOBALS", "ChumpyStandIn", "SparseStandIn"]
