"""BertAdam and warmup_linear, LXMERT's `--optim bert`: the defining properties, the Trainer and
preset wiring, and (when pytorch-pretrained-bert is installed) step-for-step equality with the
BertAdam that LXMERT copied (src/lxrt/optimization.py; there its internal clipping is commented
out, here `max_grad_norm=-1` turns it off)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from vlpipe.config import resolve
from vlpipe.fusion.optim import BertAdam, warmup_linear, warmup_linear_schedule
from vlpipe.fusion.train import TrainConfig, make_optimizer, make_schedule
from vlpipe.pipelines.configs import preset_layer


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))


def loss_of(net: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)
    return nn.functional.cross_entropy(net(x), y)


def test_warmup_linear_values():
    """x / warmup while x < warmup, then (x - 1) / (warmup - 1), floored at 0; step 0 is 0."""
    factors = [warmup_linear(k / 20, 0.1) for k in range(22)]
    assert factors[:3] == [0.0, 0.5, 1.0]
    assert factors[3] == pytest.approx(17 / 18) and factors[19] == pytest.approx(1 / 18)
    assert factors[20] == 0.0 and factors[21] == 0.0
    opt = BertAdam([nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_linear_schedule(opt, 20, 0.1)
    seen = []
    for _ in range(4):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.0, 1.0, 2.0, 2.0 * 17 / 18])


def test_first_step_has_no_bias_correction_and_decays_every_parameter():
    p = nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    p.grad = torch.tensor([0.3, -0.1, 0.0])
    lr, wd, eps = 0.1, 0.01, 1e-6
    before = p.detach().clone()
    BertAdam([p], lr=lr, weight_decay=wd).step()
    m, v = 0.1 * p.grad, 0.001 * p.grad**2  # (1 - beta1) g, (1 - beta2) g^2: not corrected
    expected = before - lr * (m / (v.sqrt() + eps) + wd * before)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)
    # with bias correction the step would be about lr * sign(g); here it is sqrt(1000) / 10 more
    assert (before - p.detach())[0] == pytest.approx(lr * (0.1 / math.sqrt(0.001) + wd), rel=1e-3)


def test_bertadam_config_is_one_group_over_all_parameters():
    net = tiny_net()
    opt = make_optimizer(net, TrainConfig(optimizer="bertadam", lr=1e-3))
    assert isinstance(opt, BertAdam) and len(opt.param_groups) == 1
    group = opt.param_groups[0]
    assert len(group["params"]) == len(list(net.parameters()))  # biases and LayerNorm included
    assert group["weight_decay"] == 0.01 and group["eps"] == 1e-6
    sched = make_schedule(opt, 10, 0.1, "bertadam")
    assert opt.param_groups[0]["lr"] == 0.0 and sched.lr_lambdas[0](1) == 1.0
    adamw = make_optimizer(net, TrainConfig())
    assert isinstance(adamw, torch.optim.AdamW) and len(adamw.param_groups) == 2
    with pytest.raises(ValueError, match="optimizer must be one of adamw, bertadam; got 'sgd'"):
        resolve(TrainConfig, {"optimizer": "sgd"})


def test_lxmert_presets_use_bertadam():
    for task in ("vqa", "gqa", "nlvr2"):
        name, layer = preset_layer(None, "lxmert", task)
        assert name == f"lxmert-{task}" and layer["optim"]["optimizer"] == "bertadam"
    assert preset_layer(None, "lxmert", "easy-vqa")[1]["optim"]["optimizer"] == "adamw"


@pytest.mark.filterwarnings("ignore:This overload of add_ is deprecated")
def test_equals_pytorch_pretrained_bert_step_for_step():
    reference = pytest.importorskip("pytorch_pretrained_bert.optimization")
    ours_net, ref_net = tiny_net(), tiny_net()
    steps = 20
    ref = reference.BertAdam(
        list(ref_net.parameters()), lr=0.05, warmup=0.1, t_total=steps, max_grad_norm=-1
    )
    ours = BertAdam(list(ours_net.parameters()), lr=0.05)
    sched = warmup_linear_schedule(ours, steps, 0.1)
    for step in range(steps):
        for net, opt in ((ref_net, ref), (ours_net, ours)):
            opt.zero_grad()
            loss_of(net, step).backward()
            nn.utils.clip_grad_norm_(net.parameters(), 5.0)  # LXMERT clips outside, at 5
        ref.step()
        ours.step()
        sched.step()
    start = tiny_net().parameters()
    moved = max((p - q).abs().max() for p, q in zip(ours_net.parameters(), start, strict=True))
    assert moved > 1e-3  # it trained
    for p, q in zip(ours_net.parameters(), ref_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_resume_restores_bertadam_state():
    net = tiny_net()
    opt = BertAdam(list(net.parameters()), lr=0.01)
    loss_of(net, 0).backward()
    opt.step()
    copy_net = copy.deepcopy(net)
    again = BertAdam(list(copy_net.parameters()), lr=0.01)
    again.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if through trainer.pt
    for net_, opt_ in ((net, opt), (copy_net, again)):
        opt_.zero_grad()
        loss_of(net_, 1).backward()
        opt_.step()
    for p, q in zip(net.parameters(), copy_net.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)
