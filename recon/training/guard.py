"""Non-finite guard: every step checked on the device, the first bad step named on the host.

Inside the jitted step, `guarded_update(old_state, new_state, loss, step)` keeps the old state
(parameters, optimizer state, everything but `step`) when the loss (or an optional extra tree,
e.g. the gradients) is not finite, and records the first such step in
`state.first_nonfinite_step` (int32, -1 = none). No host synchronisation happens per step: the
host calls `raise_if_nonfinite(state)` when it reads metrics anyway and before every checkpoint,
and it raises `FloatingPointError` naming the first bad step. A rejected update never reaches a
checkpoint, so the last checkpoint of a failed run is a good state to inspect or resume from.

The state is any pytree with `.replace` (a `flax.struct.dataclass`) holding the fields `step`
and `first_nonfinite_step` (start it at `no_nonfinite_step()`).
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

NO_NONFINITE_STEP = -1


def no_nonfinite_step() -> jax.Array:
    """() int32 -1: the initial value of `first_nonfinite_step`."""
    return jnp.asarray(NO_NONFINITE_STEP, jnp.int32)


def all_finite(tree: Any) -> jax.Array:
    """() bool: every inexact (float/complex) leaf of `tree` is finite; True for no such leaf."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    if not checks:
        return jnp.asarray(True)
    return jnp.stack(checks).all()


def _select(ok: jax.Array, new: Any, old: Any) -> Any:
    if jax.dtypes.issubdtype(jnp.result_type(new), jax.dtypes.prng_key):
        data = jnp.where(ok, jax.random.key_data(new), jax.random.key_data(old))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(new))
    return jnp.where(ok, new, old)


def guarded_update(old_state: Any, new_state: Any, loss: jax.Array, step: jax.Array, *,
                   also_check: Optional[Any] = None) -> Any:
    """`new_state` if `loss` (and every float leaf of `also_check`) is finite, else `old_state`.

    Args:
      old_state, new_state: states of the same structure before and after the update.
      loss: () the step's loss.
      step: () int, the number that names this update in errors (e.g. `old_state.step + 1`).
      also_check: optional pytree that must be finite as well (e.g. the gradients).
    Returns the selected state with `step` from `new_state` (a rejected step still counts, so
    the data order and the RNG stay aligned with the step number) and `first_nonfinite_step`
    set to `step` if this is the first rejected update. jit/vmap-safe; no host callbacks.
    """
    ok = jnp.all(jnp.isfinite(loss))
    if also_check is not None:
        ok = ok & all_finite(also_check)
    selected = jax.tree.map(lambda new, old: _select(ok, new, old), new_state, old_state)
    previous = jnp.asarray(old_state.first_nonfinite_step, jnp.int32)
    first = jnp.where((previous < 0) & ~ok, jnp.asarray(step, jnp.int32), previous)
    return selected.replace(step=new_state.step, first_nonfinite_step=first)


def first_nonfinite_step(state: Any) -> Optional[int]:
    """The first rejected step of `state` (host int), or None when every step was finite."""
    value = int(np.asarray(jax.device_get(state.first_nonfinite_step)))
    return None if value < 0 else value


def raise_if_nonfinite(state: Any, *, what: str = "loss") -> None:
    """Raise FloatingPointError naming the first step whose `what` was not finite, if any."""
    step = first_nonfinite_step(state)
    if step is not None:
        raise FloatingPointError(
            f"non-finite {what} at step {step}: that update was not applied (parameters and "
            f"optimizer state were kept), and no checkpoint after it was written")
