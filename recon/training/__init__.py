"""Training: what every trainer shares, the CoMA trainer and the regressor trainer.

  checkpoints.RunCheckpointer(dir, config=...)     one orbax manager per run; resume; config check
  metrics.MetricsWriter(workdir, total_steps=...)  metrics.jsonl + tqdm (steps/s, ETA)
  guard.guarded_update / raise_if_nonfinite        every step checked on device, first bad step named
  sharding.make_mesh / replicated / data_sharding / shard_batch   one `data` axis
  distributed.maybe_initialize                     jax.distributed when the environment asks for it
  coma:      the CoMA autoencoder behind the 3D-ID loss (`configs/coma.py`)
  coma_cache.ensure_coma_encoder                   the frozen encoder: given, cached or trained now
  fakes:     stand-ins for the paper's licensed files (`configs/paper.py:smoke`): a FLAME
             2020-format pickle, an ArcFace-layout ONNX IResNet, a MICA-format tree of renders
  regressor: the regressor trainer (`configs/default.py`, `configs/paper.py`): options, step,
             evaluation, the ridge baseline, NoW during training, the loop
"""
