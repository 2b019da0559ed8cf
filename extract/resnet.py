"""ResNet (timm): the feature map of one stage as a grid, and its pooled vector (the paper's CNN
ablation).

Default: the last stage (7x7x2048 for ResNet-50 at 224 px) and its global average. `layer`
picks an earlier stage by its timm name (layer3 = C4, the stage bottom-up attention pools its
regions from); the stages after it are dropped from the model. `pool="max"` stores the spatial
maximum instead of the mean.
"""

from __future__ import annotations

from typing import Any

import torch

from vlpipe.errors import ConfigError
from vlpipe.extract.base import Batch, Extractor, ImageTransform
from vlpipe.extract.vit import build_timm

DEFAULT_ARCH = "resnet50"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
POOLS = ("avg", "max")


class ResNetExtractor(Extractor):
    backbone = "resnet"
    kind = "grid"

    def __init__(
        self,
        model,
        weights,
        model_record,
        transform: ImageTransform,
        grid: bool,
        layer: str,
        pool: str,
    ):
        super().__init__(model, weights, model_record)
        self.transform = transform
        self.grid = grid
        self.layer, self.pool = layer, pool
        stages = [info["module"] for info in model.feature_info]
        self.stage = stages.index(layer)
        self.last = self.stage == len(stages) - 1
        self.dim = model.feature_info[self.stage]["num_chs"]
        if not self.last:  # the later stages never run: drop them
            model.prune_intermediate_layers([self.stage], prune_head=True)
        self.grid_hw = tuple(self.feature_map(torch.zeros(1, 3, *transform.size)).shape[2:])

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """B,3,H,W normalised -> B,C,h,w, the output of the chosen stage."""
        if self.last:
            return self.model.forward_features(images)
        (fmap,) = self.model.forward_intermediates(
            images, indices=[self.stage], intermediates_only=True
        )
        return fmap

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {"image_cls": (self.dim,), "image_hw": (2,)}
        if self.grid:
            out["image_feats"] = (self.grid_hw[0] * self.grid_hw[1], self.dim)
        return out

    def encode(self, batch: Batch) -> dict[str, torch.Tensor]:
        """batch.pixels: B x (3,H,W) uint8 -> image_cls B,C (pooled), image_feats B,h*w,C,
        image_hw B,2."""
        fmap = self.feature_map(self.transform.normalize(batch.stacked()))
        pooled = fmap.mean(dim=(2, 3)) if self.pool == "avg" else fmap.amax(dim=(2, 3))
        out = {"image_cls": pooled, "image_hw": batch.image_hw()}
        if self.grid:
            out["image_feats"] = fmap.flatten(2).transpose(1, 2)
        return out

    def preprocessing(self) -> dict[str, Any]:
        return dict(
            self.transform.record(), grid=list(self.grid_hw), layer=self.layer, pool=self.pool
        )

    def facts(self) -> dict[str, Any]:
        return {"grid": list(self.grid_hw)} if self.grid else {}


def build_resnet(
    *,
    arch: str | None,
    weights: str | None,
    image_size: int | None,
    model_kwargs: dict[str, Any],
    patches: bool = True,
    layer: str | None = None,
    pool: str | None = None,
    **_,
) -> ResNetExtractor:
    model, record = build_timm(arch or DEFAULT_ARCH, weights, None, model_kwargs)
    stages = [info["module"] for info in model.feature_info]
    layer = layer or stages[-1]
    if layer not in stages:
        raise ConfigError(f"--layer {layer!r}: {record['arch']} has stages {', '.join(stages)}")
    pool = pool or "avg"
    if pool not in POOLS:
        raise ConfigError(f"--pool {pool!r}: expected one of {', '.join(POOLS)}")
    cfg = model.pretrained_cfg or {}
    side = image_size or 224
    transform = ImageTransform(
        size=(side, side),
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        interpolation=cfg.get("interpolation", "bilinear"),
    )
    return ResNetExtractor(model, weights, record, transform, patches, layer, pool)
