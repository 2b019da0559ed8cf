"""Command-line options generated from a job's config dataclass (vlpipe.config).

Each field becomes one flag with the field's help and default; a nested section's fields become
flags too, with the section's prefix where two sections share field names (`--val-features`).
Every command also takes `--config FILE` (TOML / YAML) and `--set KEY=VALUE` (any field, dotted
for sections). Flags only count when given, so the layers stay in order:

    dataclass defaults  <  preset  <  --config FILE  <  --set  <  flags
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Optional

import typer

from vlpipe.config import ConfigError, load_file, merge, parse_assignment

_METAVAR = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag: where its value goes in the config, and how typer reads it."""

    name: str  # python parameter name
    path: tuple[str, ...]  # field path in the config, e.g. ("val", "features")
    option: str  # "--val-features"
    annotation: Any
    help: str
    json: bool = False  # a table field, given as a JSON object on the command line
    aliases: tuple[str, ...] = ()
    argument: bool = False


def flags_of(cls: type, prefixes: Mapping[str, str] | None = None) -> list[Flag]:
    """The flags of a config class; `prefixes` gives a section's flag prefix ("" for none)."""
    prefixes = prefixes or {}
    out: list[Flag] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("section"):
            prefix = prefixes.get(f.name, "")
            out += _section_flags(hints[f.name], (f.name,), prefix)
        elif f.metadata.get("cli", True):
            out.append(_flag(f, hints[f.name], (f.name,), ""))
    return out


def _section_flags(cls: type, path: tuple[str, ...], prefix: str) -> list[Flag]:
    hints = typing.get_type_hints(cls)
    return [
        _flag(f, hints[f.name], (*path, f.name), prefix)
        for f in dataclasses.fields(cls)
        if f.metadata.get("cli", True)
    ]


def _flag(f: dataclasses.Field, hint: Any, path: tuple[str, ...], prefix: str) -> Flag:
    name = f.metadata.get("flag") or f.name.replace("_", "-")
    option = f"--{prefix}{name}"
    base = _strip_optional(hint)
    is_table = base is dict or typing.get_origin(base) is dict
    annotation = Optional[str] if is_table else Optional[base]  # noqa: UP045 - typer reads it
    return Flag(
        name="_".join(path),
        path=path,
        option=option,
        annotation=annotation,
        help=_help(f, is_table),
        json=is_table,
        aliases=tuple(f"--{prefix}{a}" for a in f.metadata.get("aliases", ())),
        argument=f.metadata.get("argument", False),
    )


def _strip_optional(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) and len(args) == 1:
        return args[0]
    return hint


def _help(f: dataclasses.Field, is_table: bool) -> str:
    text = f.metadata.get("help", "")
    choices = f.metadata.get("choices")
    if choices is not None:
        allowed = list(choices() if callable(choices) else choices)
        text += f" ({' | '.join(map(str, allowed))})" if allowed and len(allowed) <= 12 else ""
    default = f.default if f.default is not dataclasses.MISSING else None
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    if is_table:
        text += " (JSON object)"
    if default not in (None, [], {}, ""):
        text += f"; default {_shown(default)}"
    elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
        text += "; required"
    return text


def _shown(value: Any) -> str:
    return json.dumps(value) if isinstance(value, bool) else str(value)


def typer_option(flag: Flag) -> Any:
    base = _strip_optional(flag.annotation)
    if flag.argument:
        return typer.Argument(None, help=flag.help, show_default=False)
    if base is bool:
        name = flag.option.removeprefix("--")
        return typer.Option(None, f"--{name}/--no-{name}", help=flag.help, show_default=False)
    metavar = _METAVAR.get(typing.get_args(base)[0] if typing.get_args(base) else base)
    names = (flag.option, *flag.aliases)
    return typer.Option(None, *names, help=flag.help, metavar=metavar, show_default=False)


@dataclasses.dataclass(frozen=True)
class FlagValues:
    """What typer parsed; `layer()` reads it (inside the command's error handling: a JSON flag
    can be malformed)."""

    flags: list[Flag]
    values: Mapping[str, Any]

    def layer(self) -> dict[str, Any]:
        return given(self.flags, self.values)


def given(flags: list[Flag], values: Mapping[str, Any]) -> dict[str, Any]:
    """The layer of flags the user gave, as a nested dict."""
    layer: dict[str, Any] = {}
    for flag in flags:
        value = values.get(flag.name)
        if value is None or (isinstance(value, (list, tuple)) and not value):
            continue
        if flag.json:
            value = _json_object(value, flag.option)
        node = layer
        for part in flag.path[:-1]:
            node = node.setdefault(part, {})
        node[flag.path[-1]] = list(value) if isinstance(value, (list, tuple)) else value
    return layer


def _json_object(text: str, option: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{option} is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise ConfigError(f"{option} must be a JSON object, e.g. '{{\"hidden\": 256}}'")
    return value


def layers(config: Path | None, sets: list[str] | None) -> tuple[dict, dict]:
    """The --config file and --set layers."""
    file_layer = load_file(config) if config is not None else {}
    set_layer: dict[str, Any] = {}
    for text in sets or []:
        set_layer = merge(set_layer, parse_assignment(text))
    return file_layer, set_layer


def command(
    app: typer.Typer,
    name: str,
    cls: type,
    run: Callable[[dict, dict, dict], None],
    *,
    help: str,
    prefixes: Mapping[str, str] | None = None,
    extra: list[tuple[str, Any, Any]] = (),
) -> None:
    """Register `vlpipe NAME` with one flag per config field, --config and --set; `run` gets
    (--config path, --set list, FlagValues) plus the extra parameters as keyword arguments."""
    flags = flags_of(cls, prefixes)
    params = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=typer_option(f), annotation=f.annotation
        )
        for f in flags
    ]
    params += [
        inspect.Parameter(
            "config",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[Path],  # noqa: UP045
            default=typer.Option(
                None, "--config", help="TOML / YAML config file; flags override it", metavar="FILE"
            ),
        ),
        inspect.Parameter(
            "sets",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=Optional[list[str]],  # noqa: UP045
            default=typer.Option(
                None,
                "--set",
                help="KEY=VALUE for any config field, e.g. optim.lr=1e-4 (repeatable)",
                metavar="KEY=VALUE",
            ),
        ),
    ]
    params += [
        inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
        for pname, ann, default in extra
    ]

    def handler(**kwargs):
        config, sets = kwargs.pop("config"), kwargs.pop("sets")
        extras = {pname: kwargs.pop(pname) for pname, _, _ in extra}
        return run(config, sets, FlagValues(flags, kwargs), **extras)

    handler.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    handler.__annotations__ = {p.name: p.annotation for p in params}
    handler.__name__ = name.replace("-", "_")
    handler.__doc__ = help
    app.command(name, help=help)(handler)


def flag_names(cls: type, prefixes: Mapping[str, str] | None = None) -> dict[tuple[str, ...], str]:
    """{field path: flag} of a config class, for error messages that name the flag."""
    return {flag.path: flag.option for flag in flags_of(cls, prefixes)}
