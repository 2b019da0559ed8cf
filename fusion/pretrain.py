"""LXMERT pre-training as a training objective: the trainer (fusion/train.py) runs it as it runs a
fine-tuning task, with the same checkpoints, exact resume, DDP and AMP.

The step's loss is the sum of the tasks' losses (pretrain_losses.py), each logged as
loss_<task>. Validation computes every loss on the held-out sentences (masked as in training,
with a fixed draw, so validations compare) and the QA score: the soft score of the answer the
model ranks first, as LXMERT's pre-training evaluator reports it. BEST follows the lowest
total validation loss, as the original's BEST_EVAL_LOSS_LXRT.pth does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from vlpipe import distributed
from vlpipe.fusion.pretrain_losses import pretrain_losses


class PretrainObjective:
    """The trainer's objective for `LxmertPretraining` on a `PretrainDataset`."""

    headline = "total"
    higher_is_better = False

    def __init__(self, tasks: Sequence[str]):
        self.parts = tuple(tasks)

    def examples(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["text_ids"])

    weight = examples  # micro-batches of a step weigh by their examples

    def losses(self, net, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = pretrain_losses(net(batch), batch)
        return sum(parts.values()), parts

    @torch.no_grad()
    def validate(self, model, data, batch_size, device, num_workers, dist) -> dict[str, Any]:
        """Each task's loss as one mean over the validation split (each rank a share, summed
        over ranks: see `_averaged_over`), their total, and the QA score in percent."""
        from vlpipe.fusion.train import _chunks, to_device

        info = dist or distributed.DistInfo()
        model.eval().to(device)
        indices = list(range(info.rank, len(data), info.world))
        counts = (f"{name}_n" for name in self.parts)
        sums = dict.fromkeys(("examples", "qa_examples", "qa_score", *self.parts, *counts), 0.0)
        for chunk, batch in zip(
            _chunks(indices, batch_size),
            data.loader(batch_size, indices, num_workers),
            strict=True,
        ):
            batch = to_device(batch, device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                heads = model(batch)
            for name, value in pretrain_losses(heads, batch).items():
                count = _averaged_over(name, batch)
                sums[name] += float(value) * count
                sums[f"{name}_n"] += count
            sums["examples"] += len(chunk)
            if "qa" in heads:
                self._qa_score(sums, heads["qa"].float().argmax(-1).tolist(), chunk, batch, data)
        return _results(_sum_over_ranks(info, sums), self.parts)

    @staticmethod
    def _qa_score(sums, predicted: list[int], chunk: list[int], batch, data) -> None:
        """Add the soft score of each predicted answer of the examples with a QA target."""
        for row, (index, answer) in enumerate(zip(chunk, predicted, strict=True)):
            if int(batch["qa_target"][row]) < 0:
                continue
            ids, scores = data.qa[index]
            sums["qa_examples"] += 1
            sums["qa_score"] += float(scores[ids == answer].max(initial=0.0))


def _averaged_over(task: str, batch: dict[str, torch.Tensor]) -> int:
    """What a task's batch loss is a mean over: masked tokens (mlm), examples with an answer
    (qa), examples (the others: their regions are K per example), so the validation loss is
    that mean over the whole split, whatever the batch size."""
    if task == "mlm":
        return int((batch["mlm_labels"] >= 0).sum())
    if task == "qa":
        return int((batch["qa_target"] >= 0).sum())
    return len(batch["text_ids"])


def _sum_over_ranks(info: distributed.DistInfo, sums: dict[str, float]) -> dict[str, float]:
    gathered = distributed.gather_dicts(info, {info.rank: sums})
    return {k: sum(part[k] for part in gathered.values()) for k in sums}


def _results(sums: dict[str, float], parts: tuple[str, ...]) -> dict[str, Any]:
    results: dict[str, Any] = {
        name: sums[name] / sums[f"{name}_n"] if sums[f"{name}_n"] else 0.0 for name in parts
    }
    results["total"] = float(np.sum([results[name] for name in parts]))
    results["examples"] = int(sums["examples"])
    if sums["qa_examples"]:
        results["qa_score"] = 100.0 * sums["qa_score"] / sums["qa_examples"]
    return results
