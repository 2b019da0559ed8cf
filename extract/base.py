"""What every frozen encoder offers the extraction loop.

An extractor owns a frozen model in eval mode, a picklable per-item transform (run in DataLoader
workers), the shapes of the cache fields it writes, and its provenance. `encode` maps a `Batch`
(what the loop knows about each item) to every cache field of those items, named as in
`vlpipe.cache.FIELDS`: the loop writes what it returns.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlpipe import provenance as prov
from vlpipe.errors import ConfigError
from vlpipe.weights import WeightsError

INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


@dataclass(frozen=True)
class ImageTransform:
    """Resize to a fixed (height, width) and return uint8 CHW; normalisation happens on the
    device so workers ship 4x fewer bytes."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    def __call__(self, img: Image.Image) -> torch.Tensor:
        height, width = self.size
        img = img.resize((width, height), INTERPOLATIONS[self.interpolation])
        return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 B,3,H,W on any device -> float B,3,H,W."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1) * 255
        return (pixels.float() - mean) / std

    def record(self) -> dict[str, Any]:
        return dict(asdict(self), resize="squash to size (no crop)", pixel_order="RGB")


@dataclass
class Batch:
    """The items of one batch as the loop has them. Images: the transform's output of each
    (3, H, W, on the model's device) and its original (height, width); texts: the strings."""

    pixels: list[torch.Tensor] = field(default_factory=list)
    hw: list[tuple[int, int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    keys: list[str] = field(default_factory=list)  # the items' cache keys

    def stacked(self) -> torch.Tensor:
        """The pixels as one B,3,H,W tensor (images the transform brought to one size)."""
        return torch.stack(self.pixels)

    def image_hw(self) -> torch.Tensor:
        """The `image_hw` field: B,2 int32 original height, width."""
        return torch.tensor(self.hw, dtype=torch.int32).reshape(-1, 2)


class Extractor(nn.Module):
    """Base of the frozen encoders. Subclasses set backbone/kind/modality and implement
    `shapes` and `encode`."""

    backbone: str = ""
    kind: str = ""
    modality: str = "image"  # or "text"

    def __init__(self, model: nn.Module, weights: str | None, model_record: dict[str, Any]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.weights_path = weights
        self.model_record = model_record

    def shapes(self) -> dict[str, tuple[int, ...]]:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, batch: Batch) -> dict[str, torch.Tensor | np.ndarray]:
        """Every field of `shapes()` for the B items of `batch`, B rows each."""
        raise NotImplementedError

    def preprocessing(self) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, records: list) -> None:
        """Read what encoding the records needs besides their pixels (given boxes), and check
        it before any work; nothing by default."""

    def facts(self) -> dict[str, Any]:
        """What a later stage needs to know about the fields, declared in the cache schema
        (vlpipe.cache_format.FACTS): the patch grid, the tokenizer vocab."""
        return {}

    def weights_conversion(self) -> dict[str, Any]:
        """How the weights file was converted from another key layout ("weights_layout",
        "converted_from"); {} for a file in the model's own layout, or none."""
        return {}

    def provenance(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "model": json.loads(json.dumps(self.model_record, default=str)),
            "preprocessing": self.preprocessing(),
            **prov.weights_record(self.weights_path),
            **self.weights_conversion(),
        }


def encoder_block(layer: str | int | None, total: int, arch: str, *, tokens: bool) -> int:
    """`--layer` of a transformer encoder (vit, bert): N, the blocks applied, 1..total (None:
    all of them). Below `total` every token is cached (the blocks above read them all), so
    `tokens` (not --cls-only) must be on."""
    if layer is None:
        return total
    text = str(layer).strip()
    if not text.isdigit() or not 1 <= int(text) <= total:
        raise ConfigError(
            f"--layer {layer!r}: N, the encoder blocks applied, must be 1..{total} ({arch} has "
            f"{total}; {total}, the default, is the last layer)"
        )
    if int(text) < total and not tokens:
        raise ConfigError(
            f"--cls-only with --layer {text}: a layer below the last ({total}) caches every "
            "token, which the blocks above it read; drop --cls-only"
        )
    return int(text)


def block_record(blocks: int, total: int) -> dict[str, Any]:
    """The `encoder_block` fact (and preprocessing entry) of a cache of the tokens after
    `blocks` of `total` encoder blocks: none for the last layer, as caches always were."""
    return {"encoder_block": [blocks, total]} if blocks < total else {}


def parse_weights(weights: str | None) -> str | None:
    """`--weights`: a path, `installed:NAME` (weights inside an installed package, see
    vlpipe.installed), or "random" to ask for random init. None (not given) is an error so
    nobody caches random features by accident."""
    if weights is None:
        raise WeightsError(
            "no --weights given: pass a checkpoint file or model folder, or "
            "`--weights random` to extract from a randomly initialised model"
        )
    from vlpipe.installed import resolve

    return None if weights == "random" else resolve(weights)
