"""Any timm CNN (ResNet, EfficientNet, ConvNeXt, RegNet, ...): the feature map of one stage as a
grid, and its pooled vector (the paper's CNN ablation, and the demo's image features).

The stages are timm's `feature_info` taps, named by their module (`layer3` is a ResNet's C4, the
stage bottom-up attention pools its regions from; `blocks.4` EfficientNet's stride-16 stage),
and, where the model's `forward_features` goes on past the last tap (EfficientNet's conv_head +
bn2: 1280 channels), that output as `forward_features`. Default: the last of them, the map the
classifier pools. `layer` takes a name or an index into that list (-1: the last); the stages
after it are dropped from the model. `pool="max"` stores the spatial maximum instead of the mean.

Weights: a file in timm's own layout, or one that `cnn_weights` converts (EfficientNet-Lite in
lukemelas' layout, ResMem), read off the keys or named by `weights_layout`. A converted file's
family sets the normalisation (not timm's default for the arch), and the provenance records the
conversion next to the sha256 of the file named.

`--backbone resnet` is this extractor with ResNet-50 at 224 px by default; `--backbone cnn`
defaults to tf_efficientnet_lite0 at the arch's own input size (timm's pretrained_cfg).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from vlpipe.errors import ConfigError
from vlpipe.extract.base import Batch, Extractor, ImageTransform
from vlpipe.extract.cnn_weights import (
    LAYOUTS,
    TIMM,
    Family,
    Layout,
    check_arch,
    conversion_record,
    convert,
    detect_layout,
    installed_weights,
)
from vlpipe.extract.vit import create_timm, head_keys, load_timm_state
from vlpipe.weights import WeightsMismatchError, load_into, read_state_dict

DEFAULT_ARCH = {"resnet": "resnet50", "cnn": "tf_efficientnet_lite0"}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
POOLS = ("avg", "max")
FINAL = "forward_features"  # the stage name of forward_features' output past the last tap

__all__ = ["CnnExtractor", "build_cnn", "build_resnet", "installed_weights", "stages_of"]


class CnnExtractor(Extractor):
    backbone = "cnn"
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
        *,
        backbone: str = "cnn",
        conversion: dict[str, Any] | None = None,
    ):
        super().__init__(model, weights, model_record)
        self.backbone = backbone
        self.transform = transform
        self.grid = grid
        self.layer, self.pool = layer, pool
        self.conversion = conversion or {}
        stages = stages_of(model, model_record["arch"])
        self.stage = stages.index(layer)
        self.last = self.stage == len(stages) - 1  # forward_features' own output
        self.dim = model.num_features if self.last else model.feature_info[self.stage]["num_chs"]
        if not self.last:  # the later stages never run: drop them
            model.prune_intermediate_layers([self.stage], prune_head=True)
        probe = self.feature_map(torch.zeros(1, 3, *transform.size))
        if probe.ndim != 4:
            raise ConfigError(
                f"--arch {model_record['arch']}: stage {layer} gives a {tuple(probe.shape)} "
                "tensor, not a B,C,h,w feature map (not a CNN: use --backbone vit)"
            )
        self.grid_hw = tuple(probe.shape[2:])

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

    def weights_conversion(self) -> dict[str, Any]:
        return self.conversion

    def facts(self) -> dict[str, Any]:
        return {"grid": list(self.grid_hw)} if self.grid else {}


def stages_of(model: torch.nn.Module, arch: str) -> list[str]:
    """The stage names `layer` may take: the feature_info modules, then `forward_features`
    where forward_features' output has other channels than the last of them."""
    info = getattr(model, "feature_info", None)
    if not info or not hasattr(model, "forward_intermediates"):
        raise ConfigError(
            f"--arch {arch}: timm gives it no feature_info / forward_intermediates, so its "
            "stages cannot be tapped"
        )
    names = [tap["module"] for tap in info]
    if model.num_features != info[-1]["num_chs"]:
        names.append(FINAL)
    return names


def pick_stage(layer: str | None, stages: list[str], arch: str) -> str:
    """`--layer` as a stage name: a name, an index into `stages` (-1 the last) or the last."""
    if layer is None:
        return stages[-1]
    text = str(layer)
    if text in stages:
        return text
    if re.fullmatch(r"-?\d+", text) and -len(stages) <= int(text) < len(stages):
        return stages[int(text)]
    raise ConfigError(
        f"--layer {layer!r}: {arch} has stages {', '.join(stages)} "
        f"(or their index, 0..{len(stages) - 1}; -1 the last)"
    )


