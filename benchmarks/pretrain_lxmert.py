"""Time LXMERT pre-training steps: vlpipe's LxmertPretraining (SDPA attention, the vocabulary
projection only at masked tokens) + pretrain_losses against transformers' LxmertForPreTraining
with the same config and weights, on the same masked batches, all six tasks on.

A step is forward + the six losses + backward + AdamW. Before timing, both models' total
losses on the first batch are compared (eval mode, transformers' visual_loss_normalizer set to
LXMERT's 1 / 0.15). Batches: B sentences of 8..tokens word pieces, 15% of them masked,
`regions` regions with 15% masked, one detector label and attribute per region, half the
pairs mismatched, an answer for the matched ones (the label fields of pretrain_losses.py).
Timing as in train_lxmert.py: warm-up steps untimed, `--rounds` alternating rounds, the best
round counts.

    python benchmarks/pretrain_lxmert.py                  # CPU: a small config, about a minute
    python benchmarks/pretrain_lxmert.py --device cuda    # LXMERT-base: 768, 9/5/5, batch 32
"""

from __future__ import annotations

import torch
from train_lxmert import Runner, fusion_config, parse_args, report
from transformers import LxmertForPreTraining

from vlpipe.fusion.pretrain_losses import pretrain_losses
from vlpipe.fusion.pretrain_model import LxmertPretraining, PretrainModelConfig

OBJECTS, ATTRS = 1600, 400


def masked_batch(args, vocab: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    b, n, k = args.batch, args.tokens, args.regions
    lengths = torch.randint(8, n + 1, (b,), generator=g)
    text_mask = torch.arange(n)[None] < lengths[:, None]
    picked = (torch.rand(b, n, generator=g) < 0.15) & text_mask
    picked[:, 0] = False  # [CLS]
    ids = torch.randint(1000, vocab, (b, n), generator=g)
    corner = torch.rand(b, k, 2, generator=g) * 0.7
    feats = torch.rand(b, k, args.feat_dim, generator=g)
    feat_mask = (torch.rand(b, k, generator=g) < 0.15).float()
    matched = (torch.rand(b, generator=g) < 0.5).long()
    answers = torch.randint(0, args.answers, (b,), generator=g)
    return {
        "text_ids": torch.where(picked, torch.full_like(ids, 103), ids),
        "text_mask": text_mask,
        "mlm_labels": torch.where(picked, ids, torch.full_like(ids, -1)),
        "region_feats": feats * (1 - feat_mask[..., None]),
        "region_boxes": torch.cat([corner, corner + 0.3 * torch.rand(b, k, 2, generator=g)], -1),
        "region_mask": torch.ones(b, k, dtype=torch.bool),
        "feat_target": feats,
        "feat_mask": feat_mask,
        "obj_labels": torch.randint(0, OBJECTS, (b, k), generator=g),
        "obj_conf": torch.rand(b, k, generator=g),
        "attr_labels": torch.randint(0, ATTRS, (b, k), generator=g),
        "attr_conf": torch.rand(b, k, generator=g),
        "matched": matched,
        "qa_target": torch.where(matched == 1, answers, torch.full_like(answers, -1)),
    }


def ours_loss(model, batch):
    return sum(pretrain_losses(model(batch), batch).values())


def theirs_loss(model, batch):
    def hf(labels):  # transformers ignores -100, not LXMERT's -1
        return torch.where(labels < 0, torch.full_like(labels, -100), labels)

    return model(
        input_ids=batch["text_ids"],
        attention_mask=batch["text_mask"],
        visual_feats=batch["region_feats"],
        visual_pos=batch["region_boxes"],
        visual_attention_mask=batch["region_mask"],
        labels=hf(batch["mlm_labels"]),
        obj_labels={
            "obj": (batch["obj_labels"], batch["obj_conf"]),
            "attr": (batch["attr_labels"], batch["attr_conf"]),
            "feat": (batch["feat_target"], batch["feat_mask"]),
        },
        matched_label=batch["matched"],
        ans=hf(batch["qa_target"]),
    ).loss


def build(args, device):
    config = PretrainModelConfig(fusion_config(args), num_answers=args.answers)
    ours = LxmertPretraining(config)
    theirs = LxmertForPreTraining(config.to_transformers())
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    theirs.visual_loss_normalizer = 1 / 0.15  # LXMERT's; transformers' default is 6.67
    return ours.to(device), theirs.to(device), config


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    ours, theirs, config = build(args, device)
    g = torch.Generator().manual_seed(args.seed)
    vocab = config.backbone.vocab_size
    batches = [
        {k: v.to(device) for k, v in masked_batch(args, vocab, g).items()}
        for _ in range(min(4, args.steps + args.warmup))
    ]
    with torch.no_grad():
        a, b = ours_loss(ours.eval(), batches[0]), theirs_loss(theirs.eval(), batches[0])
    diff = abs(float(a) - float(b))
    print(
        f"device {device} (threads {torch.get_num_threads()}), amp {args.amp}; hidden "
        f"{config.backbone.hidden}, layers {args.layers}, batch {args.batch}, regions "
        f"{args.regions} x {args.feat_dim}, tokens {args.tokens}, answers {args.answers}; "
        f"{args.warmup} warm-up + {args.steps} timed steps x {args.rounds} rounds; start "
        f"total loss {float(a):.4f} vs {float(b):.4f} (|diff| {diff:.1e})"
    )
    runners = [
        Runner("ours (LxmertPretraining + SDPA)", ours, ours_loss, args, device),
        Runner("transformers LxmertForPreTraining", theirs, theirs_loss, args, device),
    ]
    for _ in range(args.rounds):
        for runner in runners:
            runner.time_round(batches)
    report(runners, args, device, diff)


if __name__ == "__main__":
    main()
