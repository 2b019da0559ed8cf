"""ResNet (timm): the 7x7x2048 grid of the last stage and its global average (the paper's CNN
ablation)."""

from __future__ import annotations

from typing import Any

import torch

from vlpipe.extract.base import Extractor, ImageTransform
from vlpipe.extract.vit import build_timm

DEFAULT_ARCH = "resnet50"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ResNetExtractor(Extractor):
    backbone = "resnet"
    kind = "grid"

    def __init__(self, model, weights, model_record, transform: ImageTransform, grid: bool):
        super().__init__(model, weights, model_record)
        self.transform = transform
        self.grid = grid
        self.grid_hw = _grid_hw(model, transform.size)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        dim = self.model.num_features
        out = {"image_cls": (dim,), "image_hw": (2,)}
        if self.grid:
            out["image_feats"] = (self.grid_hw[0] * self.grid_hw[1], dim)
        return out

    def encode(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """pixels: B,3,H,W uint8 -> image_cls B,C (GAP) and image_feats B,h*w,C."""
        fmap = self.model.forward_features(self.transform.normalize(pixels))  # B,C,h,w
        out = {"image_cls": fmap.mean(dim=(2, 3))}
        if self.grid:
            out["image_feats"] = fmap.flatten(2).transpose(1, 2)
        return out

    def preprocessing(self) -> dict[str, Any]:
        return dict(self.transform.record(), grid=list(self.grid_hw))


def _grid_hw(model: torch.nn.Module, size: tuple[int, int]) -> tuple[int, int]:
    with torch.no_grad():
        fmap = model.forward_features(torch.zeros(1, 3, *size))
    return int(fmap.shape[2]), int(fmap.shape[3])


def build_resnet(
    *,
    arch: str | None,
    weights: str | None,
    image_size: int | None,
    model_kwargs: dict[str, Any],
    patches: bool = True,
    **_,
) -> ResNetExtractor:
    model, record = build_timm(arch or DEFAULT_ARCH, weights, None, model_kwargs)
    cfg = model.pretrained_cfg or {}
    side = image_size or 224
    transform = ImageTransform(
        size=(side, side),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        interpolation=cfg.get("interpolation", "bilinear"),
    )
    return ResNetExtractor(model, weights, record, transform, patches)
