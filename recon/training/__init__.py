"""What every trainer shares (the CoMA trainer and the regressor trainer).

  config.to_dataclass(config, cls)        ConfigDict -> frozen dataclasses; unknown keys fail
  checkpoints.RunCheckpointer(dir, config=...)   one orbax manager per run; resume; config check
  metrics.MetricsWriter(workdir, total_steps=...) metrics.jsonl + tqdm (steps/s, ETA)
  guard.guarded_update / raise_if_nonfinite  every step checked on device, first bad step named
  sharding.make_mesh / replicated / data_sharding / shard_batch   one `data` axis
"""

from recon.training import checkpoints, config, guard, metrics, sharding
from recon.training.checkpoints import (CheckpointRestoreError, ConfigMismatchError,
                                        RunCheckpointer)
from recon.training.config import to_dataclass
from recon.training.metrics import MetricsWriter

__all__ = ["checkpoints", "config", "guard", "metrics", "sharding", "CheckpointRestoreError",
           "ConfigMismatchError", "RunCheckpointer", "to_dataclass", "MetricsWriter"]
