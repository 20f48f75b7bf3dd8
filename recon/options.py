"""ConfigDict -> frozen dataclasses, once, at the top of a trainer (and of `recon.inference`, which reads
the config stored with a checkpoint).

Library functions receive small frozen dataclasses, never the whole `ml_collections.ConfigDict`
(no function can then read a key that no config declares). `to_dataclass` walks the dataclass
fields: a field whose type is a dataclass is built from the nested ConfigDict, tuples accept
lists, a float field accepts an int, and every key of the ConfigDict must be a field: an
unknown key is a `ValueError` naming its dotted path (a typo in a config file or an override
fails instead of being ignored).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import types
import typing
from typing import Any, Mapping, Type, TypeVar

T = TypeVar("T")


def load_config_file(path: os.PathLike, arg: str = ""):
    """The `get_config(arg)` of a config file, as `train.py --config path:arg` reads it (configs
    that build on a sibling file, tests, scripts and benchmarks load them this way)."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"config_file_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ValueError(f"{path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _as_mapping(config: Any, where: str) -> Mapping[str, Any]:
    if hasattr(config, "to_dict") and callable(config.to_dict):  # ml_collections.ConfigDict
        return config.to_dict()
    if isinstance(config, Mapping):
        return config
    raise TypeError(f"{where or 'config'}: expected a ConfigDict or a mapping, got "
                    f"{type(config).__name__}")


def _convert(value: Any, annotation: Any, where: str) -> Any:
    origin = typing.get_origin(annotation)
    if annotation is Any:
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(value, annotation, where)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except (TypeError, ValueError) as error:
                errors.append(str(error))
        raise TypeError(f"{where}: {value!r} matches none of {annotation}: {'; '.join(errors)}")
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            raise ValueError(f"{where}: {value!r} is not one of {typing.get_args(annotation)}")
        return value
    if origin is tuple or annotation is tuple:
        if not isinstance(value, (tuple, list)):
            raise TypeError(f"{where}: expected a tuple, got {type(value).__name__} {value!r}")
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if args:
            if len(args) != len(value):
                raise ValueError(f"{where}: expected {len(args)} entries, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in
                         enumerate(zip(args, value)))
        return tuple(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where}: expected a float, got {type(value).__name__} {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an int, got {type(value).__name__} {value!r}")
        return int(value)
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise TypeError(f"{where}: expected {annotation.__name__}, got "
                            f"{type(value).__name__} {value!r}")
        return value
    return value  # other annotations (e.g. callables, numpy types) are passed through


def _build(config: Any, cls: type, where: str):
    values = _as_mapping(config, where)
    hints = typing.get_type_hints(cls)
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        dotted = [f"{where}.{name}" if where else name for name in unknown]
        raise ValueError(f"config keys {dotted} are not fields of {cls.__name__} "
                         f"(known: {sorted(fields)})")
    kwargs = {}
    for name, field in fields.items():
        path = f"{where}.{name}" if where else name
        if name in values:
            kwargs[name] = _convert(values[name], hints.get(name, Any), path)
        elif (field.default is dataclasses.MISSING
              and field.default_factory is dataclasses.MISSING):
            raise ValueError(f"config key {path!r} is required by {cls.__name__} but missing")
    return cls(**kwargs)


def to_dataclass(config: Any, cls: Type[T], *, prefix: str = "") -> T:
    """Build the (frozen) dataclass `cls` from a ConfigDict or mapping.

    Args:
      config: `ml_collections.ConfigDict` (or FrozenConfigDict, or a plain mapping).
      cls: dataclass type; fields that are dataclasses are built from nested entries.
      prefix: dotted path of `config` inside a larger config, used in error messages only.
    Raises ValueError naming every unknown key (dotted) or a missing required key, TypeError
    naming a value of the wrong type. Fields absent from `config` keep their defaults.
    """
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"to_dataclass needs a dataclass type, got {cls!r}")
    return _build(config, cls, prefix)


def to_dict(instance: Any) -> dict:
    """JSON-ready dict of a dataclass (tuples become lists), e.g. for checkpoint metadata."""
    def plain(value):
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(instance))
