"""The four tasks: their targets, losses, predictions, official metrics and submission files.

vqa       BCE on soft scores (1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.0), VQA accuracy
gqa       softmax cross-entropy over the answer vocab, exact-match accuracy
nlvr2     two images per statement, 2-way cross-entropy, accuracy + consistency
easy-vqa  13-way cross-entropy, accuracy overall and per answer type (yes/no, color, shape)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vlpipe.data_manifests.base import TextRecord
from vlpipe.fusion import metrics, submission
from vlpipe.fusion.answers import AnswerVocab, preprocess_answer, target_scores

IGNORE = -100  # target of an example whose answer is outside the vocabulary


@dataclass(frozen=True)
class Task:
    name: str
    loss: str  # "bce" (soft scores) | "ce" (one class)
    images_per_example: int = 1
    fixed_answers: tuple[str, ...] | None = None
    min_count: int = 1

    def vocab_answer(self, rec: TextRecord) -> str:
        """The one answer per question the vocabulary is counted from."""
        if self.name == "vqa":
            mc = rec.extra.get("multiple_choice_answer")
            if mc:
                return preprocess_answer(mc)
            return max(self.scores(rec).items(), key=lambda kv: kv[1], default=("", 0))[0]
        return rec.answers[0] if rec.answers else ""

    def scores(self, rec: TextRecord) -> dict[str, float]:
        return dict(rec.label) if rec.label else target_scores(rec.answers)

    def targets(self, recs: Sequence[TextRecord], vocab: AnswerVocab) -> np.ndarray:
        if self.loss == "bce":
            return np.stack([vocab.encode_scores(self.scores(r)) for r in recs])
        index = [vocab.index(r.answers[0]) if r.answers else None for r in recs]
        return np.array([IGNORE if i is None else i for i in index], dtype=np.int64)

    def loss_fn(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.loss == "bce":
            # LXMERT scales the mean BCE by the number of answers (a sum over answers per example)
            return F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
        return F.cross_entropy(logits, target, ignore_index=IGNORE)

    def evaluate(self, preds: dict[str, str], recs: Sequence[TextRecord]) -> dict:
        """Official metric of predictions {key: answer string} against the records."""
        if self.name == "vqa":
            types = {r.key: r.extra.get("answer_type", "other") for r in recs}
            return metrics.vqa_evaluate(
                preds, {r.key: list(r.answers) or _label_answers(r) for r in recs}, types
            )
        if self.name == "nlvr2":
            return metrics.nlvr2_evaluate(preds, {r.key: r.answers[0] for r in recs})
        types = {r.key: r.extra["answer_type"] for r in recs if "answer_type" in r.extra}
        return metrics.gqa_evaluate(
            preds, {r.key: r.answers[0] for r in recs}, types if len(types) == len(recs) else None
        )

    def write_predictions(self, path: Path, preds: dict[str, str]) -> Path:
        writer = {
            "vqa": submission.write_vqa_submission,
            "gqa": submission.write_gqa_submission,
            "nlvr2": submission.write_nlvr2_predictions,
        }.get(self.name)
        if writer is None:  # easy-VQA has no official server: the GQA-style list is plain
            writer = submission.write_gqa_submission
        writer(path, preds)
        return path

    @property
    def submission_name(self) -> str:
        return {"nlvr2": "predictions.csv"}.get(self.name, "predictions.json")


def _label_answers(rec: TextRecord) -> list[str]:
    """LXMERT json has no raw answers: rebuild 10 pseudo-annotators from the soft scores, so that
    an answer with score 0.3/0.6/0.9/1.0 counts as given by 1/2/3/10 annotators."""
    count = {0.3: 1, 0.6: 2, 0.9: 3}
    answers: list[str] = []
    for ans, score in sorted(rec.label.items(), key=lambda kv: -kv[1]):
        answers += [ans] * count.get(round(score, 1), 10)
    return (answers + ["<none>"] * 10)[:10]


def _easy_vqa_answers() -> tuple[str, ...]:
    from vlpipe.data_manifests.easy_vqa import easy_vqa_answers

    return tuple(easy_vqa_answers())


def get_task(name: str) -> Task:
    if name == "vqa":
        return Task("vqa", "bce", min_count=9)
    if name == "gqa":
        return Task("gqa", "ce")
    if name == "nlvr2":
        return Task("nlvr2", "ce", images_per_example=2, fixed_answers=("False", "True"))
    if name == "easy-vqa":
        return Task("easy-vqa", "ce", fixed_answers=_easy_vqa_answers())
    raise ValueError(f"unknown task {name!r}; known: vqa, gqa, nlvr2, easy-vqa")


TASKS = ("vqa", "gqa", "nlvr2", "easy-vqa")
