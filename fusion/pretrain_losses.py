"""The losses of LXMERT's pre-training tasks, as the released code computes them
(airsplay/lxmert src/lxrt/modeling.py, LXRTPretraining.forward); the total is their unweighted
sum.

    mlm      cross-entropy over the vocabulary, mean over the masked tokens of the batch
    matched  2-way cross-entropy, mean over the batch
    obj/attr cross-entropy of every region (masked or not) against the detector's label,
             weighted by the detector's confidence, mean over B x K regions, x 1 / 0.15
    feat     SmoothL1 (beta 1) against the unmasked feature, mean over its dimensions, times
             the region's mask, mean over B x K regions, x 1 / 0.15
    qa       cross-entropy over the answer table, mean over the examples with an answer

Label fields (B = batch, L = tokens, K = regions): mlm_labels B, L (-1: not masked), matched B
(1: the image's own sentence), obj_labels / attr_labels B, K (-1: padding), obj_conf /
attr_conf B, K, feat_target B, K, D, feat_mask B, K, qa_target B (-1: no answer).
A term with nothing to average (no masked token, no answer in the batch) is 0, not NaN as in
the original. transformers' LxmertForPreTraining gives the same total with labels -100 for -1
and visual_loss_normalizer 1 / 0.15 (its default is 6.67).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

VISUAL_NORMALISER = 1 / 0.15  # the original's 1/0.15: visual terms weigh like the masked share
IGNORE = -1


def pretrain_losses(
    heads: dict[str, torch.Tensor],
    batch: dict[str, torch.Tensor],
    normaliser: float = VISUAL_NORMALISER,
) -> dict[str, torch.Tensor]:
    """{task: loss} for the tasks in `heads` (the model's outputs)."""
    losses = {}
    if "mlm" in heads:
        labels = batch["mlm_labels"]
        losses["mlm"] = _mean_ce(heads["mlm"], labels[labels != IGNORE])
    if "matched" in heads:
        losses["matched"] = F.cross_entropy(heads["matched"].float(), batch["matched"])
    for task in ("obj", "attr"):
        if task in heads:
            logits = heads[task].float().flatten(0, 1)
            ce = F.cross_entropy(
                logits, batch[f"{task}_labels"].flatten(), ignore_index=IGNORE, reduction="none"
            )
            losses[task] = (ce * batch[f"{task}_conf"].flatten()).mean() * normaliser
    if "feat" in heads:
        l1 = F.smooth_l1_loss(heads["feat"].float(), batch["feat_target"], reduction="none")
        losses["feat"] = (l1.mean(-1) * batch["feat_mask"]).mean() * normaliser
    if "qa" in heads:
        target = batch["qa_target"]
        labelled = target != IGNORE
        losses["qa"] = _mean_ce(heads["qa"][labelled], target[labelled])
    return losses


def _mean_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; 0 (still part of the graph) when there is nothing to average."""
    if not len(target):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), target)
