"""Time LXMERT training steps: vlpipe's LxmertFusion (SDPA attention) + a VQA head against
transformers' LxmertForQuestionAnswering with the same config, on the same random batches.

A step is forward + backward + AdamW step with BCE-with-logits on soft answer scores (LXMERT's
VQA loss). Both models start from the same weights (checked: their logits agree in eval mode).
Warm-up steps are not timed; each model is timed `--rounds` times, alternating, and the best
round counts, which keeps a busy machine's noise out of the ratio. --json PATH also writes the
figures as JSON.

    python benchmarks/train_lxmert.py                  # CPU: a small config, about a minute
    python benchmarks/train_lxmert.py --device cuda    # LXMERT-base: 768, 9/5/5, batch 32
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LxmertForQuestionAnswering

from vlpipe.fusion.lxmert import LxmertFusion, LxmertFusionConfig

# Full LXMERT-base on a GPU; on CPU a small config so the run takes about a minute.
DEFAULTS = {
    "cuda": dict(hidden=768, layers="9/5/5", batch=32, steps=20),
    "cpu": dict(hidden=256, layers="3/2/2", batch=16, steps=6),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, help="hidden size (heads = hidden / 64)")
    p.add_argument("--layers", help="language/relationship/cross layers, e.g. 9/5/5")
    p.add_argument("--batch", type=int)
    p.add_argument("--regions", type=int, default=36)
    p.add_argument("--feat-dim", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--answers", type=int, default=3129)
    p.add_argument("--steps", type=int, help="timed steps per round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for key, value in DEFAULTS[torch.device(args.device).type].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def fusion_config(args) -> LxmertFusionConfig:
    l_layers, r_layers, x_layers = (int(n) for n in args.layers.split("/"))
    return LxmertFusionConfig(
        l_layers=l_layers,
        r_layers=r_layers,
        x_layers=x_layers,
        hidden=args.hidden,
        heads=max(1, args.hidden // 64),
        intermediate=4 * args.hidden,
        visual_feat_dim=args.feat_dim,
    )


def vqa_head(hidden: int, answers: int) -> nn.Sequential:
    """LXMERT's answer head; the same layout (and indices) as transformers' logit_fc."""
    return nn.Sequential(
        nn.Linear(hidden, 2 * hidden),
        nn.GELU(),
        nn.LayerNorm(2 * hidden, eps=1e-12),
        nn.Linear(2 * hidden, answers),
    )


def random_batch(args, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """B questions of 8..tokens word pieces, `regions` boxes, ~3 soft-scored answers each."""
    b, n, k = args.batch, args.tokens, args.regions
    lengths = torch.randint(8, n + 1, (b,), generator=g)
    corner = torch.rand(b, k, 2, generator=g) * 0.7
    target = torch.zeros(b, args.answers)
    target.scatter_(1, torch.randint(0, args.answers, (b, 3), generator=g), 0.6)
    return {
        "text_ids": torch.randint(1, vocab, (b, n), generator=g),
        "text_mask": torch.arange(n)[None] < lengths[:, None],
        "region_feats": torch.rand(b, k, args.feat_dim, generator=g),
        "region_boxes": torch.cat([corner, corner + 0.3 * torch.rand(b, k, 2, generator=g)], -1),
        "region_mask": torch.ones(b, k, dtype=torch.bool),
        "target": target,
    }


def ours_logits(models, batch):
    fusion, head = models
    return head(fusion(**{k: batch[k] for k in fusion.needs}))


def theirs_logits(model, batch):
    return model(
        input_ids=batch["text_ids"],
        attention_mask=batch["text_mask"],
        visual_feats=batch["region_feats"],
        visual_pos=batch["region_boxes"],
        visual_attention_mask=batch["region_mask"],
    ).question_answering_score


def build(args, device):
    config = fusion_config(args)
    fusion, head = LxmertFusion(config), vqa_head(config.hidden, args.answers)
    lx = config.to_transformers()
    lx.num_qa_labels = args.answers
    theirs = LxmertForQuestionAnswering(lx)
    theirs.lxmert.load_state_dict(fusion.lxmert.state_dict())
    theirs.answer_head.logit_fc.load_state_dict(head.state_dict())
    ours = nn.ModuleList([fusion, head]).to(device)
    return ours, theirs.to(device), config


class Runner:
    """One model's training step (forward + loss + backward + AdamW) and its timing;
    `loss_fn(model, batch)` is the forward and the loss."""

    def __init__(self, name, model, loss_fn, args, device):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.args, self.device = args, device
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=5e-5)
        self.best = float("inf")
        self.peak_mb = 0.0

    def step(self, batch):
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.args.amp):
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def time_round(self, batches):
        self.model.train()
        for i in range(self.args.warmup):
            self.step(batches[i % len(batches)])
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        for i in range(self.args.steps):
            self.step(batches[i % len(batches)])
        self._sync()
        self.best = min(self.best, time.perf_counter() - start)
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20

    def samples_per_s(self) -> float:
        return self.args.steps * self.args.batch / self.best

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def vqa_loss(logits_fn):
    """LXMERT's VQA loss on a model's logits: BCE over the answers, scaled by their number."""

    def loss(model, batch):
        logits = logits_fn(model, batch).float()
        return F.binary_cross_entropy_with_logits(logits, batch["target"]) * logits.shape[1]

    return loss


def check_same_start(ours, theirs, batch) -> float:
    """Max |logit difference| in eval mode before any step: both must compute the same model."""
    with torch.no_grad():
        return (ours_logits(ours.eval(), batch) - theirs_logits(theirs.eval(), batch)).abs().max()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    ours, theirs, config = build(args, device)
    g = torch.Generator().manual_seed(args.seed)
    batches = [
        {k: v.to(device) for k, v in random_batch(args, config.vocab_size, g).items()}
        for _ in range(min(4, args.steps + args.warmup))
    ]
    diff = check_same_start(ours, theirs, batches[0])
    print(
        f"device {device} (threads {torch.get_num_threads()}), amp {args.amp}; hidden "
        f"{config.hidden}, heads {config.heads}, layers {args.layers}, batch {args.batch}, "
        f"regions {args.regions} x {args.feat_dim}, tokens {args.tokens}, answers "
        f"{args.answers}; {args.warmup} warm-up + {args.steps} timed steps x {args.rounds} "
        f"rounds; start logits max |diff| {diff:.2e}"
    )
    runners = [
        Runner("ours (LxmertFusion + SDPA)", ours, vqa_loss(ours_logits), args, device),
        Runner(
            "transformers LxmertForQuestionAnswering", theirs, vqa_loss(theirs_logits), args, device
        ),
    ]
    for _ in range(args.rounds):
        for runner in runners:
            runner.time_round(batches)
    report(runners, args, device, float(diff))


def report(runners: list[Runner], args, device: torch.device, diff: float) -> None:
    figures = {"config": {k: v for k, v in vars(args).items() if k != "json"}}
    for key, r in zip(("ours", "theirs"), runners, strict=True):
        memory = f", peak {r.peak_mb:.0f} MiB" if device.type == "cuda" else ""
        step_ms = 1000 * r.best / args.steps
        print(f"{r.name:42s} {r.samples_per_s():8.1f} samples/s ({step_ms:.0f} ms/step{memory})")
        figures[key] = {"samples_per_s": r.samples_per_s(), "ms_per_step": step_ms}
        if device.type == "cuda":
            figures[key]["peak_memory_mb"] = r.peak_mb
    ratio = runners[0].samples_per_s() / runners[1].samples_per_s()
    print(f"ratio ours/theirs: {ratio:.2f}")
    if args.json:
        figures.update(ratio=ratio, start_logits_max_diff=diff)
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
