"""ViT (timm): CLS token and patch tokens of the last layer, after the final norm; or, with
`--layer N` below the depth L, every token after block N, before the final norm (the blocks
above are dropped; fusion/encoder_top.py rebuilds them from the same weights for training)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlpipe.errors import ConfigError
from vlpipe.extract.base import Batch, Extractor, ImageTransform, block_record, encoder_block
from vlpipe.weights import LoadReport, load_into, read_state_dict

DEFAULT_ARCH = "vit_base_patch16_224"  # the paper's ViT-B/16


class ViTExtractor(Extractor):
    backbone = "vit"
    kind = "patches"

    def __init__(
        self,
        model,
        weights,
        model_record,
        transform: ImageTransform,
        patches: bool,
        block: dict[str, Any] | None = None,
    ):
        super().__init__(model, weights, model_record)
        self.transform = transform
        self.patches = patches
        self.grid = tuple(model.patch_embed.grid_size)
        self.block = block or {}  # {"encoder_block": [N, L]} below the last layer

    def shapes(self) -> dict[str, tuple[int, ...]]:
        dim = self.model.embed_dim
        out = {"image_cls": (dim,), "image_hw": (2,)}
        if self.patches:
            out["image_feats"] = (self.grid[0] * self.grid[1], dim)
        return out

    def encode(self, batch: Batch) -> dict[str, torch.Tensor]:
        """batch.pixels: B x (3,H,W) uint8 -> image_cls B,D, image_feats B,P,D, image_hw B,2."""
        tokens = self.model.forward_features(self.transform.normalize(batch.stacked()))
        out = {"image_cls": tokens[:, 0], "image_hw": batch.image_hw()}
        if self.patches:
            out["image_feats"] = tokens[:, self.model.num_prefix_tokens :]
        return out

    def preprocessing(self) -> dict[str, Any]:
        return dict(self.transform.record(), grid=list(self.grid), **self.block)

    def facts(self) -> dict[str, Any]:
        return {"grid": list(self.grid), **self.block} if self.patches else {}


def build_timm(
    arch: str, weights: str | None, image_size: int | None, model_kwargs: dict[str, Any]
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A timm model with local weights in timm's own layout loaded strictly."""
    model, record = create_timm(arch, image_size, model_kwargs)
    if weights is not None:
        load_timm_state(model, read_state_dict(weights), weights)
    return model, record


def create_timm(
    arch: str, image_size: int | None, model_kwargs: dict[str, Any]
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A randomly initialised timm model without a classifier, and its provenance record."""
    import timm

    if not timm.is_model(arch):
        import difflib

        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; close: {', '.join(close)}" if close else ""
        raise ConfigError(f"--arch {arch!r} is not a timm architecture{hint}")
    kwargs = dict(model_kwargs)
    if image_size and arch.startswith(("vit", "deit", "beit", "eva")):
        kwargs["img_size"] = image_size
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs)
    return model, {
        "arch": arch,
        "kwargs": kwargs,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def head_keys(model: torch.nn.Module) -> Callable[[str], bool]:
    """Is a key one of the classifier's, which the model built without? (`head.` / `fc.`, and
    the classifier timm's pretrained_cfg names: EfficientNet's `classifier.`)"""
    named = (model.pretrained_cfg or {}).get("classifier") or ()
    prefixes = ("head.", "fc.", *(f"{n}." for n in ((named,) if isinstance(named, str) else named)))
    return lambda key: key.startswith(prefixes)


def load_timm_state(model: torch.nn.Module, state: dict, source: str | Path) -> LoadReport:
    """A state dict in timm's own names into `model`, strictly (its classifier set aside)."""
    return load_into(model, _timm_filter(model, state), source, ignore=head_keys(model))


def _timm_filter(model: torch.nn.Module, state: dict) -> dict:
    """Apply timm's own checkpoint adapter (e.g. resampling ViT position embeddings to a new
    image size, converting original JAX/DeiT layouts)."""
    module = importlib.import_module(type(model).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    return filter_fn(state, model) if filter_fn else state


def check_block_arch(model: torch.nn.Module, arch: str) -> None:
    """A ViT `--layer` can split: timm's VisionTransformer (blocks, then the final norm, in
    forward_features) with one prefix token, the CLS (image_cls; the rest are patches)."""
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ConfigError(
            f"--layer: {arch} is a timm {type(model).__name__}, not a VisionTransformer "
            "(blocks, then the final norm) whose blocks vlpipe can split"
        )
    if model.num_prefix_tokens != 1 or model.cls_token is None:
        raise ConfigError(
            f"--layer: {arch} has {model.num_prefix_tokens} prefix tokens; vlpipe splits ViTs "
            "whose one prefix token is the CLS (no registers, no distillation token)"
        )


def build_vit(
    *,
    arch: str | None,
    weights: str | None,
    image_size: int | None,
    model_kwargs: dict[str, Any],
    patches: bool = True,
    layer: str | int | None = None,
    **_,
) -> ViTExtractor:
    arch = arch or DEFAULT_ARCH
    model, record = build_timm(arch, weights, image_size, model_kwargs)
    block = {}
    if layer is not None:
        check_block_arch(model, arch)
        total = len(model.blocks)
        blocks = encoder_block(layer, total, arch, tokens=patches)
        if blocks < total:  # forward_features stops after block N, before the (now no) norm
            model.prune_intermediate_layers([blocks - 1], prune_norm=True, prune_head=True)
        block = block_record(blocks, total)
    cfg = model.pretrained_cfg or {}
    size = tuple(model.patch_embed.img_size)
    transform = ImageTransform(
        size=size,
        mean=tuple(cfg.get("mean", (0.5, 0.5, 0.5))),
        std=tuple(cfg.get("std", (0.5, 0.5, 0.5))),
        interpolation=cfg.get("interpolation", "bicubic"),
    )
    return ViTExtractor(model, weights, record, transform, patches, block)
