"""Helpers shared by the LXMERT-style fusion models (`lxmert.py`, `cross.py`).

transformers' `LxmertAttention` computes attention as matmul + softmax + matmul, which keeps the
B, heads, N, M probability tensor alive for the backward pass. `use_sdpa` switches every such
module in a model to `torch.nn.functional.scaled_dot_product_attention` (fused kernels on GPU)
without touching its parameters, so checkpoints keep loading under the same names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.lxmert.modeling_lxmert import LxmertAttention, LxmertXLayer

from vlpipe.errors import ConfigError


class SdpaLxmertAttention(LxmertAttention):
    """`LxmertAttention` with the same parameters, computed by scaled_dot_product_attention.

    Only assigned to existing instances by `use_sdpa` (never constructed directly)."""

    def forward(self, hidden_states, context, attention_mask=None, output_attentions=False):
        """hidden_states: B, N, H; context: B, M, Dc; attention_mask: additive, broadcastable to
        B, heads, N, M -> (B, N, H,)."""
        if output_attentions:  # SDPA never materialises the probabilities: use the stock path
            return super().forward(hidden_states, context, attention_mask, output_attentions)
        query = self._split_heads(self.query(hidden_states))
        key = self._split_heads(self.key(context))
        value = self._split_heads(self.value(context))
        if attention_mask is not None and attention_mask.dtype != query.dtype:
            # Under autocast the fp32 mask meets bf16/fp16 queries; finfo(fp32).min would round
            # to -inf there and turn a fully masked row into NaN, so clamp before the cast.
            attention_mask = attention_mask.clamp(min=torch.finfo(query.dtype).min)
            attention_mask = attention_mask.to(query.dtype)
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=self.dropout.p if self.training else 0.0,
        )
        return (out.transpose(1, 2).flatten(2),)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """B, N, heads * d -> B, heads, N, d."""
        return x.unflatten(-1, (self.num_attention_heads, self.attention_head_size)).transpose(1, 2)


def use_sdpa(model: nn.Module) -> int:
    """Switch every `LxmertAttention` inside `model` to `SdpaLxmertAttention`; returns how many.

    The class is swapped in place, so parameters, buffers and state-dict names stay the same."""
    count = 0
    for module in model.modules():
        if type(module) is LxmertAttention:
            module.__class__ = SdpaLxmertAttention
            count += 1
    return count


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """B, N keep-mask (True / 1 = attend) -> B, 1, 1, N additive mask as transformers' LxmertModel
    builds it: 0 where kept, the dtype's smallest value where masked."""
    keep = mask[:, None, None, :].to(dtype)
    return (1.0 - keep) * torch.finfo(dtype).min


class LanguageTailXLayer(LxmertXLayer):
    """The last cross-modality layer when only its language output is read (the pooled output
    of LXMERT and of the cross model): language cross-attention, self-attention and feed-forward
    as in `LxmertXLayer`; the visual stream is passed through unchanged instead of computed.

    Only assigned to existing instances by `language_only_tail`."""

    def forward(
        self,
        lang_feats,
        lang_attention_mask,
        visual_feats,
        visual_attention_mask,
        output_attentions=False,
    ):
        att = self.visual_attention(
            lang_feats,
            visual_feats,
            ctx_att_mask=visual_attention_mask,
            output_attentions=output_attentions,
        )
        lang = self.lang_self_att(att[0], lang_attention_mask, output_attentions=False)[0]
        lang = self.lang_output(self.lang_inter(lang), lang)
        return (lang, visual_feats, att[1]) if output_attentions else (lang, visual_feats)


def language_only_tail(last_layer: LxmertXLayer) -> None:
    """Skip and freeze what the pooled text output never reaches: in the last cross layer the
    visual cross-attention, self-attention and feed-forward only feed the visual output. Skipping
    them saves their forward and backward; freezing them keeps DistributedDataParallel from
    waiting for gradients that never come. They stay in the state dict, so checkpoints load and
    save unchanged (the cross-attention weights are shared with the language direction)."""
    last_layer.__class__ = LanguageTailXLayer
    for part in (last_layer.visn_self_att, last_layer.visn_inter, last_layer.visn_output):
        part.requires_grad_(False)


def check_heads(hidden: int, heads: int, fusion: str) -> None:
    """Attention splits the width into equal heads: a config that cannot is an error naming
    both fields (not transformers' traceback)."""
    if heads < 1 or hidden < 1 or hidden % heads:
        raise ConfigError(
            f"{fusion} config: hidden={hidden} must be a positive multiple of heads={heads}"
        )