def load_cnn(
    backbone: str,
    arch: str | None,
    weights: str | None,
    layout_name: str | None,
    model_kwargs: dict[str, Any],
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """(model, its record, the conversion's provenance or {}): random-init, a file in timm's
    layout loaded as it is, or a file of another layout converted and checked."""
    if weights is None:
        if layout_name:
            raise ConfigError(
                f"--weights-layout {layout_name}: only with a --weights file, not random-init"
            )
        return (*create_timm(arch or DEFAULT_ARCH[backbone], None, model_kwargs), {})
    state = read_state_dict(weights)  # torch.load(weights_only=True): no code runs
    layout_name = layout_name or detect_layout(state)
    if layout_name == TIMM:
        model, record = create_timm(arch or DEFAULT_ARCH[backbone], None, model_kwargs)
        load_timm_state(model, state, weights)
        return model, record, {}
    layout = LAYOUTS[layout_name]
    model, record, conv = convert_onto(layout, arch, state, weights, model_kwargs)
    ignore = head_keys(model)
    load_into(model, conv.state, weights, layout=layout.name, ignore=ignore, ignored=conv.set_aside)
    arch_from = "--arch" if arch else "fitted to the file's shapes"
    return model, record, conversion_record(conv, arch_from)


def convert_onto(layout: Layout, arch: str | None, state: dict, source: str, model_kwargs: dict):
    """(model, record, Conversion) for `arch`, or without one for the first of the layout's
    archs the file fits (EfficientNet-Lite 0-4 differ in their shapes)."""
    if arch:
        check_arch(layout, arch)
    candidates = (arch,) if arch else layout.archs
    first_error = None
    for name in candidates:
        model, record = create_timm(name, None, model_kwargs)
        try:
            return model, record, convert(layout, state, model, source, ignore=head_keys(model))
        except WeightsMismatchError as err:
            if len(candidates) == 1:
                raise
            first_error = first_error or err
    raise WeightsMismatchError(
        f"{first_error} (nor does it fit {', '.join(candidates[1:])}: pass --arch to see "
        "the first mismatch for another)"
    )


def image_transform(
    model: torch.nn.Module, family: Family | None, image_size: int | None, backbone: str
) -> ImageTransform:
    """The checkpoint family's normalisation and size, else timm's pretrained_cfg for the arch
    (resnet: 224 px, as it always had)."""
    cfg = model.pretrained_cfg or {}
    cfg_size = tuple(cfg.get("input_size", (3, 224, 224))[1:])
    if family is not None and family.input_size:
        size = (family.input_size, family.input_size)
    else:
        size = (224, 224) if backbone == "resnet" else cfg_size
    if image_size:
        size = (image_size, image_size)
    if family is not None:
        return ImageTransform(size, family.mean, family.std, family.interpolation)
    return ImageTransform(
        size=size,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
        interpolation=cfg.get("interpolation", "bilinear"),
    )


def build_cnn(
    *,
    arch: str | None,
    weights: str | None,
    image_size: int | None,
    model_kwargs: dict[str, Any],
    patches: bool = True,
    layer: str | None = None,
    pool: str | None = None,
    weights_layout: str | None = None,
    backbone: str = "cnn",
    **_,
) -> CnnExtractor:
    model, record, conversion = load_cnn(backbone, arch, weights, weights_layout, model_kwargs)
    layer = pick_stage(layer, stages_of(model, record["arch"]), record["arch"])
    pool = pool or "avg"
    if pool not in POOLS:
        raise ConfigError(f"--pool {pool!r}: expected one of {', '.join(POOLS)}")
    family = LAYOUTS[conversion["weights_layout"]].family if conversion else None
    transform = image_transform(model, family, image_size, backbone)
    return CnnExtractor(
        model,
        weights,
        record,
        transform,
        patches,
        layer,
        pool,
        backbone=backbone,
        conversion=conversion,
    )


def build_resnet(**options: Any) -> CnnExtractor:
    """`--backbone resnet`: the CNN extractor with ResNet-50 at 224 px by default."""
    return build_cnn(**options, backbone="resnet")
