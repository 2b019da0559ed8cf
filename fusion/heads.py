"""Task heads on top of a fusion model's pooled output."""

from __future__ import annotations

import torch
from torch import nn

from vlpipe.weights import WeightsError

# LXMERT's `logit_fc` Sequential (Linear, GeLU, LayerNorm, Linear) sits one index later in
# ClassifierHead.net, behind the Dropout at index 0.
LXMERT_HEAD_NAMES = {"logit_fc.0.": "net.1.", "logit_fc.2.": "net.3.", "logit_fc.3.": "net.4."}


class ClassifierHead(nn.Module):
    """LXMERT's answer head: Linear(d, 2h) - GeLU - LayerNorm - Linear(2h, n).

    For NLVR2 the input is the two pooled outputs concatenated (d = 2h), as in LXMERT. It starts
    as LXMERT's does (`init_bert_weights`): Linear weights N(0, 0.02), biases 0, LayerNorm 1 / 0.
    """

    def __init__(self, in_dim: int, hidden: int, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.LayerNorm(hidden, eps=1e-12),
            nn.Linear(hidden, num_outputs),
        )
        self.net.apply(bert_init)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        """pooled: B, D -> logits B, N."""
        return self.net(pooled)


@torch.no_grad()
def bert_init(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation of one module (apply it to a tree): Linear N(0, std) and zero bias,
    LayerNorm weight 1 and bias 0."""
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()


def head_names(state: dict[str, torch.Tensor], source: object) -> dict[str, torch.Tensor]:
    """An LXMERT answer head (`logit_fc.{0,2,3}.{weight,bias}`) under ClassifierHead's names;
    any other or missing tensor is an error naming `source` (the file)."""
    out = {}
    for key, value in state.items():
        prefix = next((p for p in LXMERT_HEAD_NAMES if key.startswith(p)), None)
        if prefix is None:
            raise WeightsError(f"{source}: {key} is not part of LXMERT's logit_fc answer head")
        out[LXMERT_HEAD_NAMES[prefix] + key.removeprefix(prefix)] = value
    lacking = sorted(
        f"logit_fc.{i}.{kind}"
        for i, ours in ((0, "net.1."), (2, "net.3."), (3, "net.4."))
        for kind in ("weight", "bias")
        if ours + kind not in out
    )
    if lacking:
        raise WeightsError(f"{source}: incomplete logit_fc answer head, lacks {lacking}")
    return out
