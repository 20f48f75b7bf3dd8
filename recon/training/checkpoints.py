"""One orbax `CheckpointManager` per run: atomic steps, the last N kept, the config stored.

Every step folder `directory/<step>/` holds the items
  state: the training state pytree (`ocp.args.StandardSave`: jax/numpy arrays, any sharding);
  run:   JSON `{"format", "config"}`: the run's config, checked when the run is resumed;
  data:  optional, the grain data iterator through grain's own orbax handler
         (`PyGrainCheckpointSave`): one `process_<i>-of-<n>.json` per process, so every host
         resumes its own shard;
  extra: JSON, optional: e.g. a trainer's own sampler state and the evaluation;
and any further items a trainer adds (`items=`, e.g. spectral_gcn's encoder export). Orbax
writes a step to a temporary folder and renames it when complete, so a killed run leaves either
the whole step or nothing. Opening a directory whose latest step was written with another
config raises `ConfigMismatchError` naming every differing key (dotted, old -> new).
"""

from __future__ import annotations

import pathlib
from typing import Any, Iterable, Mapping, Optional, Tuple

import jax
import orbax.checkpoint as ocp

from recon.training import guard

RUN_FORMAT = "recon.training.run/1"
STATE, RUN, EXTRA, DATA = "state", "run", "extra", "data"
_all_finite = jax.jit(guard.all_finite)


class ConfigMismatchError(ValueError):
    """The checkpoints in a workdir were written by a run with another config."""


class CheckpointRestoreError(ValueError):
    """A checkpoint step cannot be read (missing item, foreign layout, different structure)."""


def plain_config(config: Any) -> Any:
    """JSON-ready nested dict of a ConfigDict / mapping (tuples become lists)."""
    if hasattr(config, "to_dict") and callable(config.to_dict):
        config = config.to_dict()
    if isinstance(config, Mapping):
        return {str(key): plain_config(value) for key, value in config.items()}
    if isinstance(config, (list, tuple)):
        return [plain_config(value) for value in config]
    return config


def _flatten(tree: Any, prefix: str = "") -> dict:
    if isinstance(tree, Mapping) and tree:
        flat = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: tree}


def config_differences(old: Any, new: Any, *, ignore: Iterable[str] = ()) -> list:
    """Sorted `"key: old -> new"` strings for every dotted key whose value differs.

    Keys present on one side only show `<absent>` on the other. Keys in `ignore` (dotted, or a
    prefix of them ending with '.') are skipped.
    """
    old_flat, new_flat = _flatten(plain_config(old)), _flatten(plain_config(new))
    ignore = tuple(ignore)
    missing = object()
    differences = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if key in ignore or any(key.startswith(p) for p in ignore if p.endswith(".")):
            continue
        before, after = old_flat.get(key, missing), new_flat.get(key, missing)
        if before != after:
            differences.append(f"{key}: {'<absent>' if before is missing else repr(before)} -> "
                               f"{'<absent>' if after is missing else repr(after)}")
    return differences


