"""The blocks above a cached encoder layer, rebuilt from the encoder's own weights.

A cache made with `vlpipe extract --backbone vit|bert --layer N` holds the tokens after N of the
encoder's L blocks, before the final norm (its `encoder_block` fact: [N, L]). `VitTop` and
`BertTop` are the other L - N blocks of that very model (and ViT's final norm): on those tokens
they give the full model's last-layer output, so one cache serves every number of top blocks
trained, at the cost of those blocks per step and no image decoding.

`train_top(k)` makes the last k blocks (and the norm) trainable; the blocks below them stay
frozen: in eval mode, run without autograd (no activation memory). `build_top` rebuilds the top
of a cache from its provenance and the weights it was made from (their sha256 must match).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlpipe.errors import ConfigError, WeightsError
from vlpipe.provenance import RANDOM_INIT, sha256_file


class EncoderTop(nn.Module):
    """Blocks N+1..L of an L-block encoder (`first` = N), then `norm`; all trainable until
    `train_top` says otherwise."""

    def __init__(self, blocks: nn.ModuleList, norm: nn.Module, *, first: int, total: int):
        super().__init__()
        if len(blocks) != total - first:
            raise ValueError(f"{len(blocks)} blocks are not blocks {first + 1}..{total}")
        self.blocks, self.norm = blocks, norm
        self.first, self.total = first, total
        self.frozen = 0  # how many of `blocks` run frozen, from the bottom

    def train_top(self, k: int, cache: str = "the cache") -> EncoderTop:
        """Only the last `k` blocks (and the norm) train; the ones below are frozen. `cache`
        names the cache in the error for a `k` out of range."""
        depth = len(self.blocks)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= depth:
            raise ConfigError(
                f"--tune-top {k!r}: {cache} holds the tokens after block {self.first} of "
                f"{self.total}, so 1..{depth} blocks above it can train"
            )
        self.frozen = depth - k
        for i, block in enumerate(self.blocks):
            block.requires_grad_(i >= self.frozen)
        self.norm.requires_grad_(True)
        return self.train(self.training)

    def train(self, mode: bool = True) -> EncoderTop:
        """Frozen blocks stay in eval mode (no dropout), as at extraction."""
        super().train(mode)
        for block in self.blocks[: self.frozen]:
            block.eval()
        return self

    def run_blocks(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """x: B, T, D through every block, the frozen ones without autograd."""
        with torch.no_grad():
            for block in self.blocks[: self.frozen]:
                x = self.apply_block(block, x, **kwargs)
        for block in self.blocks[self.frozen :]:
            x = self.apply_block(block, x, **kwargs)
        return x

    def apply_block(self, block: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError


class VitTop(EncoderTop):
    """The top of a timm VisionTransformer: blocks[N:] and the final norm."""

    @classmethod
    def from_model(cls, model: nn.Module, first: int) -> VitTop:
        """The blocks above block `first` of `model` (its modules, not copies)."""
        blocks = model.blocks
        return cls(nn.ModuleList(blocks[first:]), model.norm, first=first, total=len(blocks))

    def apply_block(self, block: nn.Module, x: torch.Tensor, **_: Any) -> torch.Tensor:
        return block(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: B, T, D (CLS, then the patches) after block N -> B, T, D as the full
        model's forward_features (normed)."""
        return self.norm(self.run_blocks(tokens))


