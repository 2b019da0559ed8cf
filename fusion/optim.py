"""BertAdam, the optimiser of BERT and of LXMERT's fine-tuning recipes (`--optim bert`), and its
`warmup_linear` learning-rate schedule, so that those recipes can be reproduced exactly.

How it differs from AdamW (`torch.optim.AdamW`):
- no bias correction of the moment estimates;
- epsilon 1e-6 (AdamW: 1e-8), added to sqrt(v) as in Adam;
- the weight decay is added to the update of every parameter it is given, scaled by the
  scheduled learning rate: LXMERT passes `list(model.parameters())` as one group, so biases and
  LayerNorms decay too;
- `warmup_linear`: the step-k learning rate is lr * f(k / total), f(x) = x / warmup while
  x < warmup, then (1 - x) / (1 - warmup), so step 0 moves nothing.
LXMERT's copy of BertAdam (src/lxrt/optimization.py) has its per-parameter gradient clipping
commented out and clips the global norm at 5.0 before the step; the Trainer's `grad_clip` does
the same, so there is no clipping here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch.optim.lr_scheduler import LambdaLR


class BertAdam(torch.optim.Optimizer):
    """Adam without bias correction, with decoupled weight decay on the given parameters."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.01,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"BertAdam: lr {lr}, eps {eps}, weight_decay {weight_decay} < 0")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"BertAdam: betas {betas} must lie in [0, 1)")
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        if p.grad.is_sparse:
            raise RuntimeError("BertAdam does not support sparse gradients")
        state = self.state[p]
        if not state:
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        m, v, (beta1, beta2) = state["exp_avg"], state["exp_avg_sq"], group["betas"]
        m.mul_(beta1).add_(p.grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        update = m / (v.sqrt() + group["eps"])
        if group["weight_decay"] > 0:
            update += group["weight_decay"] * p
        # -(lr * update), not add_(update, alpha=-lr): the same rounding as the original
        p.add_(-(group["lr"] * update))


def warmup_linear(progress: float, warmup: float) -> float:
    """Learning-rate factor at `progress` = step / total steps (step counted from 0)."""
    if progress < warmup:
        return progress / warmup
    return max((progress - 1.0) / (warmup - 1.0), 0.0)


def warmup_linear_schedule(opt: torch.optim.Optimizer, total: int, warmup: float) -> LambdaLR:
    """BertAdam's schedule as a LambdaLR: optimiser step k runs at lr * warmup_linear(k / total);
    LXMERT computes the same factor inside BertAdam from its own step count."""
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup_linear needs a warm-up ratio in [0, 1), got {warmup}")
    return LambdaLR(opt, lambda step: warmup_linear(step / max(1, total), warmup))
