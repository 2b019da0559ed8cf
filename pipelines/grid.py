"""An ablation grid file: a base train config, the axes it varies over, and the caches it reads.

    [caches.vit-train]          # extraction jobs (`vlpipe extract` fields), run once, reused
    backbone = "vit"            # out defaults to DIR/caches/<name>.h5
    dataset = "easy-vqa"
    split = "train"
    weights = "random"

    [base]                      # a `vlpipe train` config shared by every run
    task = "easy-vqa"
    data.split = "train"
    data.features = ["cache:vit-train"]    # cache:NAME is that cache's path

    [grid]                      # a full product over each field's values
    optim.seed = [0, 1, 2]

    [variants.vit-lstm]         # named variants: their fields vary together (crossed with grid)
    fusion = "lstm"

A run is base < variant < one point of the grid; its name is the variant's and the grid values
that vary (`vit-lstm_seed=1`); its folder is DIR/runs/<name>. TOML or YAML.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlpipe.config import load_file, merge_all
from vlpipe.errors import ConfigError

SECTIONS = ("description", "caches", "base", "grid", "variants")
CACHE_REF = "cache:"
RUNS, CACHES = "runs", "caches"  # the sub-folders of --out
SEED = "optim.seed"  # runs that differ only here are one configuration of the report


@dataclass(frozen=True)
class RunPlan:
    """One run of a grid: its name, its train config layer, and what varies in it."""

    name: str
    layer: dict[str, Any]
    variant: str | None
    point: dict[str, Any]  # "optim.seed" -> 0, the grid values of this run
    configuration: str  # the name without the seed: the runs of one row of the report


@dataclass
class Grid:
    path: Path
    description: str
    caches: dict[str, dict[str, Any]]  # name -> extract layer (with its out)
    runs: list[RunPlan] = field(default_factory=list)


def load_grid(path: Path, out: Path) -> Grid:
    """The grid file's runs and caches, cache references resolved to paths under `out`."""
    data = load_file(path)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {', '.join(unknown)}; known: {SECTIONS}")
    caches = _caches(path, data.get("caches", {}), out)
    paths = {name: layer["out"] for name, layer in caches.items()}
    base = _table(path, data, "base")
    axes = _axes(path, _table(path, data, "grid"))
    variants = _table(path, data, "variants") or {None: {}}
    runs = []
    for variant, fields in variants.items():
        if variant is not None:
            _check_name(path, f"variants.{variant}", variant)
        if not isinstance(fields, dict):
            raise ConfigError(f"{path}: variants.{variant} must be a table of train options")
        for values in itertools.product(*axes.values()):
            point = dict(zip(axes, values, strict=True))
            layer = merge_all(base, fields, *(_nested(k, v) for k, v in point.items()))
            layer = _substitute(path, layer, paths)
            name = _run_name(variant, point, axes)
            unseeded = {k: v for k, v in point.items() if k != SEED}
            runs.append(RunPlan(name, layer, variant, point, _run_name(variant, unseeded, axes)))
    _check_unique(path, runs)
    for run in runs:
        run.layer["out"] = str(out / RUNS / run.name)
    description = str(data.get("description", "")) or _first_comment(path)
    return Grid(path, description, caches, runs)


def _table(path: Path, data: dict, name: str) -> dict:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [{name}] must be a table")
    return value


def _caches(path: Path, tables: Any, out: Path) -> dict[str, dict[str, Any]]:
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: [caches] must hold one table per cache")
    caches = {}
    for name, layer in tables.items():
        _check_name(path, f"caches.{name}", name)
        if not isinstance(layer, dict):
            raise ConfigError(f"{path}: caches.{name} must be a table of extract options")
        caches[name] = {**layer, "out": str(layer.get("out") or out / CACHES / f"{name}.h5")}
    return caches


def _axes(path: Path, grid: dict) -> dict[str, list[Any]]:
    """{"optim.seed": [0, 1, 2]} from the nested [grid] table; every leaf is a list of values."""
    axes: dict[str, list[Any]] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, f"{dotted}.")
            elif isinstance(value, list) and value:
                axes[dotted] = value
            else:
                raise ConfigError(f"{path}: grid.{dotted} must be a non-empty list of values")

    walk(grid, "")
    if SEED in axes:  # seeds vary fastest, and come last in a run's name
        axes[SEED] = axes.pop(SEED)
    return axes


def _nested(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _substitute(path: Path, value: Any, caches: dict[str, str]) -> Any:
    """cache:NAME strings -> the cache's path."""
    if isinstance(value, dict):
        return {k: _substitute(path, v, caches) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(path, v, caches) for v in value]
    if isinstance(value, str) and value.startswith(CACHE_REF):
        name = value.removeprefix(CACHE_REF)
        if name not in caches:
            known = ", ".join(caches) or "none"
            raise ConfigError(f"{path}: {value!r} names no [caches.{name}] (caches: {known})")
        return caches[name]
    return value


_SAFE = re.compile(r"[^A-Za-z0-9._+=-]+")


def _run_name(variant: str | None, point: dict[str, Any], axes: dict[str, list]) -> str:
    """The variant and the grid values that vary, e.g. `vit-lstm_lr=0.0003_seed=1`."""
    short = _short_names(list(axes))
    parts = [variant] if variant else []
    parts += [f"{short[k]}={_shown(v)}" for k, v in point.items() if len(axes[k]) > 1]
    return _SAFE.sub("-", "_".join(parts)) or "run"


def _short_names(dotted: list[str]) -> dict[str, str]:
    """The last part of each dotted name, or the whole name where two share a last part."""
    last = [d.rsplit(".", 1)[-1] for d in dotted]
    return {d: (tail if last.count(tail) == 1 else d) for d, tail in zip(dotted, last, strict=True)}


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "+".join(_shown(v) for v in value)
    if isinstance(value, dict):
        return "+".join(f"{k}-{_shown(v)}" for k, v in value.items())
    return Path(str(value)).stem if "/" in str(value) else str(value)


def _check_name(path: Path, where: str, name: str) -> None:
    if not name or _SAFE.search(name):
        raise ConfigError(f"{path}: {where}: names may use letters, digits and . _ + = - only")


def _check_unique(path: Path, runs: list[RunPlan]) -> None:
    seen: dict[str, RunPlan] = {}
    for run in runs:
        if run.name in seen:
            raise ConfigError(
                f"{path}: two runs would be named {run.name!r} (their values print alike)"
            )
        seen[run.name] = run


def _first_comment(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""
