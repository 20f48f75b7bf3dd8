"""Synthetic subjects rendered once, cached on disk, served from memory (a grain source).

    pool = build_pool(flame, config, range(0, 3072), images_per_subject=2, seed=0,
                      backbone_kind="dlib", trunk=trunk)          # trunk: optional `Trunk`
    record = pool[i]              # subject i's K examples: the `recon.types.Batch` fields

Storage ({field: array}, one row per subject): images and skin masks at the losses' size as
8-bit, landmarks, weights, one neutral mesh per subject, and the network's input as either the
8-bit crops (`backbone_inputs` recomputed from them when a record is read, as for a photo) or,
with a `Trunk`, the frozen trunk's features of those crops (computed once here in float32,
stored as float16 to halve the pool's memory; the crops are then not kept). The file `<cache>/synthetic/<key>.npz` is keyed by everything that
changes its content: the synthetic config, the subject range, K, the seed, the FLAME model's
digest, the backbone input kind and the trunk's key; it is written atomically.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from typing import Callable, Optional

import numpy as np

import flame_jax
from flame_jax.fileio import atomic_write
from recon.data import synthetic
from recon.image import preprocess

POOL_FORMAT = "recon.data.pool/3"
_UINT8 = ("images", "skin_masks", "crops")
# Subjects rendered per device call (batched rendering amortises the per-call cost).
RENDER_CHUNK = 16


def default_cache_dir() -> pathlib.Path:
    """$FACERECON_CACHE_DIR or ~/.cache/facerecon_jax (shared by every cache of the project)."""
    return pathlib.Path(os.environ.get("FACERECON_CACHE_DIR")
                        or pathlib.Path.home() / ".cache" / "facerecon_jax")


@dataclasses.dataclass(frozen=True)
class Trunk:
    """A frozen feature extractor applied to backbone inputs once, when the pool is built.

      apply: (B, n, n, 3) float32 backbone inputs -> (B, h, w, c) float32 features.
      key: a string naming the network, its weights and its cut (enters the pool's cache key).
      batch_size: inputs per call.
    """

    apply: Callable
    key: str
    batch_size: int = 32


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)


class PoolSource:
    """A grain random-access source over pre-rendered subjects held in memory.

    Record i: subject i's K examples (the `Batch` fields with a leading (K,) axis).
    """

    def __init__(self, arrays: dict, name: str, backbone_kind: str):
        self.arrays = arrays
        self.name = name
        self.backbone_kind = backbone_kind
        self.images_per_subject = int(arrays["images"].shape[1])
        preprocess.BACKBONE_INPUT_SIZE[backbone_kind]  # noqa: B018 - a KeyError names the kind

    def __repr__(self) -> str:
        # grain checks a restored iterator against repr(source): it must name the content.
        return (f"PoolSource({self.name}, subjects={len(self)}, "
                f"images_per_subject={self.images_per_subject})")

    def __len__(self) -> int:
        return int(self.arrays["images"].shape[0])

    @property
    def has_features(self) -> bool:
        return "features" in self.arrays

    def __getitem__(self, record_key: int) -> dict:
        index = int(record_key)
        k = self.images_per_subject
        arrays = self.arrays
        record = {
            "images": arrays["images"][index].astype(np.float32) / np.float32(255.0),
            "skin_masks": arrays["skin_masks"][index].astype(np.float32) / np.float32(255.0),
            "landmarks": np.array(arrays["landmarks"][index]),
            "landmark_weights": np.array(arrays["landmark_weights"][index]),
            "vertices": np.repeat(arrays["vertices"][index][None], k, axis=0),
            "has_3d": np.array(arrays["has_3d"][index]),
            "subject_ids": np.array(arrays["subject_ids"][index]),
        }
        if self.has_features:
            record["backbone_inputs"] = arrays["features"][index].astype(np.float32)
        else:
            record["backbone_inputs"] = preprocess.backbone_input(
                arrays["crops"][index], self.backbone_kind, max_value=255.0)
        return record

    def crops(self, record_key: int) -> np.ndarray:
        """(K, S, S, 3) float32 crops of record `record_key` in [0, 1] (pools built with crops)."""
        if "crops" not in self.arrays:
            raise KeyError(f"{self.name}: this pool keeps trunk features, not crops")
        return self.arrays["crops"][int(record_key)].astype(np.float32) / np.float32(255.0)


def _subjects_to_arrays(subjects: list, *, keep_crops: bool) -> dict:
    """[subject dicts with (K, ...) fields] -> {field: (N, K, ...)} (vertices (N, V, 3))."""
    arrays = {}
    for name in subjects[0]:
        if name == "crops" and not keep_crops:
            continue
        if name == "vertices":
            arrays[name] = np.stack([subject[name][0] for subject in subjects])
        else:
            arrays[name] = np.stack([subject[name] for subject in subjects])
    for name in _UINT8:
        if name in arrays:
            arrays[name] = _to_uint8(arrays[name])
    return arrays


def pool_key(config: synthetic.SyntheticConfig, subjects: range, *, images_per_subject: int,
             seed: int, model_digest: str, backbone_kind: str, trunk_key: str) -> str:
    """The cache key of a pool (a hash of everything that changes its content)."""
    description = {"format": POOL_FORMAT, "config": repr(config),
                   "subjects": [subjects.start, subjects.stop, subjects.step],
                   "images_per_subject": images_per_subject, "seed": seed,
                   "model": model_digest, "backbone_kind": backbone_kind, "trunk": trunk_key}
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]


def build_pool(flame: flame_jax.FlameModel, config: synthetic.SyntheticConfig,
               subjects: range, *, images_per_subject: int, seed: int, backbone_kind: str,
               trunk: Optional[Trunk] = None, cache_dir: str = "", desc: str = "pool",
               show_progress: bool = True) -> PoolSource:
    """`PoolSource` of synthetic `subjects`, rendered once (tqdm bar) and cached."""
    import tqdm

    key = pool_key(config, subjects, images_per_subject=images_per_subject, seed=seed,
                   model_digest=flame_jax.digest(flame), backbone_kind=backbone_kind,
                   trunk_key=trunk.key if trunk else "")
    root = pathlib.Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / "synthetic" / f"{key}.npz"
    if path.is_file():
        with np.load(path) as stored:
            return PoolSource({name: stored[name] for name in stored.files}, key, backbone_kind)
    host = synthetic.HostModel.from_model(flame)
    images = range(images_per_subject)
    chunks = []
    with tqdm.tqdm(total=len(subjects), desc=desc, unit="subject", disable=not show_progress,
                   dynamic_ncols=True) as bar:
        for start in range(0, len(subjects), RENDER_CHUNK):
            indices = list(subjects[start:start + RENDER_CHUNK])
            rendered = synthetic.make_subjects(flame, config, indices, images, seed, host)
            arrays = _subjects_to_arrays(rendered, keep_crops=trunk is None)
            if trunk is not None:
                crops = np.concatenate([subject["crops"] for subject in rendered])
                features = _trunk_features(trunk, crops, backbone_kind).astype(np.float16)
                arrays["features"] = features.reshape(len(indices), images_per_subject,
                                                      *features.shape[1:])
            chunks.append(arrays)
            bar.update(len(indices))
    arrays = {name: np.concatenate([chunk[name] for chunk in chunks]) for name in chunks[0]}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda stream: np.savez(stream, **arrays))
    return PoolSource(arrays, key, backbone_kind)


def _trunk_features(trunk: Trunk, crops: np.ndarray, backbone_kind: str) -> np.ndarray:
    """(N, h, w, c) float32 trunk features of (N, S, S, 3) crops in [0, 1]."""
    outputs = []
    for start in range(0, len(crops), trunk.batch_size):
        # The 8-bit crop is what the pool would keep and what a photo gives: features come
        # from it, so they equal the trunk's output on `PoolSource`-style inputs.
        pixels = _to_uint8(crops[start:start + trunk.batch_size])
        inputs = preprocess.backbone_input(pixels, backbone_kind, max_value=255.0)
        outputs.append(np.asarray(trunk.apply(inputs), np.float32))
    return np.concatenate(outputs)
