"""The "BERT + k CrossAtt" ablation of the LXMERT paper: cached (frozen) BERT token features
and region / patch features meet in k LXMERT cross-modality layers, with no language or
object-relationship encoder of their own.

Text: Linear(Dt -> H) + LayerNorm over the cached token features. Image: LXMERT's visual feature
encoder (feature fc and box fc, each LayerNorm'd, averaged). Pooled output: tanh(Linear) of the
text stream's first token ([CLS] in BERT features) after the cross layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import LxmertConfig
from transformers.models.lxmert.modeling_lxmert import LxmertVisualFeatureEncoder, LxmertXLayer

from vlpipe.errors import ConfigError
from vlpipe.fusion.attention import additive_mask, check_heads, language_only_tail, use_sdpa


@dataclass
class CrossFusionConfig:
    layers: int = 2  # k cross-modality layers
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    text_dim: int = 768
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4
    dropout: float = 0.1
    init_std: float = 0.02  # BERT / LXMERT initialisation

    def to_transformers(self) -> LxmertConfig:
        check_heads(self.hidden, self.heads, "cross")
        if self.layers < 1:
            raise ConfigError("CrossFusion needs layers >= 1")
        return LxmertConfig(
            hidden_size=self.hidden,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            visual_feat_dim=self.visual_feat_dim,
            visual_pos_dim=self.visual_pos_dim,
        )


class CrossFusion(nn.Module):
    """k `LxmertXLayer`s over projected text features and encoded visual features."""

    needs = ("text_feats", "text_mask", "region_feats", "region_boxes", "region_mask")

    def __init__(self, config: CrossFusionConfig):
        super().__init__()
        self.config = config
        self.output_dim = config.hidden
        lx = config.to_transformers()
        self.text_proj = nn.Linear(config.text_dim, config.hidden)
        self.text_norm = nn.LayerNorm(config.hidden, eps=1e-12)
        self.text_dropout = nn.Dropout(config.dropout)
        self.visual = LxmertVisualFeatureEncoder(lx)
        self.layers = nn.ModuleList(LxmertXLayer(lx) for _ in range(config.layers))
        self.pooler = nn.Linear(config.hidden, config.hidden)
        self.apply(self._init_weights)
        use_sdpa(self)
        language_only_tail(self.layers[-1])

    def _init_weights(self, module: nn.Module) -> None:
        # The layers are built outside a PreTrainedModel, so give them BERT's init ourselves.
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.init_std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(
        self,
        text_feats: torch.Tensor,
        text_mask: torch.Tensor,
        region_feats: torch.Tensor,
        region_boxes: torch.Tensor,
        region_mask: torch.Tensor,
    ) -> torch.Tensor:
        """text_feats: B, L, Dt; text_mask: B, L; region_feats: B, K, Dv; region_boxes: B, K, 4
        (xyxy in [0, 1]); region_mask: B, K (True = real region) -> pooled B, H."""
        lang = self.text_dropout(self.text_norm(self.text_proj(text_feats)))
        visn = self.visual(region_feats, region_boxes)
        dtype = self.pooler.weight.dtype
        lang_mask, visn_mask = additive_mask(text_mask, dtype), additive_mask(region_mask, dtype)
        for layer in self.layers:
            lang, visn = layer(lang, lang_mask, visn, visn_mask)[:2]
        return torch.tanh(self.pooler(lang[:, 0]))
