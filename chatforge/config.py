"""Dataclass configs filled from defaults, a YAML/JSON file and command-line flags, in that order.

Each stage's config is a dataclass whose fields are plain values or nested dataclasses. A file
uses the same nesting (`train: {lr: 0.001}`); flags use the leaf name (`--lr 0.001`). Values are
checked against the field types, so a typo or a wrong type is an error that names the field.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from chatforge.errors import ConfigError

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: tuple[str, ...]  # ("train", "lr")
    type: Any  # the field's resolved type (int, float, str, bool)
    default: Any
    help: str
    flag: str = ""  # the command-line flag's name where it is not the field's ("db" for db_url)
    envvar: str | None = None  # an environment variable that fills an omitted flag
    choices: tuple[str, ...] = ()  # the only values a string field takes

    @property
    def name(self) -> str:
        return self.path[-1]


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flag: str = "", envvar: str | None = None,
            choices: tuple[str, ...] = (), default_factory: Any = dataclasses.MISSING, secret: bool = False) -> Any:
    """A config field with what its command-line flag shows: help text, and where needed another flag
    name, an environment variable or the allowed values. A `secret` (an API key, a watermark key) is left
    out of the config's repr, so printing or logging the config never shows it."""
    metadata = {"help": help, "flag": flag, "envvar": envvar, "choices": tuple(choices)}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata, repr=not secret)


def field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[Leaf]:
    """Every non-dataclass field of a (nested) dataclass, with its default; a field with metadata
    `config: False` is set in code only (no flag, no file key)."""
    out, hints = [], field_types(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("config", True) is False:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaves(tp, prefix + (f.name,))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            meta = f.metadata
            out.append(Leaf(prefix + (f.name,), tp, default, meta.get("help", ""), meta.get("flag", ""),
                            meta.get("envvar"), meta.get("choices", ())))
    return out


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently convert: int -> float, "1e-3" -> float, int -> str) a value for a field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {tp}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        return {coerce(k, key_type, f"{where} key"): coerce(v, value_type, f"{where}[{k}]") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            converted = tp(value) if not (tp is int and isinstance(value, float)) else None
        except (TypeError, ValueError):
            converted = None
        if converted is None or (tp is int and isinstance(value, str) and not value.strip().lstrip("-").isdigit()):
            raise ConfigError(f"{where}: expected {'an integer' if tp is int else 'a number'}, got {value!r}")
        return converted
    if tp is str:
        # an integer is gently a string too: a YAML file's `watermark_key: 15485863` is that key's text
        if isinstance(value, (str, Path)) or (isinstance(value, int) and not isinstance(value, bool)):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build a (nested) dataclass from a dict, naming any unknown or mistyped field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of fields, got {type(data).__name__}")
    hints = field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(names)}")
    kwargs, choices = {}, {f.name: f.metadata.get("choices", ()) for f in dataclasses.fields(cls)}
    for name, value in data.items():
        tp = hints[name]
        sub = f"{where}.{name}"
        kwargs[name] = from_dict(tp, value, sub) if dataclasses.is_dataclass(tp) else coerce(value, tp, sub)
        if choices[name] and kwargs[name] not in choices[name]:
            raise ConfigError(f"{sub}: expected one of {list(choices[name])}, got {value!r}")
    return cls(**kwargs)


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_file(path: str | Path) -> dict:
    """A YAML or JSON config file as a dict."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields at the top level")
    return data


def build(cls: type[T], file: str | Path | None = None, flags: dict[tuple[str, ...], Any] | None = None) -> T:
    """Defaults, then the file, then flags given on the command line (keyed by leaf path)."""
    data = to_dict(cls())
    where = str(file) if file else "config"
    if file:
        data = merge(data, load_file(file))
    for path, value in (flags or {}).items():
        node = data
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return from_dict(cls, data, where)


def save(obj: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(obj), sort_keys=False))
