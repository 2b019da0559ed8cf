"""The transformer-exclusive concatenation model: image CLS (ViT) or pooled CNN feature,
concatenated with the text CLS (BERT): 768 + 768 = 1536-d for ViT-B/16 + BERT-base.

`LstmConcatFusion` is the same paper's ViT+LSTM variant: a trainable LSTM over word embeddings
replaces the cached BERT features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlpipe.tokenizer import BERT_VOCAB_SIZE


@dataclass
class ConcatConfig:
    image_dim: int = 768
    text_dim: int = 768
    normalize: bool = True  # LayerNorm each input: frozen features of two models differ in scale


class ConcatFusion(nn.Module):
    needs = ("image_cls", "text_cls")

    def __init__(self, config: ConcatConfig):
        super().__init__()
        self.config = config
        self.output_dim = config.image_dim + config.text_dim
        norm = config.normalize
        self.image_norm = nn.LayerNorm(config.image_dim) if norm else nn.Identity()
        self.text_norm = nn.LayerNorm(config.text_dim) if norm else nn.Identity()

    def forward(self, image_cls: torch.Tensor, text_cls: torch.Tensor) -> torch.Tensor:
        """image_cls: B, Dv; text_cls: B, Dt -> B, Dv + Dt."""
        return torch.cat([self.image_norm(image_cls), self.text_norm(text_cls)], dim=-1)


@dataclass
class LstmConcatConfig:
    image_dim: int = 768
    vocab_size: int = BERT_VOCAB_SIZE
    embed_dim: int = 300
    hidden: int = 768
    normalize: bool = True


class LstmConcatFusion(nn.Module):
    needs = ("image_cls", "text_ids", "text_mask")

    def __init__(self, config: LstmConcatConfig):
        super().__init__()
        self.config = config
        self.output_dim = config.image_dim + config.hidden
        self.embed = nn.Embedding(config.vocab_size, config.embed_dim, padding_idx=0)
        self.lstm = nn.LSTM(config.embed_dim, config.hidden, batch_first=True)
        self.image_norm = nn.LayerNorm(config.image_dim) if config.normalize else nn.Identity()

    def forward(
        self, image_cls: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor
    ) -> torch.Tensor:
        """image_cls: B, Dv; text_ids, text_mask: B, L -> B, Dv + H (last real token's state)."""
        lengths = text_mask.sum(1).clamp(min=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embed(text_ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, (h, _) = self.lstm(packed)
        return torch.cat([self.image_norm(image_cls), h[-1]], dim=-1)