class BertTop(EncoderTop):
    """The top of a transformers BertModel: encoder.layer[N:] (BERT has no final norm: each
    layer ends in its own)."""

    def __init__(self, blocks: nn.ModuleList, config, *, first: int, total: int):
        super().__init__(blocks, nn.Identity(), first=first, total=total)
        self.config = config  # the attention implementation, which the mask's form follows

    @classmethod
    def from_model(cls, model: nn.Module, first: int) -> BertTop:
        layers = model.encoder.layer
        return cls(nn.ModuleList(layers[first:]), model.config, first=first, total=len(layers))

    def apply_block(self, block: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        out = block(x, attention_mask=kwargs["mask"])
        return out[0] if isinstance(out, tuple) else out  # transformers 4 returns a tuple

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden: B, L, D (hidden_states[N]), mask: B, L bool (True: a real token) ->
        B, L, D as the full model's last_hidden_state."""
        return self.run_blocks(hidden, mask=attention_mask(self.config, hidden, mask))


def attention_mask(config, hidden: torch.Tensor, mask: torch.Tensor):
    """The mask BertModel builds from a B, L padding mask for its layers."""
    try:
        from transformers.masking_utils import create_bidirectional_mask
    except ImportError:  # transformers 4: the additive mask of get_extended_attention_mask
        keep = mask[:, None, None, :].to(hidden.dtype)
        return (1.0 - keep) * torch.finfo(hidden.dtype).min
    # positional: transformers 4.5x name the embeddings `input_embeds`, 5 `inputs_embeds`
    return create_bidirectional_mask(config, hidden, mask)


# --------------------------------------------------------------------------------------------
# Rebuilding a cache's encoder
# --------------------------------------------------------------------------------------------
def _vit(record: dict[str, Any], weights: str | None) -> nn.Module:
    from vlpipe.extract.vit import build_timm

    model, _ = build_timm(record["arch"], weights, None, record.get("kwargs") or {})
    return model


def rebuild_bert(record: dict[str, Any], weights: str | None) -> nn.Module:
    """The BertModel a text cache's model record describes (random-init: None)."""
    from transformers import BertConfig

    from vlpipe.extract.bert import load_bert

    return load_bert(BertConfig.from_dict(dict(record["config"])), weights)


# backbone -> (the top's class, how extraction built the full model from its record)
TOPS = {"vit": (VitTop, _vit), "bert": (BertTop, rebuild_bert)}


def build_top(
    provenance: dict[str, Any],
    weights: str,
    k: int,
    *,
    facts: dict[str, Any] | None = None,
    cache: str = "the cache",
    flag: str = "--weights",
) -> EncoderTop:
    """The blocks above a cache's layer, rebuilt from `weights` (a file, a model folder,
    installed:NAME, or "random" for a random-init cache, from its recorded seed), the last `k`
    trainable. `facts`: the cache's declared facts (default: its provenance's preprocessing,
    which records the same encoder_block); `cache` names it in errors, `flag` the option that
    gave `weights`."""
    backbone = provenance.get("backbone")
    if backbone not in TOPS:
        raise ConfigError(f"{cache}: a {backbone} cache; top blocks are rebuilt for vit | bert")
    declared = facts if facts is not None else provenance.get("preprocessing") or {}
    block = declared.get("encoder_block")
    if not block:
        raise ConfigError(
            f"{cache}: the {backbone}'s last-layer output (no encoder_block fact), so no blocks "
            "are left above it to rebuild; extract with --layer N below the model's depth"
        )
    first, total = block
    path = check_weights(provenance, weights, cache, flag)
    cls, build = TOPS[backbone]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(provenance.get("seed") or 0)  # random-init: as extraction seeded it
        model = build(provenance["model"], path)
    _check_rebuilt(model, provenance["model"], total, cache)
    return cls.from_model(model.requires_grad_(True), first).train_top(k, cache)


def check_weights(
    provenance: dict[str, Any], weights: str, cache: str, flag: str = "--weights"
) -> str | None:
    """The path to load (None: random-init) once `weights` (given as `flag`) is what made
    the cache."""
    recorded = provenance.get("weights_sha256")
    if weights == "random":
        if recorded != RANDOM_INIT:
            raise WeightsError(
                f"{flag} random: {cache} was made from {provenance.get('weights')} (sha256 "
                f"{recorded}), not random-init weights: pass that file"
            )
        return None
    if recorded == RANDOM_INIT:
        raise WeightsError(
            f"{flag} {weights}: {cache} was made from random-init weights (seed "
            f"{provenance.get('seed')}); pass 'random' to rebuild them from that seed"
        )
    from vlpipe.installed import resolve
    from vlpipe.weights import resolve_weights_file

    path = resolve(weights)
    try:
        file = resolve_weights_file(path)
    except WeightsError as err:
        raise WeightsError(f"{flag} {err}") from None
    digest = sha256_file(file)
    if digest != recorded:
        raise WeightsError(
            f"{flag} {file}: sha256 {digest}, but {cache} was made from "
            f"{provenance.get('weights')} with sha256 {recorded}: the top blocks must be those "
            "of the weights that made it"
        )
    return str(path)


def _check_rebuilt(model: nn.Module, record: dict[str, Any], total: int, cache: str) -> None:
    """The model rebuilt has the depth and size the cache records (another timm or
    transformers version might build another model from the same record)."""
    blocks = model.blocks if hasattr(model, "blocks") else model.encoder.layer
    params = sum(p.numel() for p in model.parameters())
    if len(blocks) != total or params != record.get("num_params", params):
        raise WeightsError(
            f"{cache}: rebuilt {record.get('arch')} has {len(blocks)} blocks and {params} "
            f"parameters; the cache records {total} and {record.get('num_params')}"
        )


def rebuild_architecture(
    provenance: dict[str, Any], block: list[int], k: int, cache: str = "the cache"
) -> EncoderTop:
    """The top of a cache's encoder with its architecture only (random weights): what a run's
    checkpoint, which holds the trained top, is loaded into."""
    cls, build = TOPS[provenance["backbone"]]
    model = build(provenance["model"], None)
    _check_rebuilt(model, provenance["model"], block[1], cache)
    return cls.from_model(model, block[0]).train_top(k)


class CachedEncoders(nn.Module):
    """The encoder tops a run trains, applied to a batch before the fusion: `vision` turns the
    cached image tokens (image_tokens: B, 1 + P, D) into what a last-layer patch cache gives
    (image_cls, and the CLS + patches as regions over the patch grid), `text` the cached
    hidden states (text_feats, text_mask) into last-layer text_feats and text_cls."""

    def __init__(
        self,
        vision: VitTop | None = None,
        text: BertTop | None = None,
        grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.vision, self.text, self.grid = vision, text, grid

    @property
    def needs(self) -> tuple[str, ...]:
        """The batch fields the tops read."""
        return (("image_tokens",) if self.vision else ()) + (
            ("text_feats", "text_mask") if self.text else ()
        )

    @property
    def provides(self) -> tuple[str, ...]:
        vision = ("image_cls", "region_feats", "region_boxes", "region_mask")
        return (vision if self.vision else ()) + (("text_feats", "text_cls") if self.text else ())

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = dict(batch)
        if self.vision is not None:
            tokens = self.vision(batch["image_tokens"])
            batch["image_cls"] = tokens[:, 0]
            batch.update(patch_regions(tokens, self.grid))
        if self.text is not None:
            hidden = self.text(batch["text_feats"], batch["text_mask"])
            batch["text_feats"], batch["text_cls"] = hidden, hidden[:, 0]
        return batch


def patch_regions(tokens: torch.Tensor, grid: tuple[int, int]) -> dict[str, torch.Tensor]:
    """The region fields of encoder tokens (B, 1 + P, D: the CLS / pooled vector, then the P
    patches / cells of `grid`), as fusion/data.py visual_fields makes them from a cache."""
    from vlpipe.fusion.data import grid_boxes

    b, n = tokens.shape[:2]
    boxes = torch.as_tensor(grid_boxes(grid, True), device=tokens.device)
    return {
        "region_feats": tokens,
        "region_boxes": boxes.expand(b, n, 4),
        "region_mask": torch.ones(b, n, dtype=torch.bool, device=tokens.device),
    }
