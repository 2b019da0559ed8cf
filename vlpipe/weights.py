"""Load model weights from the local files users have, and refuse silent mismatches.

Formats: safetensors (preferred), torch .pth/.pt/.bin (read with ``weights_only=True``, so no
code runs), a folder holding one of those (Hugging Face / timm layout). Pickles (.pkl) are never
read here; only the explicit converters that a user names a .pkl file for do that.

Every loader maps a file's keys to its model's names in its own way, then hands the mapped
tensors to `load_into`, which checks names and shapes, copies them, and says what it did in a
`LoadReport`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlpipe.errors import WeightsError
from vlpipe.io import refuse_pickle

WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
    "model.pth",
    "checkpoint.pth",
)
_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema", "module")


def resolve_weights_file(path: str | Path) -> Path:
    """A weights file, or the weights file inside a model folder."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: weights file or folder does not exist")
    if path.is_file():
        return path
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    raise WeightsError(f"{path}: folder holds none of {list(WEIGHT_FILES)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors / torch checkpoint, unwrapped from trainer dicts."""
    file = resolve_weights_file(path)
    refuse_pickle(file)
    if file.suffix != ".safetensors":
        return state_dict_of(load_torch(file), file)
    from safetensors.torch import load_file

    with _read_errors(file):
        return state_dict_of(load_file(str(file)), file)


def load_torch(file: str | Path) -> object:
    """`torch.load` that runs no code (`weights_only`: tensors, containers, numbers), on the
    CPU; a file it cannot read is an error naming it. A file that pickles objects (a whole
    `torch.save(model)`) is refused: loading it would mean unpickling, which runs code."""
    import pickle

    with _read_errors(file):
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.findall(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
            what = f" ({', '.join(found)})" if found else ""
            raise WeightsError(
                f"{file}: pickles objects besides tensors{what}, e.g. a whole torch.save(model); "
                "vlpipe reads state dicts only, never unpickling code: where you trust the file, "
                "re-save it as torch.save(model.state_dict(), PATH)"
            ) from err


@contextlib.contextmanager
def _read_errors(file: str | Path):
    try:
        yield
    except WeightsError:
        raise
    except Exception as err:  # noqa: BLE001 - report any reader failure with the file name
        raise WeightsError(f"{file}: cannot read weights ({type(err).__name__}: {err})") from err


def state_dict_of(state: object, file: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint object: unwrapped from trainer dicts ({"model": ...},
    {"state_dict": ...}), DataParallel's `module.` removed, NumPy arrays as tensors."""
    while isinstance(state, Mapping) and not _is_tensor_dict(state):
        inner = next(
            (state[k] for k in _WRAPPERS if k in state and isinstance(state[k], Mapping)), None
        )
        if inner is None:
            raise WeightsError(f"{file}: no state dict found (top-level keys {list(state)[:10]})")
        state = inner
    if not isinstance(state, Mapping):
        raise WeightsError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return {
        k.removeprefix("module."): torch.from_numpy(np.array(v)) if isinstance(v, np.ndarray) else v
        for k, v in state.items()
        if isinstance(v, torch.Tensor | np.ndarray)
    }


def _is_tensor_dict(d: Mapping) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor | np.ndarray) for v in d.values())


class WeightsMismatchError(WeightsError, ValueError):
    """Weights whose names or shapes do not fit the model; names the file and the keys."""


@dataclass
class LoadReport:
    """What a weight loader did. `loaded` / `missing` use the model's names; `unexpected` /
    `ignored` / `skipped` the file's (the model's behind the loader's `prefix`)."""

    source: str
    layout: str = ""  # which of a loader's checkpoint layouts the file has
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # misshapen tensors of a partial load
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        layout = f" ({self.layout} layout)" if self.layout else ""
        lines = [f"{self.source}{layout}: loaded {len(self.loaded)} tensors"]
        groups = (
            ("missing (model keeps its initial values)", self.missing),
            ("unexpected (in the file, not in the model; not loaded)", self.unexpected),
            ("ignored (heads / layers the model does not use)", self.ignored),
            ("skipped (shape differs; partial load)", self.skipped),
        )
        for what, keys in groups:
            if keys:
                lines.append(f"  {_describe(what, keys)}")
        return "\n".join(lines + [f"  {note}" for note in self.notes])


def load_into(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    source: str | Path,
    *,
    layout: str = "",
    strict: bool = True,
    partial: bool = False,
    ignore: Callable[[str], bool] | None = None,
    prefix: str = "",
    unexpected: Iterable[str] = (),
    ignored: Iterable[str] = (),
) -> LoadReport:
    """Copy `state` (the model's names, mapped by the caller's loader) into `model` after
    checking every name and shape; returns what was done.

    A misshapen tensor is an error naming `source` and the keys, unless `partial` (then it is
    skipped and reported). With `strict`, so are missing and unexpected tensors; without, they
    are only reported. `ignore` sets keys aside on both sides (heads the model does not use);
    `prefix` is what the file's names have before the model's; `unexpected` / `ignored`: file
    keys the caller's mapping already set aside."""
    ignore = ignore or (lambda _key: False)
    own = {k: v for k, v in model.state_dict().items() if not ignore(k)}
    report = LoadReport(str(source), layout, unexpected=list(unexpected), ignored=list(ignored))
    report.ignored += [prefix + k for k in state if ignore(k)]
    report.unexpected += sorted(prefix + k for k in state if not ignore(k) and k not in own)
    known = {k: v for k, v in state.items() if k in own and not ignore(k)}
    misshapen = sorted(k for k, v in known.items() if v.shape != own[k].shape)
    report.skipped = [prefix + k for k in misshapen]
    known = {k: v for k, v in known.items() if k not in misshapen}
    report.loaded = sorted(known)
    report.missing = sorted(k for k in own if k not in known)
    problems = [] if partial else _shape_problems(misshapen, state, own, prefix)
    if strict:  # a misshapen tensor that is not skipped is named once, as misshapen
        missing = report.missing if partial else [k for k in report.missing if k not in misshapen]
        problems = [
            *_group("missing", missing),
            *_group("unexpected", report.unexpected),
        ] + problems
    if problems:
        raise WeightsMismatchError(
            f"{source}: weights do not fit {type(model).__name__}"
            f"{f' ({layout} layout)' if layout else ''}: " + "; ".join(problems)
        )
    model.load_state_dict(known, strict=False)
    return report


def _shape_problems(keys: list[str], state: Mapping, own: Mapping, prefix: str) -> list[str]:
    shapes = [
        f"{prefix}{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in keys
    ]
    return _group("misshapen", shapes)


def _group(what: str, keys: list[str]) -> list[str]:
    return [_describe(what, keys)] if keys else []


def _describe(what: str, keys: list[str], limit: int = 10) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} {what}: {', '.join(keys[:limit])}{more}"
