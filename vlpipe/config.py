"""Job configuration: one dataclass per job holds every option's default, help and allowed
values; TOML / YAML files and command-line flags are layers over it.

    defaults (the dataclass)  <  preset file  <  --config FILE  <  flags given on the command line

A field is declared with `opt(default, help, ...)`; nested dataclasses are sections (`[optim]`
in TOML, `optim.lr` on `--set`). `resolve(cls, *layers)` merges the layers, rejects unknown
keys, converts and checks every value where it is declared, and returns the config; `to_toml`
writes the resolved config back, so a run or a cache can be reproduced from the file it saved.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Union

from vlpipe.errors import ConfigError

MISSING = dataclasses.MISSING
DEVICE_HELP = "auto (CUDA when present) | cpu | cuda | cuda:N"  # every job's --device


def opt(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    choices: Callable[[], typing.Iterable[str]] | typing.Iterable[str] | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    cli: bool = True,
    save: bool = True,
    aliases: tuple[str, ...] = (),
    argument: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A config field: its default (none: required), its help, and the checks its values must
    pass.

    flag: the command-line name (default: the field name with dashes); cli=False keeps a field
    out of the command line (config files only); save=False keeps an action (--resume,
    --overwrite) out of the saved config; aliases are other flag names (kept for old
    spellings); argument=True makes it positional. choices may be a callable, evaluated when checked
    (registries that import lazily)."""
    metadata = {
        "help": help,
        "flag": flag,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "cli": cli,
        "save": save,
        "aliases": aliases,
        "argument": argument,
    }
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def section(cls: type) -> Any:
    """A nested config section (a dataclass field holding another config dataclass)."""
    return dataclasses.field(default_factory=cls, metadata={"help": "", "section": True})


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def load_file(path: str | Path) -> dict[str, Any]:
    """A TOML (.toml) or YAML (.yaml / .yml) config file as a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist" + _is_dir(path))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        data = _parse_toml(text, path)
    elif path.suffix in (".yaml", ".yml"):
        data = _parse_yaml(text, path)
    else:
        raise ConfigError(f"config file {path}: expected a .toml, .yaml or .yml file")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a table of options at the top level")
    return data


def _is_dir(path: Path) -> str:
    return " (it is a folder)" if path.is_dir() else ""


def _parse_toml(text: str, path: Path) -> Any:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path}: {err}") from err


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path}: {err}") from err


def to_toml(config: Any) -> str:
    """The config as TOML, without its actions (save=False fields); None values are left out
    (they mean "the default")."""
    plain = to_dict(config, saved_only=True)
    lines: list[str] = []
    _emit_table(plain, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _emit_table(table: dict, prefix: list[str], lines: list[str]) -> None:
    scalars = {k: v for k, v in table.items() if not isinstance(v, dict) and v is not None}
    tables = {k: v for k, v in table.items() if isinstance(v, dict)}
    if prefix and (scalars or not tables):
        lines.append(f"\n[{'.'.join(_toml_key(k) for k in prefix)}]")
    for key, value in scalars.items():
        lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, value in tables.items():
        _emit_table(value, [*prefix, key], lines)


def _toml_key(key: str) -> str:
    bare = key.replace("_", "").replace("-", "").isalnum()
    return key if bare else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return "nan" if math.isnan(value) else repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


# --------------------------------------------------------------------------------------------
# Layers -> config
# --------------------------------------------------------------------------------------------
def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` over `base`, section by section."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def merge_all(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """The layers merged in order, later ones winning."""
    data: dict[str, Any] = {}
    for layer in layers:
        data = merge(data, layer)
    return data


def resolve(
    cls: type,
    *layers: Mapping[str, Any],
    where: str = "",
    names: Mapping[tuple[str, ...], str] | None = None,
) -> Any:
    """The config `cls` from the layers (later ones win), every value converted and checked.

    Errors name the option as `names` spells its field path (the command line passes its
    flags, e.g. {("optim", "lr"): "--lr"}), else by its dotted path after `where`."""
    return _build(cls, merge_all(*layers), (), where, names or {})


def _label(path: tuple[str, ...], where: str, names: Mapping[tuple[str, ...], str]) -> str:
    if path in names:
        return names[path]
    dotted = ".".join(path)
    return f"{where}: {dotted}" if where else dotted


def _build(cls: type, data: Mapping[str, Any], path: tuple[str, ...], where: str, names) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        at = ".".join(path) or where or "config"
        raise ConfigError(f"{at}: unknown option(s) {', '.join(unknown)}; known: {known}")
    values = {}
    for name, f in fields.items():
        label = _label((*path, name), where, names)
        if name not in data:
            if f.default is MISSING and f.default_factory is MISSING:  # type: ignore[misc]
                raise ConfigError(f"{label} is required")
            continue
        if f.metadata.get("section"):
            if not isinstance(data[name], Mapping):
                raise ConfigError(f"{label}: expected a section (a table of options)")
            values[name] = _build(hints[name], data[name], (*path, name), where, names)
        else:
            values[name] = check(f, hints[name], data[name], label)
    return cls(**values)


def check(f: dataclasses.Field, hint: Any, value: Any, label: str) -> Any:
    """`value` converted to the field's type and checked against its declared bounds."""
    value = convert(hint, value, label)
    meta = f.metadata
    for item in value if isinstance(value, list) else [value]:
        _check_bounds(item, meta, label)
    return value


