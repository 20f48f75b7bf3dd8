"""Training CLI: loads a Python config file and dispatches on `config.task`.

    python train.py --config configs/coma.py[:smoke] [--workdir runs/coma] [--set steps=100]

The config file defines `get_config(arg)`; the text after ':' is passed as `arg`. Each
`--set key=value` overrides one (dotted) config entry; the value is parsed as a Python literal
when it is one, else kept as a string. `--workdir` defaults to runs/<config name>[_<arg>].
"""

import argparse
import ast
import importlib.util
import pathlib
import sys


def load_config(spec: str):
    """ConfigDict from 'path/to/config.py[:arg]'."""
    path, _, arg = spec.partition(":")
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"config file {path} defines no get_config(arg)")
    return module.get_config(arg)


def apply_override(config, assignment: str) -> None:
    """Set one dotted entry from 'key.sub=value'; KeyError names an unknown key."""
    key, sep, text = assignment.partition("=")
    if not sep:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    if leaf not in node:
        raise KeyError(f"config has no entry {key!r}")
    node[leaf] = value


def default_workdir(spec: str) -> pathlib.Path:
    path, _, arg = spec.partition(":")
    name = pathlib.Path(path).stem + (f"_{arg}" if arg else "")
    return pathlib.Path("runs") / name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg]")
    parser.add_argument("--workdir", type=pathlib.Path, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config entry (repeatable)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    for assignment in args.set:
        apply_override(config, assignment)
    workdir = args.workdir or default_workdir(args.config)

    if config.task == "coma":
        from spectral_gcn.train import train_and_evaluate
    else:
        raise ValueError(f"unknown config.task {config.task!r}; known tasks: 'coma'")
    result = train_and_evaluate(config, workdir)
    print(result)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
