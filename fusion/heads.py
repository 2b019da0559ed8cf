"""Task heads on top of a fusion model's pooled output."""

from __future__ import annotations

import torch
from torch import nn


class ClassifierHead(nn.Module):
    """LXMERT's answer head: Linear(d, 2h) - GeLU - LayerNorm - Linear(2h, n).

    For NLVR2 the input is the two pooled outputs concatenated (d = 2h), as in LXMERT."""

    def __init__(self, in_dim: int, hidden: int, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden, eps=1e-12),
            nn.Linear(hidden, num_outputs),
        )

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: B, D -> logits B, N."""
        return self.net(pooled)
