"""The frozen CoMA encoder of the 3D-ID loss: given, cached for this FLAME model, or trained now.

The encoder must know the meshes it compares: it is trained on heads of the run's own FLAME
model (its identity and expression spaces, `recon.training.coma`), or on registrations
(`coma.data.source='folder'`). Its cache entry `<cache>/coma/<key>/` is keyed by the CoMA config,
the mesh hierarchy, the FLAME model's digest (`flame_jax.digest`) and, for a folder of
registrations, the folder's file list with sizes and times; an encoder trained on another FLAME
model is therefore never reused for this one. A given `coma_checkpoint_dir` is checked against
the run's mesh topology (the hierarchy built on FLAME's triangles must be the checkpoint's).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Callable

import numpy as np

import flame_jax
import spectral_gcn
from recon.data.pool import default_cache_dir

CHECKPOINT_DIR = "checkpoints"
CACHE_FORMAT = "recon.training.coma_cache/2"


def _folder_fingerprint(folder: str) -> list:
    root = pathlib.Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"coma.data.folder {folder!r} does not exist")
    entries = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in (".obj", ".ply") and path.is_file():
            stat = path.stat()
            entries.append([str(path.relative_to(root)), stat.st_size, int(stat.st_mtime)])
    return entries


def coma_cache_key(coma_config: dict, hierarchy_key: str, flame_digest: str) -> str:
    """Hash of the CoMA training config (JSON, sorted keys; `cache_dir` left out), the mesh
    hierarchy key, the FLAME model's digest and, for `data.source == 'folder'`, the folder's
    files."""
    config = {key: value for key, value in coma_config.items() if key != "cache_dir"}
    data = dict(config.get("data", {}))
    folder = _folder_fingerprint(data["folder"]) if data.get("source") == "folder" else None
    text = json.dumps({"format": CACHE_FORMAT, "config": config, "hierarchy": hierarchy_key,
                       "flame": flame_digest, "folder": folder}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def check_topology(flame: flame_jax.FlameModel, hierarchy) -> None:
    """Raise ValueError unless the run's FLAME triangles are the hierarchy's topology."""
    _, faces = spectral_gcn.flame_topology()
    if np.asarray(flame.faces).shape != faces.shape or not np.array_equal(
            np.asarray(flame.faces), faces):
        raise ValueError("the run's FLAME model does not have FLAME's triangles: the 3D-ID "
                         "loss's CoMA encoder works on FLAME's topology only")
    if hierarchy.sizes[0] != flame.num_vertices:
        raise ValueError(f"the CoMA hierarchy has {hierarchy.sizes[0]} vertices, the FLAME model "
                         f"{flame.num_vertices}")


def ensure_coma_encoder(coma_config, flame: flame_jax.FlameModel, *, checkpoint_dir: str = "",
                        cache_dir: str = "", log: Callable[[str], None] = print
                        ) -> spectral_gcn.FrozenEncoder:
    """The frozen CoMA encoder of the 3D-ID loss for `flame` (see the module docstring).

    coma_config: a configs/coma.py ConfigDict. checkpoint_dir: a trained CoMA checkpoint
    folder, used as is after the topology check. Otherwise `<cache>/coma/<key>/checkpoints` is
    loaded when present, else CoMA is trained now into a temporary folder that is renamed into
    the cache only when training finished, so a killed run leaves no half-written entry.
    """
    coma_config = coma_config.copy_and_resolve_references()
    with coma_config.unlocked():
        coma_config.cache_dir = cache_dir
    hierarchy = spectral_gcn.flame_hierarchy(tuple(coma_config.factors),
                                             cache_dir=cache_dir or None)
    check_topology(flame, hierarchy)
    if checkpoint_dir:
        return spectral_gcn.load_encoder(pathlib.Path(checkpoint_dir),
                                         expected_hierarchy=hierarchy)
    root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    key = coma_cache_key(coma_config.to_dict(), hierarchy.key, flame_jax.digest(flame))
    entry = root / "coma" / key
    if (entry / CHECKPOINT_DIR).is_dir():
        log(f"CoMA encoder: cached in {entry}")
        return spectral_gcn.load_encoder(entry / CHECKPOINT_DIR, expected_hierarchy=hierarchy)
    from recon.training import coma  # only needed when nothing is cached

    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{key}."))
    log(f"CoMA encoder: training it ({coma_config.steps} steps on heads of this FLAME model), "
        f"then caching it in {entry}")
    try:
        coma.train_and_evaluate(coma_config, staging, flame=flame)
        try:
            os.replace(staging, entry)
        except OSError:
            if not (entry / CHECKPOINT_DIR).is_dir():  # not a concurrent run that finished first
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return spectral_gcn.load_encoder(entry / CHECKPOINT_DIR, expected_hierarchy=hierarchy)
