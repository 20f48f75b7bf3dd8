"""Where a run's batches come from (`config.data`): options, training sources, held-out batches.

    options = to_dataclass(config.data, DataOptions)
    source = make_train_source(flame, options, backbone_kind="dlib", trunk=trunk)
    loader = make_train_loader(source, options)                 # grain, per-host shards
    batches = make_eval_batches(flame, options, 16, backbone_kind="dlib")

Sources: "synthetic" (`recon.data.synthetic`: rendered as read, or `pool=True`: rendered once,
cached, served from memory, `recon.data.pool`) and "mica" (`recon.data.mica.MicaDataset`).
Every option reaches every source that can honour it; one that a source cannot honour is an
error naming the option.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import numpy as np

import flame_jax
from recon.data import augment, pipeline, pool, synthetic
from recon.image.crop import CropSpec


# `SceneOptions.degradations` -> the host-side randomisation it stands for.
DEGRADATIONS = {"full": augment.AugmentConfig, "occluders": augment.AugmentConfig.occluders_only,
                "clean": augment.AugmentConfig.clean}


@dataclasses.dataclass(frozen=True)
class SceneOptions:
    """How wide the synthetic images vary (the `recon.data.synthetic.SyntheticConfig` fields
    of the same names; angles in degrees). The defaults are SyntheticConfig's (wide: made for
    models that must also work on photos).

    landmark_noise: the detector's landmark error the training crops are made with (a fraction
      of the landmark box side; see `SyntheticConfig`).
    fallback_crop_probability: the fraction of images cropped from the face box alone, as a
      prediction crops a face whose landmarks were not found (see `SyntheticConfig`).
    degradations: "full" (`AugmentConfig()`: occluders, blur, noise, JPEG, colour jitter),
      "occluders" (`AugmentConfig.occluders_only()`: occluders, no photo degradations) or
      "clean" (`AugmentConfig.clean()`: none of them; backgrounds stay random).
    """

    shape_std: float = 1.0
    expression_std: float = 0.7
    max_yaw_deg: float = 40.0
    max_pitch_deg: float = 20.0
    max_roll_deg: float = 12.0
    landmark_noise: float = 0.0
    box_scale_jitter: float = 0.12
    box_shift_jitter: float = 0.07
    fallback_crop_probability: float = 0.0
    perspective_probability: float = 0.5
    lambert_probability: float = 0.4
    specular_probability: float = 0.5
    degradations: str = "full"

    def __post_init__(self):
        if self.degradations not in DEGRADATIONS:
            raise ValueError(f"data.scene.degradations must be one of {sorted(DEGRADATIONS)}, got "
                             f"{self.degradations!r}")
        if self.shape_std <= 0:
            raise ValueError(f"data.scene.shape_std must be > 0, got {self.shape_std}")
        if self.expression_std < 0:
            raise ValueError(f"data.scene.expression_std must be >= 0, got "
                             f"{self.expression_std}")
        if self.landmark_noise < 0:
            raise ValueError(f"data.scene.landmark_noise must be >= 0, got "
                             f"{self.landmark_noise}")
        if not 0.0 <= self.fallback_crop_probability <= 1.0:
            raise ValueError(f"data.scene.fallback_crop_probability must be in [0, 1], got "
                             f"{self.fallback_crop_probability}")


@dataclasses.dataclass(frozen=True)
class DataOptions:
    """Where batches come from and how big they are (global batch = subjects x images).

    source: "synthetic" (subjects 0..num_train_subjects-1 of `recon.data.synthetic`) or "mica"
      (`recon.data.mica.MicaDataset(root, names)`).
    crop: the face crop (`recon.image.CropSpec`): stored with the checkpoints, read back by the
      predictor, so NoW and photos get the crop the model was trained on.
    image_size: the 2D losses' image, the crop resized to this side (0 = the crop's size).
    pool: synthetic only: render the num_train_subjects subjects once, cache them (8-bit
      images) under the cache folder, and serve them from memory; False renders every subject
      when it is read (endless variety, but on a CPU the renderer then competes with training).
    num_eval_subjects: held-out synthetic subjects (`HELDOUT_SUBJECTS`) of the evaluation.
    num_workers: grain worker processes (0: reader threads in the training process).
    seed: the data seed (identities, images, shuffling).
    scene: how widely the synthetic images vary (`SceneOptions`).
    mica_landmarks: mica only: where the 68 landmarks of the images come from: "detected"
      (`python -m recon.data.prepare_mica`, cached beside the data) or "none" (no landmark
      terms: they must then be switched off).
    """

    source: str = "synthetic"
    root: str = ""
    names: tuple = ()
    crop: CropSpec = CropSpec()
    image_size: int = 0
    batch_subjects: int = 4
    images_per_subject: int = 2
    num_train_subjects: int = 4096
    pool: bool = False
    num_eval_subjects: int = 32
    num_workers: int = 0
    seed: int = 0
    scene: SceneOptions = SceneOptions()
    mica_landmarks: str = "detected"

    def __post_init__(self):
        if self.source not in ("synthetic", "mica"):
            raise ValueError(f"data.source must be 'synthetic' or 'mica', got {self.source!r}")
        if self.image_size < 0 or (self.image_size and self.image_size < 8):
            raise ValueError(f"data.image_size must be 0 (the crop's size) or >= 8, got "
                             f"{self.image_size}")
        if self.mica_landmarks not in ("detected", "none"):
            raise ValueError(f"data.mica_landmarks must be 'detected' or 'none', got "
                             f"{self.mica_landmarks!r}")

    @property
    def global_batch_size(self) -> int:
        return self.batch_subjects * self.images_per_subject

    @property
    def loss_size(self) -> int:
        """The side of the 2D losses' image."""
        return int(self.image_size or self.crop.size)


