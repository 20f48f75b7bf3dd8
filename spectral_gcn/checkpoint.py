"""Orbax checkpoints of the CoMA autoencoder and its frozen use as the 3D-ID encoder.

A checkpoint step holds three items (and may hold others, e.g. a trainer's state, which are
not read here):
  variables: {"params": ..., "stats": {"encoder": {"mean", "std"}}} of the AutoEncoder.
  hierarchy: the MeshHierarchy arrays the weights were trained with.
  metadata:  JSON: model config, hierarchy key and factors, format version, training summary.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import struct

from spectral_gcn import mesh as mesh_lib
from spectral_gcn.mesh import MeshHierarchy
from spectral_gcn.models import CoMAConfig, Encoder

Array = jax.Array
CHECKPOINT_FORMAT = "spectral_gcn.coma/1"


class CheckpointError(ValueError):
    """A CoMA checkpoint is missing, incomplete or does not match the expected model/topology."""


@struct.dataclass
class FrozenEncoder:
    """A trained CoMA encoder as a pytree: pass it to jitted code and call `encode` inside.

      variables: {"params": encoder params, "stats": {"mean": (N, 3), "std": (N, 3)}}.
      hierarchy: the MeshHierarchy it was trained with.
      config:    static CoMAConfig.
    """

    variables: dict
    hierarchy: MeshHierarchy
    config: CoMAConfig = struct.field(pytree_node=False)


def encode(frozen: FrozenEncoder, vertices: Array) -> Array:
    """(B, N, 3) vertices in metres (canonical pose) -> (B, latent_size) frozen CoMA codes.

    Gradients flow to `vertices` only: the weights and statistics are under stop_gradient.
    """
    variables = jax.lax.stop_gradient(frozen.variables)
    return Encoder(frozen.config).apply(variables, vertices, frozen.hierarchy)


def _manager(directory, max_to_keep: Optional[int] = None) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def checkpoint_items(variables: dict, hierarchy: MeshHierarchy, config: CoMAConfig, factors,
                     extra_metadata: Optional[dict] = None) -> dict:
    """The orbax items of a CoMA checkpoint step: {"variables", "hierarchy", "metadata"} args.

    A trainer adds them to its own checkpoint steps (beside its training state), so that
    `load_encoder(that directory)` reads the encoder without knowing the trainer's state layout.
    variables: the AutoEncoder's {"params": ..., "stats": ...}.
    """
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "model": dataclasses.asdict(config),
        "hierarchy_key": hierarchy.key,
        "hierarchy_format_version": mesh_lib.FORMAT_VERSION,
        "factors": [int(f) for f in factors],
        "sizes": list(hierarchy.sizes),
        **(extra_metadata or {}),
    }
    return {"variables": ocp.args.StandardSave(variables),
            "hierarchy": ocp.args.StandardSave(mesh_lib.hierarchy_arrays(hierarchy)),
            "metadata": ocp.args.JsonSave(metadata)}


def save_checkpoint(directory, step: int, variables: dict, hierarchy: MeshHierarchy,
                    config: CoMAConfig, factors, extra_metadata: Optional[dict] = None,
                    max_to_keep: int = 2) -> pathlib.Path:
    """Write step `step` of a stand-alone CoMA checkpoint under `directory` (orbax commits it
    atomically); returns the directory. Trainers use `checkpoint_items` in their own steps."""
    host_variables = jax.tree.map(np.asarray, variables)
    with _manager(directory, max_to_keep) as manager:
        manager.save(step, args=ocp.args.Composite(**checkpoint_items(
            host_variables, hierarchy, config, factors, extra_metadata)))
        manager.wait_until_finished()
    return pathlib.Path(directory)


def _config_from_metadata(metadata: dict, directory) -> CoMAConfig:
    try:
        model = dict(metadata["model"])
        model["filters"] = tuple(int(f) for f in model["filters"])
        return CoMAConfig(**model)
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{directory}: checkpoint metadata has no valid 'model' entry "
                              f"({error})") from error


def load_checkpoint(directory, step: Optional[int] = None):
    """(variables, hierarchy, metadata, config) of a CoMA checkpoint; the latest step by default.

    Raises CheckpointError naming the directory when it is missing, empty, of another format,
    or when its arrays do not have the shapes its model config implies.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"CoMA checkpoint directory {directory} does not exist")
    with _manager(directory) as manager:
        steps = manager.all_steps()
        if not steps:
            raise CheckpointError(f"{directory} holds no CoMA checkpoint steps")
        step = max(steps) if step is None else int(step)
        if step not in steps:
            raise CheckpointError(f"{directory} has no step {step}; steps present: {sorted(steps)}")
        try:
            metadata = manager.restore(step, args=ocp.args.Composite(
                metadata=ocp.args.JsonRestore()))["metadata"]
        except Exception as error:  # orbax raises several types for a foreign layout
            raise CheckpointError(f"{directory} step {step}: cannot read the metadata item "
                                  f"({error})") from error
        if not isinstance(metadata, dict) or metadata.get("format") != CHECKPOINT_FORMAT:
            found = metadata.get("format") if isinstance(metadata, dict) else None
            raise CheckpointError(f"{directory} step {step}: checkpoint format {found!r}, "
                                  f"expected {CHECKPOINT_FORMAT!r}")
        config = _config_from_metadata(metadata, directory)
        restored = manager.restore(step, args=ocp.args.Composite(
            variables=ocp.args.StandardRestore(), hierarchy=ocp.args.StandardRestore()))
    try:
        hierarchy = mesh_lib.hierarchy_from_arrays(restored["hierarchy"],
                                                   metadata["hierarchy_key"], str(directory))
    except (KeyError, ValueError) as error:
        raise CheckpointError(f"{directory} step {step}: bad hierarchy item ({error})") from error
    variables = jax.tree.map(jnp.asarray, restored["variables"])
    _check_variables(variables, config, hierarchy, directory)
    return variables, hierarchy, metadata, config


