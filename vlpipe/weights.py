"""Load model weights from the local files users have, and refuse silent mismatches.

Formats: safetensors (preferred), torch .pth/.pt/.bin (read with ``weights_only=True``, so no
code runs), a folder holding one of those (Hugging Face / timm layout). Pickles (.pkl) are never
read here; only the explicit converters that a user names a .pkl file for do that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from vlpipe.errors import WeightsError

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
    if file.suffix == ".pkl":
        raise WeightsError(
            f"{file}: pickles run code when loaded; use the converter that takes "
            "this file explicitly (e.g. `--weights-format pkl`)"
        )
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(file))
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - report any reader failure with the file name
        raise WeightsError(f"{file}: cannot read weights ({type(err).__name__}: {err})") from err
    return _unwrap(state, file)


def _unwrap(state: object, file: Path) -> dict[str, torch.Tensor]:
    while isinstance(state, dict) and not _is_tensor_dict(state):
        inner = next(
            (state[k] for k in _WRAPPERS if k in state and isinstance(state[k], dict)), None
        )
        if inner is None:
            raise WeightsError(f"{file}: no state dict found (top-level keys {list(state)[:10]})")
        state = inner
    if not isinstance(state, dict):
        raise WeightsError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _is_tensor_dict(d: dict) -> bool:
    return bool(d) and all(isinstance(v, torch.Tensor) for v in d.values())


def load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    source: str | Path,
    *,
    ignore: Callable[[str], bool] = lambda k: False,
) -> None:
    """Strictly load `state` into `model`: any missing, unexpected or misshapen key is an error
    that names the file and the keys (up to 10 of each). `ignore` drops keys on both sides."""
    own = {k: v for k, v in model.state_dict().items() if not ignore(k)}
    state = {k: v for k, v in state.items() if not ignore(k)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    problems = _describe("missing", missing) + _describe("unexpected", unexpected)
    problems += _describe("shape mismatch", shapes)
    if problems:
        raise WeightsError(
            f"{source}: weights do not fit {type(model).__name__}: " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=False)


def _describe(what: str, keys: Iterable[str]) -> list[str]:
    keys = list(keys)
    if not keys:
        return []
    more = f" (+{len(keys) - 10} more)" if len(keys) > 10 else ""
    return [f"{len(keys)} {what}: {', '.join(keys[:10])}{more}"]
