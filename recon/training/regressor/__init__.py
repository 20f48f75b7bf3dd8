"""The regressor trainer (`configs/default.py`, `configs/paper.py`).

  options:    the config read once into frozen dataclasses (`read_options`), input checks.
  step:       `TrainState`, the optimizer, `train_step(state, assets, batch) -> (state, metrics)`.
  evaluation: held-out errors (whole head, face region, similarity-aligned) and PNG grids.
  baseline:   the ridge read-out of the frozen pretrained embedding, measured in the same run.
  now_eval:   the NoW validation score during training (`config.eval.now_root`).
  loop:       `train_and_evaluate(config, workdir)`: run state, data, the loop, resume.
"""

from recon.training.regressor.loop import CHECKPOINT_DIR, CONFIG_FILE, train_and_evaluate

__all__ = ["CHECKPOINT_DIR", "CONFIG_FILE", "train_and_evaluate"]
