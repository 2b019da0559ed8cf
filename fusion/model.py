"""Fusion names (as written in checkpoints and on the CLI) and the task model around them.

A `TaskModel` is a fusion model (pooled multimodal vector) plus a task head. For NLVR2 it
encodes (image 0, sentence) and (image 1, sentence) with the same fusion model, concatenates the
two pooled outputs and classifies them, as LXMERT does. For a multiple-choice task (VCR) it
encodes (image, candidate i) for each of the C candidates, the head scores each pooled vector
(one output) and the C scores are the example's logits (cross-entropy over the candidates).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlpipe.errors import ConfigError
from vlpipe.fusion.heads import ClassifierHead
from vlpipe.fusion.registry import FUSIONS, FusionSpec

IMAGE_PREFIXES = ("image_", "region_")  # fields with one entry per image


def fusion_spec(name: str) -> FusionSpec:
    if name not in FUSIONS:
        raise ConfigError(f"unknown fusion {name!r}; known: {', '.join(FUSIONS)}")
    return FUSIONS[name]


def fusion_classes(name: str) -> tuple[type, type]:
    return fusion_spec(name).classes()


def make_fusion_config(name: str, *layers: dict[str, Any], where: str | None = None):
    """The fusion's config dataclass from dicts (later ones win); unknown keys and values of the
    wrong type are an error naming them."""
    from vlpipe.config import resolve

    config_cls, _ = fusion_classes(name)
    return resolve(config_cls, *layers, where=where or f"fusion {name!r} config")


def fusion_needs(name: str) -> tuple[str, ...]:
    return fusion_classes(name)[1].needs


def fusion_inputs(name: str, widths: dict[str, int | None]) -> dict[str, int]:
    """The config values a fusion takes from its inputs, from the widths {"image_feats",
    "image_cls", "text", "vocab"} of the caches and tokenizer (None where absent)."""
    spec = fusion_spec(name)
    return {field: widths[source] for field, source in spec.inputs.items() if widths[source]}


def needs_with_tops(needs: tuple[str, ...], tops) -> tuple[str, ...]:
    """The batch fields a model reads: its fusion's `needs`, with what encoder tops (if any)
    make from cached tokens replaced by those tokens."""
    if tops is None:
        return needs
    own = tuple(k for k in needs if k not in set(tops.provides))
    return tuple(dict.fromkeys(own + tops.needs))


class TaskModel(nn.Module):
    def __init__(
        self,
        fusion_name: str,
        fusion_config,
        num_outputs: int,
        images_per_example: int = 1,
        head_hidden: int | None = None,
        head_dropout: float = 0.0,
        choices: int = 0,
    ):
        super().__init__()
        _, model_cls = fusion_classes(fusion_name)
        self.fusion_name = fusion_name
        self.fusion = model_cls(fusion_config)
        self.pair = images_per_example
        self.choices = choices  # candidates per example (multiple choice), 0: none
        in_dim = self.fusion.output_dim * images_per_example
        hidden = head_hidden or 2 * self.fusion.output_dim
        if choices and num_outputs != choices:
            raise ConfigError(f"{choices} candidates per example, but {num_outputs} answers")
        outputs = 1 if choices else num_outputs  # a score per candidate
        self.head = ClassifierHead(in_dim, hidden, outputs, head_dropout)
        self.tops = None  # encoder tops trained from middle-layer caches (set_tops)

    def set_tops(self, tops: nn.Module) -> None:
        """Run `tops` (fusion/encoder_top.py CachedEncoders, fusion/encoder_full.py
        LiveEncoders) on each batch before the fusion; an NLVR2 pair is not supported (one
        image per example)."""
        if self.pair > 1 or self.choices:
            raise ConfigError(
                "--tune-top / --finetune full: tasks with one image and one text per example "
                "only (not NLVR2, not VCR)"
            )
        self.tops = tops

    @property
    def needs(self) -> tuple[str, ...]:
        return needs_with_tops(self.fusion.needs, self.tops)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """batch fields (B, ...; image fields B, 2, ... for NLVR2) -> logits B, N."""
        if self.tops is not None:
            batch = self.tops(batch)
        fields = {k: batch[k] for k in self.fusion.needs}
        if self.pair > 1:
            fields = {k: self._pairs(k, v) for k, v in fields.items()}
        if self.choices:
            fields = {k: self._candidates(k, v) for k, v in fields.items()}
        pooled = self.fusion(**fields)
        logits = self.head(pooled.reshape(-1, self.pair * pooled.shape[-1]))
        return logits.reshape(-1, self.choices) if self.choices else logits

    def _candidates(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Text fields B, C, ... -> B*C, ...; the image goes with each candidate."""
        if name.startswith(IMAGE_PREFIXES):
            return value.repeat_interleave(self.choices, dim=0)
        return value.reshape(-1, *value.shape[2:])

    def _pairs(self, name: str, value: torch.Tensor) -> torch.Tensor:
        if name.startswith(IMAGE_PREFIXES):  # B, 2, ... -> 2B, ... (image-major within example)
            return value.reshape(-1, *value.shape[2:])
        return value.repeat_interleave(self.pair, dim=0)  # the sentence goes with each image