class RunCheckpointer:
    """The checkpoints of one run: open once, `save` every N steps, `restore` on resume.

    Args:
      directory: the run's checkpoint folder (created if missing), e.g. workdir/checkpoints.
      config: the run's config (ConfigDict or mapping), stored with every step.
      max_to_keep: the number of most recent steps kept (older ones are deleted).
      ignore_keys: config keys allowed to differ on resume (they do not change the result,
        e.g. a cache folder or the logging interval).
      async_save: write steps in a background thread (`wait()` / `close()` finish them).
    Raises ConfigMismatchError when the directory's latest step has another config.
    """

    def __init__(self, directory, *, config: Any, max_to_keep: int = 3,
                 ignore_keys: Iterable[str] = (), async_save: bool = True):
        if max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = pathlib.Path(directory).absolute()
        self.config = plain_config(config)
        self.ignore_keys = tuple(ignore_keys)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        latest = self._manager.latest_step()
        if latest is not None:
            self._check_config(latest)

    # ------------------------------------------------------------------ reading
    def latest_step(self) -> Optional[int]:
        """The newest complete step, or None for an empty directory."""
        return self._manager.latest_step()

    def all_steps(self) -> Tuple[int, ...]:
        return tuple(sorted(self._manager.all_steps()))

    def stored_config(self, step: int) -> dict:
        """The config the run that wrote `step` was started with."""
        run = self._restore_items(step, {RUN: ocp.args.JsonRestore()})[RUN]
        if not isinstance(run, dict) or run.get("format") != RUN_FORMAT:
            found = run.get("format") if isinstance(run, dict) else type(run).__name__
            raise CheckpointRestoreError(f"{self.directory} step {step}: run item of format "
                                         f"{found!r}, expected {RUN_FORMAT!r}")
        return run["config"]

    def _check_config(self, step: int) -> None:
        differences = config_differences(self.stored_config(step), self.config,
                                         ignore=self.ignore_keys)
        if differences:
            raise ConfigMismatchError(
                f"{self.directory} holds checkpoints (latest step {step}) of a run with another "
                f"config; differing keys (checkpoint -> now): {'; '.join(differences)}. Use the "
                f"same config to resume, or another --workdir for a new run")

    def _restore_items(self, step: int, args: Mapping[str, Any]) -> Mapping[str, Any]:
        self._manager.wait_until_finished()
        if step not in self._manager.all_steps():
            raise CheckpointRestoreError(f"{self.directory} has no step {step}; steps present: "
                                         f"{self.all_steps()}")
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as error:  # orbax raises many types for missing/foreign items
            raise CheckpointRestoreError(f"{self.directory} step {step}: cannot restore items "
                                         f"{sorted(args)}: {error}") from error

    def restore(self, step: int, target_state: Any, *, iterator: Any = None
                ) -> Tuple[Any, dict]:
        """(state, extra) of `step`; `target_state` gives the structure, dtypes and shardings.

        iterator: a grain iterator (`get_state`/`set_state`) restored in place from the step's
        `data` item (this process's file). extra is {} when the step was saved without one.
        """
        import grain.python as grain

        items = {STATE: ocp.args.StandardRestore(target_state)}
        item_names = self._item_names(step)
        if EXTRA in item_names:
            items[EXTRA] = ocp.args.JsonRestore()
        if iterator is not None:
            if DATA not in item_names:
                raise CheckpointRestoreError(f"{self.directory} step {step} holds no data "
                                             f"iterator state")
            items[DATA] = grain.PyGrainCheckpointRestore(iterator)
        restored = self._restore_items(step, items)
        return restored[STATE], dict(restored.get(EXTRA) or {})

    def restore_extra(self, step: int) -> dict:
        """The JSON `extra` of `step` alone ({} if it has none), without the state."""
        if EXTRA not in self._item_names(step):
            return {}
        return dict(self._restore_items(step, {EXTRA: ocp.args.JsonRestore()})[EXTRA] or {})

    def _item_names(self, step: int) -> set:
        # An asynchronous save may still be committing (renaming its temporary folder): read a
        # step only once every save started so far has finished.
        self._manager.wait_until_finished()
        if step not in self._manager.all_steps():
            raise CheckpointRestoreError(f"{self.directory} has no step {step}; steps present: "
                                         f"{self.all_steps()}")
        step_dir = self.directory / str(step)
        return {path.name for path in step_dir.iterdir() if path.is_dir()}

    # ------------------------------------------------------------------ writing
    def save(self, step: int, state: Any, *, extra: Optional[Mapping[str, Any]] = None,
             iterator: Any = None, items: Optional[Mapping[str, Any]] = None) -> None:
        """Write `state` (and the JSON `extra`, the grain `iterator`'s state, and further orbax
        `items`) as step `step`.

        Refuses (FloatingPointError) a state whose guard recorded a non-finite step or whose
        float leaves are not all finite, so no checkpoint ever holds a diverged state.
        """
        if hasattr(state, "first_nonfinite_step"):
            guard.raise_if_nonfinite(state)
        if not bool(jax.device_get(_all_finite(state))):
            raise FloatingPointError(f"refusing to checkpoint step {step}: the state holds "
                                     f"non-finite values")
        args = {STATE: ocp.args.StandardSave(state),
                RUN: ocp.args.JsonSave({"format": RUN_FORMAT, "config": self.config})}
        if extra is not None:
            args[EXTRA] = ocp.args.JsonSave(plain_config(dict(extra)))
        if iterator is not None:
            import grain.python as grain

            args[DATA] = grain.PyGrainCheckpointSave(iterator)
        for name, value in (items or {}).items():
            if name in args:
                raise ValueError(f"checkpoint item name {name!r} is reserved")
            args[name] = value
        self._manager.save(int(step), args=ocp.args.Composite(**args), force=True)

    def wait(self) -> None:
        """Block until every save started so far is committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "RunCheckpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