def _check_bounds(value: Any, meta: Mapping[str, Any], label: str) -> None:
    if value is None:
        return
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{label} must be a number, got nan")
    low, high = meta.get("minimum"), meta.get("maximum")
    if low is not None and value < low:
        raise ConfigError(f"{label} must be >= {low:g}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{label} must be <= {high:g}, got {value!r}")
    choices = meta.get("choices")
    if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        if value not in allowed:
            raise ConfigError(
                f"{label} must be one of {', '.join(map(str, allowed))}; got {value!r}"
            )


def convert(hint: Any, value: Any, label: str) -> Any:
    """`value` (from a file, a flag or code) as the annotated type, or a ConfigError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return convert(option, value, label)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{label}: {value!r} does not fit {hint}"
        )
    if origin in (list, tuple):
        items = [value] if isinstance(value, (str, Path)) else value
        if not isinstance(items, (list, tuple)):
            raise ConfigError(f"{label} should be a list, got {value!r}")
        return [convert(args[0] if args else Any, v, label) for v in items]
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{label} should be a table of values, got {value!r}")
        return dict(value)
    return _scalar(hint, value, label)


def _scalar(hint: Any, value: Any, label: str) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{label} should be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, str, float)):
            raise ConfigError(f"{label} should be an integer, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(number, float) and not number.is_integer():
                raise ValueError
            return int(number)
        except (ValueError, OverflowError):
            raise ConfigError(f"{label} should be an integer, got {value!r}") from None
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{label} should be a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{label} should be a number, got {value!r}") from None
    if hint in (str, Path):
        if isinstance(value, bool) or not isinstance(value, (str, Path, int, float)):
            raise ConfigError(f"{label} should be a {'path' if hint is Path else 'string'}")
        return hint(value)  # a number from TOML / YAML / --set (vqa_eval = 2016) is its text
    return value


def to_dict(config: Any, saved_only: bool = False) -> dict[str, Any]:
    """A config (nested dataclasses) as plain TOML / JSON values; paths as strings. With
    `saved_only`, actions (save=False fields) are left out."""

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value):
            return {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if not (saved_only and f.metadata.get("save") is False)
            }
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value

    return plain(config)


def parse_assignment(text: str) -> dict[str, Any]:
    """`--set a.b=value` as {"a": {"b": value}}; the value is read as TOML (numbers, true,
    "strings", [lists]) and, failing that, taken as a plain string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. optim.lr=1e-4")
    key, raw = text.split("=", 1)
    try:
        value = _parse_toml(f"v = {raw}", Path("--set"))["v"]
    except ConfigError:
        value = raw
    out: dict[str, Any] = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out
