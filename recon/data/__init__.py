"""Training data: synthetic 2D-3D pairs from the model itself, MICA-format scan datasets, and the
grain input pipeline that batches them subject-major.

  synthetic: `SyntheticConfig`, `make_example`, `make_subject`, `SyntheticSource`, subject-index
             ranges `TRAIN_SUBJECTS`, `HELDOUT_SUBJECTS`, `NOW_SYNTHETIC_SUBJECTS`.
  augment:   backgrounds, occluders and photo degradations (numpy + OpenCV), `AugmentConfig`.
  mica:      `MicaDataset(root, names, model=...)`, MICA's `root/NAME/...` layout.
  pipeline:  `make_loader(...)` (grain), `batch_from_numpy(...)`, `check_example(...)`.
"""

from recon.data.augment import AugmentConfig
from recon.data.mica import MicaDataset
from recon.data.pipeline import BatchIterator, batch_from_numpy, check_example, make_loader
from recon.data.synthetic import (HELDOUT_SUBJECTS, NOW_SYNTHETIC_SUBJECTS, TRAIN_SUBJECTS,
                                  SyntheticConfig, SyntheticSource, make_example, make_subject)

__all__ = ["AugmentConfig", "BatchIterator", "HELDOUT_SUBJECTS", "MicaDataset",
           "NOW_SYNTHETIC_SUBJECTS", "TRAIN_SUBJECTS", "SyntheticConfig", "SyntheticSource",
           "batch_from_numpy", "check_example", "make_example", "make_loader", "make_subject"]
