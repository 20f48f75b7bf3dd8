"""The real FLAME data shipped in `flame_jax/assets` (sources and licenses in NOTICE.md there).

    load_topology()            FLAME 2023 Open template, triangles, identity components 1..60
    load_landmark_embedding()  RingNet's static 51-point and dynamic 79 x 17 contour embedding

Both are read and validated by the same code as user files (`flame_jax.validate`), so a damaged
install fails with `FlameFileError` naming the file and the problem; each call returns fresh,
writable numpy arrays.
"""

from __future__ import annotations

import os
import pathlib
from typing import Dict, Union

import numpy as np

from flame_jax import auxiliary
from flame_jax.fileio import read_npz
from flame_jax.model import NUM_FACES, NUM_VERTICES
from flame_jax.validate import as_array, check_index_range, require_keys

PathLike = Union[str, os.PathLike]
ASSETS_DIR = pathlib.Path(__file__).resolve().parent / "assets"
TOPOLOGY_PATH = ASSETS_DIR / "flame2023_open_id60.npz"
LANDMARK_EMBEDDING_PATH = ASSETS_DIR / "flame_landmark_embedding_ringnet.npz"
NUM_REAL_SHAPE = 60  # identity components shipped


def load_topology(path: PathLike = TOPOLOGY_PATH) -> Dict[str, np.ndarray]:
    """Real FLAME 2023 Open arrays (CC-BY-4.0, MPI-IS) shipped with the package.

    Returns {"v_template": (5023, 3) float32 metres, "shapedirs_id60": (5023, 3, 60) float32
    (identity components 1..60, metres per unit coefficient), "faces": (9976, 3) int32}.
    """
    source = str(path)
    data = read_npz(path)
    require_keys(data, ("v_template", "shapedirs", "faces"), source)
    faces = as_array(data["faces"], "faces", source, dtype=np.int32, shape=(NUM_FACES, 3))
    check_index_range(faces, NUM_VERTICES, "faces", source, "vertex")
    return {
        "v_template": as_array(data["v_template"], "v_template", source, dtype=np.float32,
                               shape=(NUM_VERTICES, 3)),
        "shapedirs_id60": as_array(data["shapedirs"], "shapedirs", source, dtype=np.float32,
                                   shape=(NUM_VERTICES, 3, NUM_REAL_SHAPE)),
        "faces": faces,
    }


def load_landmark_embedding(path: PathLike = LANDMARK_EMBEDDING_PATH) -> Dict[str, np.ndarray]:
    """RingNet's FLAME landmark embedding (MIT) shipped with the package.

    Returns {"static_lmk_faces": (51,) int32, "static_lmk_bary": (51, 3) float32,
    "dynamic_lmk_faces": (79, 17) int32, "dynamic_lmk_bary": (79, 17, 3) float32}: iBUG-68
    points 18..68, and the 17 jaw-contour points for head yaw bins -39..39 degrees; triangle
    indices checked against FLAME's 9976 triangles.
    """
    arrays = auxiliary.load_landmark_embedding(path)
    for key in ("static_lmk_faces", "dynamic_lmk_faces"):
        check_index_range(arrays[key], NUM_FACES, key, str(path), "triangle")
    return arrays


__all__ = ["load_topology", "load_landmark_embedding", "TOPOLOGY_PATH",
           "LANDMARK_EMBEDDING_PATH", "ASSETS_DIR", "NUM_REAL_SHAPE"]
