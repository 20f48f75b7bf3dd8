"""Device mesh and shardings declared once: batch split on a `data` axis, the rest replicated.

    mesh = make_mesh()                                  # every device, one `data` axis
    step = jax.jit(train_step, in_shardings=(replicated(mesh), replicated(mesh),
                   data_sharding(mesh)), out_shardings=..., donate_argnums=(0,))
    batch = shard_batch(host_batch, mesh)               # numpy pytree -> global jax.Arrays

The same code runs on one CPU, 8 GPUs or a multi-host TPU slice (`jit` with shardings is the
current form of both `jit` and `pmap`). With several processes each host passes its own slice
of the global batch (`host_batch_size`), and `shard_batch` assembles the global arrays with
`jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A 1-d `Mesh` over `devices` (default: all devices of all processes) with axis `data`."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh needs at least one device")
    return Mesh(np.asarray(devices, dtype=object).reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (parameters, optimizer state, assets)."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis split over the `data` axis; other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def host_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Examples this process loads per step; ValueError unless the split is exact.

    The global batch must divide by the number of devices of the mesh (each gets an equal
    share) and by the number of processes (each loads its own share).
    """
    if global_batch_size % mesh.size:
        raise ValueError(f"global batch size {global_batch_size} does not divide over the "
                         f"{mesh.size} devices of the mesh")
    processes = jax.process_count()
    if global_batch_size % processes:
        raise ValueError(f"global batch size {global_batch_size} does not divide over "
                         f"{processes} processes")
    return global_batch_size // processes


def _host_copy(leaf: Any) -> Any:
    """A jax.Array leaf as this process's numpy copy (other leaves unchanged)."""
    if not isinstance(leaf, jax.Array):
        return leaf
    if leaf.is_fully_addressable:
        return np.asarray(leaf)
    if leaf.is_fully_replicated:
        return np.asarray(leaf.addressable_data(0))
    raise ValueError(f"cannot replicate a {leaf.sharding} array that is split over processes")


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put every leaf of `tree` (numpy or jax) on all devices of `mesh`.

    With several processes, arrays committed to this process's devices (e.g. restored from a
    checkpoint) would need a cross-host transfer, which CPU backends lack; every process holds
    the same values (same seed, same checkpoint), so each puts its own host copy instead.
    """
    if jax.process_count() > 1:
        tree = jax.tree.map(_host_copy, tree)
    return jax.device_put(tree, replicated(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Host numpy pytree (this process's share, leading axis = batch) -> global jax.Arrays.

    Every leaf must have the same leading size b; the global batch is b * process_count and
    must divide by `mesh.size`. ValueError names the leaf that does not fit.
    """
    sharding = data_sharding(mesh)
    processes = jax.process_count()
    leaves, _ = jax.tree_util.tree_flatten_with_path(batch)
    sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for _, leaf in leaves}
    if len(sizes) > 1 or None in sizes:
        described = {jax.tree_util.keystr(path): np.shape(leaf) for path, leaf in leaves}
        raise ValueError(f"shard_batch needs one common leading (batch) axis, got shapes "
                         f"{described}")

    def put(path, leaf):
        leaf = np.asarray(leaf)
        global_shape = (leaf.shape[0] * processes,) + leaf.shape[1:]
        if global_shape[0] % mesh.size:
            raise ValueError(f"batch leaf {jax.tree_util.keystr(path)}: global batch "
                             f"{global_shape[0]} does not divide over {mesh.size} devices")
        return jax.make_array_from_process_local_data(sharding, leaf, global_shape)

    return jax.tree_util.tree_map_with_path(put, batch)
