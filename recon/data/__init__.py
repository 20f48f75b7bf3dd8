"""Training data: synthetic 2D-3D pairs from the model itself, MICA-format scan datasets, the
pool cache, and the grain input pipeline that batches them subject-major.

  synthetic:    `SyntheticConfig` (crop, scenes), `make_subjects`, `make_subject`,
                `SyntheticSource`, subject-index ranges `TRAIN_SUBJECTS`, `HELDOUT_SUBJECTS`,
                `NOW_SYNTHETIC_SUBJECTS`.
  augment:      backgrounds, occluders and photo degradations (numpy + OpenCV), `AugmentConfig`.
  mica:         `MicaDataset(root, names, model=..., crop=...)`, MICA's `root/NAME/...` layout.
  prepare_mica: `python -m recon.data.prepare_mica ROOT NAME...`: the 68 landmarks of a MICA-format
                dataset, detected once (or converted from its own files) and stored beside it.
  pool:         `build_pool(...) -> PoolSource`: subjects rendered once, cached, served from
                memory; optionally with a frozen trunk's features (`Trunk`).
  sources:      `DataOptions`, `SceneOptions`, `make_train_source`, `make_train_loader`,
                `eval_pool`, `make_eval_batches` (what a run's `config.data` asks for).
  pipeline:     `make_loader(...)` (grain), `batch_from_numpy(...)`, `check_example(...)`.
"""

from recon.data.augment import AugmentConfig
from recon.data.mica import MicaDataset
from recon.data.pipeline import BatchIterator, batch_from_numpy, check_example, make_loader
from recon.data.pool import PoolSource, Trunk, build_pool
from recon.data.sources import (DataOptions, SceneOptions, eval_pool, make_eval_batches,
                                make_train_loader, make_train_source)
from recon.data.synthetic import (HELDOUT_SUBJECTS, NOW_SYNTHETIC_SUBJECTS, TRAIN_SUBJECTS,
                                  SyntheticConfig, SyntheticSource, make_example, make_subject,
                                  make_subjects)

__all__ = ["AugmentConfig", "BatchIterator", "DataOptions", "HELDOUT_SUBJECTS", "MicaDataset",
           "NOW_SYNTHETIC_SUBJECTS", "PoolSource", "SceneOptions", "SyntheticConfig",
           "SyntheticSource", "TRAIN_SUBJECTS", "Trunk", "batch_from_numpy", "build_pool",
           "check_example", "eval_pool", "make_eval_batches", "make_example", "make_loader",
           "make_subject", "make_subjects", "make_train_loader", "make_train_source"]
