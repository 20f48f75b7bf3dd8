"""Multi-process start-up shared by the trainers."""

from __future__ import annotations

import os

import jax


def maybe_initialize() -> None:
    """`jax.distributed.initialize()` when the environment describes a multi-process job.

    Triggers: JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES / JAX_PROCESS_ID), or
    FACERECON_DISTRIBUTED=1 for clusters whose variables jax detects itself (SLURM, Cloud TPU,
    Open MPI). A single process never calls it, so laptops and one-GPU runs need nothing.
    """
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("FACERECON_DISTRIBUTED") == "1":
        jax.distributed.initialize()