def _check_variables(variables: dict, config: CoMAConfig, hierarchy: MeshHierarchy,
                     directory) -> None:
    model = Encoder(config)
    dummy = jnp.zeros((1, config.num_vertices, 3), jnp.float32)
    expected = jax.eval_shape(lambda: model.init(jax.random.key(0), dummy, hierarchy))
    try:
        found = {"params": variables["params"]["encoder"],
                 "stats": variables["stats"]["encoder"]}
    except (KeyError, TypeError) as error:
        raise CheckpointError(f"{directory}: variables lack the encoder entry {error}") from error
    expected_shapes = jax.tree.map(lambda x: x.shape, expected)
    found_shapes = jax.tree.map(lambda x: x.shape, found)
    if expected_shapes != found_shapes:
        raise CheckpointError(f"{directory}: encoder variables do not match the model config "
                              f"{config}: expected shapes {expected_shapes}, found {found_shapes}")


def load_encoder(checkpoint_dir, step: Optional[int] = None, *,
                 expected_hierarchy: Optional[MeshHierarchy] = None,
                 expected_config: Optional[CoMAConfig] = None) -> FrozenEncoder:
    """The frozen CoMA encoder of a checkpoint, for `encode(frozen, vertices)` in jitted code.

    expected_hierarchy / expected_config: when given, the checkpoint's hierarchy key / model
    config must equal them (CheckpointError otherwise), e.g. to check the FLAME topology.
    Never returns random weights: every failure is a CheckpointError naming the directory.
    """
    variables, hierarchy, _, config = load_checkpoint(checkpoint_dir, step)
    if expected_hierarchy is not None and expected_hierarchy.key != hierarchy.key:
        raise CheckpointError(
            f"{checkpoint_dir}: trained on hierarchy {hierarchy.key[:16]} (sizes "
            f"{hierarchy.sizes}) but hierarchy {expected_hierarchy.key[:16]} (sizes "
            f"{expected_hierarchy.sizes}) was expected")
    if expected_config is not None and expected_config != config:
        raise CheckpointError(f"{checkpoint_dir}: model config {config} differs from the expected "
                              f"{expected_config}")
    encoder_variables = {"params": variables["params"]["encoder"],
                         "stats": variables["stats"]["encoder"]}
    return FrozenEncoder(variables=encoder_variables, hierarchy=hierarchy, config=config)