def synthetic_config(options: DataOptions) -> synthetic.SyntheticConfig:
    """The `SyntheticConfig` of the run's crop, image size and scene options."""
    scene = dataclasses.asdict(options.scene)
    degradations = scene.pop("degradations")
    return synthetic.SyntheticConfig(
        crop=options.crop, image_size=options.loss_size, **scene,
        augment=DEGRADATIONS[degradations]())


def _train_subjects(options: DataOptions) -> range:
    start = synthetic.TRAIN_SUBJECTS.start
    return range(start, start + options.num_train_subjects)


def make_train_source(flame: flame_jax.FlameModel, options: DataOptions, *, backbone_kind: str,
                      trunk: Optional[pool.Trunk] = None, cache_dir: str = ""):
    """The training source: one record per subject with its K images.

    trunk: the frozen trunk whose features the pool caches (`model.trunk_cache`); only a
    synthetic pool can hold them.
    """
    if options.source == "mica":
        if trunk is not None:
            raise ValueError("model.trunk_cache needs data.source='synthetic' with data.pool=True "
                             "(MICA images are read as they are needed)")
        if options.pool:
            raise ValueError("data.pool is a synthetic-data option; MICA-format data is read "
                             "from its files (set data.pool=False)")
        if options.scene.fallback_crop_probability:
            raise ValueError("data.scene.fallback_crop_probability is a synthetic-data option: "
                             "MICA-format images come cropped (set it to 0)")
        from recon.data import mica

        return mica.MicaDataset(
            options.root, tuple(options.names), model=flame, crop=options.crop,
            image_size=options.loss_size, images_per_subject=options.images_per_subject,
            seed=options.seed, backbone_kind=backbone_kind, landmarks=options.mica_landmarks)
    config = synthetic_config(options)
    if options.pool:
        return pool.build_pool(flame, config, _train_subjects(options),
                               images_per_subject=options.images_per_subject,
                               seed=options.seed, backbone_kind=backbone_kind, trunk=trunk,
                               cache_dir=cache_dir, desc="training pool",
                               show_progress=jax.process_index() == 0)
    if trunk is not None:
        raise ValueError("model.trunk_cache needs data.pool=True (features are computed once "
                         "for the pool)")
    return synthetic.SyntheticSource(flame, config, backbone_kind=backbone_kind,
                                     subjects=_train_subjects(options),
                                     images_per_subject=options.images_per_subject,
                                     seed=options.seed)


def make_train_loader(source, options: DataOptions) -> pipeline.BatchIterator:
    """grain iterator of this host's share of each global batch (subject-major)."""
    return pipeline.make_loader(
        source, batch_subjects=options.batch_subjects,
        images_per_subject=options.images_per_subject, seed=options.seed,
        shard_index=jax.process_index(), shard_count=jax.process_count(),
        num_workers=options.num_workers)


def eval_pool(flame: flame_jax.FlameModel, options: DataOptions, *, backbone_kind: str,
              cache_dir: str = "") -> pool.PoolSource:
    """The held-out synthetic subjects (`HELDOUT_SUBJECTS`), rendered once with their crops.

    Every held-out image is cropped from its landmarks: fallback crops
    (`SceneOptions.fallback_crop_probability`) are a training augmentation, as a validation
    set takes the centre crop of a model trained on random crops."""
    start = synthetic.HELDOUT_SUBJECTS.start
    options = dataclasses.replace(options, scene=dataclasses.replace(
        options.scene, fallback_crop_probability=0.0))
    return pool.build_pool(flame, synthetic_config(options),
                           range(start, start + options.num_eval_subjects),
                           images_per_subject=options.images_per_subject, seed=options.seed,
                           backbone_kind=backbone_kind, cache_dir=cache_dir,
                           desc="held-out subjects", show_progress=jax.process_index() == 0)


def make_eval_batches(flame: flame_jax.FlameModel, options: DataOptions, eval_batch_size: int, *,
                      backbone_kind: str, cache_dir: str = "") -> list:
    """Held-out synthetic subjects as host batches of `eval_batch_size` rows (whole subjects);
    with several processes each keeps its own contiguous share of every batch."""
    source = eval_pool(flame, options, backbone_kind=backbone_kind, cache_dir=cache_dir)
    rows = [source[i] for i in range(len(source))]
    flat = {name: np.concatenate([row[name] for row in rows]) for name in rows[0]}
    per_process = eval_batch_size // jax.process_count()
    batches = []
    for start in range(0, flat["images"].shape[0], eval_batch_size):
        offset = start + jax.process_index() * per_process
        batches.append({name: value[offset:offset + per_process] for name, value in flat.items()})
    return batches
