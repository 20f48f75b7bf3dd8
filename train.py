"""Training CLI: a config file (`ml_collections.config_flags`) dispatched on `config.task`.

    python train.py --config configs/coma.py:smoke --config.steps=100 --workdir runs/x
    python train.py --config configs/default.py

`--config path.py[:arg]` calls `get_config(arg)` of that file; `--config.key=value` overrides
one (dotted) entry with the type the config declares (the config is locked: an unknown key
fails, naming it); `--helpfull` lists every flag. `--workdir` defaults to
`runs/<config name>[_<arg>]`; running the same command again resumes from the workdir's latest
checkpoint. The work itself is a library `train_and_evaluate(config, workdir)` per task.
"""

import importlib
import json
import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file path.py[:arg] defining get_config(arg).", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (checkpoints, metrics.jsonl, evaluation.json); default "
    "runs/<config name>[_<arg>]. An existing one with checkpoints is resumed.")
flags.mark_flags_as_required(["config"])

# config.task -> the module whose train_and_evaluate(config, workdir) runs it (imported lazily,
# so that one task's dependencies are not needed to run another).
TASKS = {
    "coma": "recon.training.coma",
    "regressor": "recon.training.regressor",
}


def default_workdir(config_spec: str) -> pathlib.Path:
    """runs/<config file stem>[_<arg>] for 'path/to/name.py[:arg]'."""
    path, _, arg = config_spec.partition(":")
    return pathlib.Path("runs") / (pathlib.Path(path).stem + (f"_{arg}" if arg else ""))


def apply_fakes(config, workdir: pathlib.Path) -> None:
    """config.fakes == "paper": write stand-ins for the paper's licensed files into
    <workdir>/fakes/ once (reused when present) and point the config at them
    (`recon.training.fakes`)."""
    if config.fakes != "paper":
        raise app.UsageError(f"unknown config.fakes {config.fakes!r}; known: '' and 'paper'")
    from recon.training import fakes

    fakes.apply_fakes(config, fakes.make_paper_fakes(workdir / "fakes"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; overrides are "
                             f"--config.key=value")
    config = _CONFIG.value
    if config.task not in TASKS:
        raise app.UsageError(f"unknown config.task {config.task!r}; known tasks: "
                             f"{sorted(TASKS)}")
    workdir = pathlib.Path(_WORKDIR.value or
                           default_workdir(flags.FLAGS["config"].config_filename))
    trainer = importlib.import_module(TASKS[config.task])
    # orbax logs every checkpoint step at INFO: show warnings and errors unless the user asks
    # for more with --verbosity (absl resets the level when it parses the flags, so set it here).
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if config.get("fakes", ""):
        apply_fakes(config, workdir)
    result = trainer.train_and_evaluate(config, workdir)
    print(json.dumps(result, indent=2, default=str))


def _config_keys(argv) -> list:
    """Dotted keys of the config named by --config in argv ([] if it cannot be read)."""
    spec = next((arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")), None)
    if spec is None and "--config" in argv[:-1]:
        spec = argv[argv.index("--config") + 1]
    try:
        config = config_flags.config_flags.ConfigFileFlagParser("config").parse(spec)
        keys, stack = [], [("", config.to_dict())]
        while stack:
            prefix, node = stack.pop()
            for name, value in node.items():
                if isinstance(value, dict):
                    stack.append((f"{prefix}{name}.", value))
                else:
                    keys.append(prefix + name)
        return sorted(keys)
    except Exception:  # only used to improve an error message
        return []


def parse_flags(argv):
    """absl flag parsing, with an unknown `--config.key` reported as one line naming the key
    and listing the config's keys (config_flags raises a bare AttributeError/KeyError)."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as error:
        overrides = [arg for arg in argv[1:] if arg.startswith("--config.")]
        key = str(error).strip("\"'")
        sys.exit(f"FATAL: the config declares no key '{key}' (overrides given: {overrides}); "
                 f"its keys: {', '.join(_config_keys(argv))}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
