"""The grain input pipeline: subject records -> subject-major host batches -> `Batch`.

A source is any grain random-access source (`__len__`, `__getitem__`) whose record i is ONE
subject: a dict of `recon.types.Batch` fields with a leading (K,) axis of its K images
(`SyntheticSource`, `MicaDataset`). The loader batches `batch_subjects` records and flattens
them to (batch_subjects * K, ...) rows, so the K images of a subject are consecutive rows, as the
shape-consistency loss needs.

Order and determinism: `grain.IndexSampler` shuffles subjects with `seed` (a new permutation
every epoch, endless by default). Which records a host reads depends only on (seed, shard_index,
shard_count, num_workers); it never depends on the number of devices, so a 1-device run and an
8-device run see the same global batches (the trainer shards each host batch over its local
devices). Across hosts pass shard_index = jax.process_index(), shard_count =
jax.process_count(): each host reads a disjoint shard and makes batch_subjects / shard_count
subjects per step. With worker processes each worker makes whole batches from every
num_workers-th record of its shard, so num_workers is part of the data order (keep it fixed
when resuming).

Checkpointing: `iterator.get_state()` -> bytes (JSON); store `state.decode()` in the
checkpoint's JSON `extra` and resume with `iterator.set_state(text.encode())`; the next batch is
then exactly the one the saved run would have produced.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import grain.python as grain
import numpy as np

from recon.types import Batch

# Field -> (dtype, trailing shape without the example axis; None = any size).
FIELDS: Dict[str, tuple] = {
    "images": (np.float32, (None, None, 3)),
    "backbone_inputs": (np.float32, (None, None, None)),
    "landmarks": (np.float32, (68, 2)),
    "landmark_weights": (np.float32, (68,)),
    "skin_masks": (np.float32, (None, None)),
    "vertices": (np.float32, (None, 3)),
    "has_3d": (np.float32, ()),
    "subject_ids": (np.int32, ()),
}


def check_example(example: Mapping[str, Any], *, leading: int = 0, what: str = "example"
                  ) -> None:
    """Raise ValueError naming the field if `example` lacks a `Batch` field, has an extra one,
    a wrong dtype or shape, or non-finite values. `leading`: number of leading batch axes."""
    missing = sorted(set(FIELDS) - set(example))
    extra = sorted(set(example) - set(FIELDS))
    if missing or extra:
        raise ValueError(f"{what}: missing fields {missing}, unexpected fields {extra}")
    lead = None
    for name, (dtype, trailing) in FIELDS.items():
        value = np.asarray(example[name])
        if value.dtype != dtype:
            raise ValueError(f"{what}: field {name!r} has dtype {value.dtype}, expected "
                             f"{np.dtype(dtype)}")
        if value.ndim != leading + len(trailing) or any(
                want is not None and got != want
                for got, want in zip(value.shape[leading:], trailing)):
            raise ValueError(f"{what}: field {name!r} has shape {value.shape}, expected "
                             f"{leading} leading axes + {trailing}")
        if lead is None:
            lead = value.shape[:leading]
        elif value.shape[:leading] != lead:
            raise ValueError(f"{what}: field {name!r} has leading shape {value.shape[:leading]}, "
                             f"other fields {lead}")
        if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value)):
            raise ValueError(f"{what}: field {name!r} holds NaN or inf")
    images, masks = np.asarray(example["images"]), np.asarray(example["skin_masks"])
    if images.shape[:-1] != masks.shape:
        raise ValueError(f"{what}: images {images.shape} and skin_masks {masks.shape} differ in "
                         f"size")


class FlattenSubjects(grain.MapTransform):
    """(S, K, ...) batched subject records -> (S * K, ...) rows, subject-major."""

    def map(self, element: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return {name: value.reshape(value.shape[0] * value.shape[1], *value.shape[2:])
                for name, value in element.items()}


class BatchIterator:
    """grain's `DataLoaderIterator` returning plain numpy copies of each batch.

    With worker processes grain hands out arrays backed by shared memory that it unlinks and
    reuses; a batch held past the next `next()` was seen to change here. One copy per batch
    (about 10 MB at 16 x 224 x 224) makes every batch the caller's own.
    """

    def __init__(self, iterator: grain.DataLoaderIterator):
        self._iterator = iterator

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> Dict[str, np.ndarray]:
        return {name: np.array(value) for name, value in next(self._iterator).items()}

    def get_state(self) -> bytes:
        """JSON bytes (grain's state: sampler, last index per worker, worker count)."""
        return self._iterator.get_state()

    def set_state(self, state: bytes | str) -> None:
        """Resume: the next batch is the one that followed `get_state()` in the saved run."""
        self._iterator.set_state(state.encode() if isinstance(state, str) else state)


def make_loader(source, *, batch_subjects: int, images_per_subject: int, seed: int,
                shard_index: int = 0, shard_count: int = 1, num_workers: int = 0,
                shuffle: bool = True, num_epochs: Optional[int] = None,
                worker_buffer_size: int = 2) -> BatchIterator:
    """A grain iterator of subject-major host batches (dicts of numpy arrays, `Batch` fields).

    Args:
      source: random-access source whose record is one subject with K = images_per_subject
        images (checked against `source.images_per_subject` when it has one).
      batch_subjects: GLOBAL subjects per step; each of the shard_count hosts makes
        batch_subjects / shard_count of them (must divide).
      images_per_subject: K.
      seed: shuffling seed (a different permutation each epoch).
      shard_index, shard_count: this host's shard (hosts only; never the device count).
      num_workers: grain worker processes (0: in this process, with 2 reader threads).
      shuffle: False reads subjects in order (evaluation).
      num_epochs: None repeats forever; an int stops after that many passes (the last partial
        batch is dropped).
      worker_buffer_size: batches each worker prefetches.
    Returns a `BatchIterator` over grain's iterator: `next(it)` -> dict of numpy arrays with
    leading size batch_subjects / shard_count * K; `get_state()` / `set_state()` for
    checkpoints (bytes; `set_state` also takes the decoded str).
    """
    if batch_subjects < 1 or images_per_subject < 1:
        raise ValueError(f"batch_subjects ({batch_subjects}) and images_per_subject "
                         f"({images_per_subject}) must be >= 1")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} outside [0, shard_count={shard_count})")
    if batch_subjects % shard_count:
        raise ValueError(f"batch_subjects {batch_subjects} must be divisible by shard_count "
                         f"{shard_count} (the global batch is split evenly over hosts)")
    source_k = getattr(source, "images_per_subject", images_per_subject)
    if source_k != images_per_subject:
        raise ValueError(f"source gives {source_k} images per subject, loader asked for "
                         f"{images_per_subject}")
    per_host = batch_subjects // shard_count
    if len(source) // shard_count < per_host:
        raise ValueError(f"source has {len(source)} subjects: too few for {per_host} subjects "
                         f"per batch on each of {shard_count} shards")
    shard_options = grain.ShardOptions(shard_index=shard_index, shard_count=shard_count,
                                       drop_remainder=True)
    sampler = grain.IndexSampler(num_records=len(source), shard_options=shard_options,
                                 shuffle=shuffle, num_epochs=num_epochs, seed=seed)
    loader = grain.DataLoader(
        data_source=source, sampler=sampler,
        operations=[grain.Batch(per_host, drop_remainder=True), FlattenSubjects()],
        worker_count=num_workers, worker_buffer_size=worker_buffer_size,
        # Few reader threads and a bounded prefetch: each record is a whole rendered subject.
        read_options=grain.ReadOptions(num_threads=2, prefetch_buffer_size=2 * per_host))
    return BatchIterator(iter(loader))


def batch_from_numpy(batch: Mapping[str, Any]) -> Batch:
    """Host batch dict -> `recon.types.Batch` of numpy arrays (validated; dtypes exact).

    Leaves stay numpy so that `recon.training.sharding.shard_batch` places them on devices.
    Raises ValueError naming the first bad field.
    """
    check_example(batch, leading=1, what="batch")
    return Batch(**{name: np.asarray(batch[name]) for name in FIELDS})
