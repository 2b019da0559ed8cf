"""The four tasks: their targets, losses, predictions, official metrics and submission files.

vqa       BCE on soft scores (1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.0), VQA accuracy (vqaEval.py,
          2021 or 2016 revision), or LXMERT's label score on its preprocessed json
gqa       softmax cross-entropy over the answer vocab, the GQA eval.py metrics (or label score)
nlvr2     two images per statement, 2-way cross-entropy, accuracy + consistency
easy-vqa  13-way cross-entropy, accuracy overall and per answer type (yes/no, color, shape)
vcr       multiple choice: each of 4 candidates (question + answer_i, or question + answer +
          rationale_i) scored with the image, cross-entropy over the 4; Q->A, QA->R, Q->AR
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from vlpipe.data_manifests.base import TextRecord
from vlpipe.errors import ConfigError, EvaluationError
from vlpipe.fusion import metrics, submission
from vlpipe.fusion.answers import AnswerVocab, preprocess_answer, target_scores

if TYPE_CHECKING:
    import torch

IGNORE = -100  # target of an example whose answer is outside the vocabulary


@dataclass(frozen=True)
class EvalOptions:
    """How predictions are scored; set from the evaluation data and the user's choices.

    vqa_revision: the vqaEval.py revision for official VQA annotations (metrics.REVISIONS).
    label_scores: the annotations are LXMERT's json (soft labels, no human answers): a
        prediction scores its label, as LXMERT's evaluator computes.
    gqa_choices: GQA eval.py's choices file, for validity and plausibility.
    """

    vqa_revision: str = metrics.DEFAULT_REVISION
    label_scores: bool = False
    gqa_choices: Path | None = None

    def __post_init__(self) -> None:
        if self.vqa_revision not in metrics.REVISIONS:
            known = ", ".join(sorted(metrics.REVISIONS))
            raise ConfigError(f"unknown --vqa-eval revision {self.vqa_revision!r}; known: {known}")


@dataclass(frozen=True)
class Submission:
    """The prediction file the task's official evaluator / server reads."""

    name: str  # default file name in a run folder
    write: Callable[[Path, dict], None]
    read: Callable[[Path], dict]
    probabilities: bool = False  # `write` takes {key: probabilities}, not {key: answer}


_JSON_VQA = Submission(
    "predictions.json", submission.write_vqa_submission, submission.read_vqa_submission
)
# easy-VQA has no official server: the GQA-style list is the plain one
_JSON_GQA = Submission(
    "predictions.json", submission.write_gqa_submission, submission.read_gqa_submission
)
_CSV_NLVR2 = Submission(
    "predictions.csv", submission.write_nlvr2_predictions, submission.read_nlvr2_predictions
)
_CSV_VCR = Submission(
    "submission.csv", submission.write_vcr_submission, submission.read_vcr_submission, True
)


@dataclass(frozen=True)
class Task:
    """What a task is: its loss, answer rule, annotation format, evaluator and submission.

    answer_set: the fixed answers (a tuple, or a function giving them, for answers read from an
    installed package), or None when the vocabulary is counted from the training answers.
    choices: candidates per example of a multiple-choice task (each scored with the image;
    the answers are their indices), 0 for the others."""

    name: str
    loss: str  # "bce" (soft scores) | "ce" (one class)
    images_per_example: int = 1
    answer_set: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None
    min_count: int = 1
    default_format: str = ""
    submission: Submission = _JSON_GQA
    help: str = ""
    evaluation: EvalOptions = field(default_factory=EvalOptions)
    choices: int = 0

    @property
    def fixed_answers(self) -> tuple[str, ...] | None:
        return self.answer_set() if callable(self.answer_set) else self.answer_set

    @property
    def headline(self) -> str:
        """The key of the figure a run is judged by in `evaluate`'s result."""
        return {"vqa": "overall", "vcr": "q2ar"}.get(self.name, "accuracy")

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
        import torch.nn.functional as F  # noqa: N812 - lazy: the CLI reads this module for --help

        if self.loss == "bce":
            # LXMERT scales the mean BCE by the number of answers (a sum over answers per example)
            return F.binary_cross_entropy_with_logits(logits, target) * target.shape[1]
        return F.cross_entropy(logits, target, ignore_index=IGNORE)

    def loss_count(self, target: torch.Tensor) -> int:
        """How many examples `loss_fn`'s mean is over: every one (bce), those whose answer is in
        the vocabulary (ce: the others are IGNORE). Gradient accumulation weighs each
        micro-batch's loss by this, so a step's loss is the mean over the step's examples."""
        if self.loss == "bce":
            return len(target)
        return int((target != IGNORE).sum())

    def evaluate(self, preds: dict[str, str], recs: Sequence[TextRecord]) -> dict:
        """Official metric of predictions {key: answer string} against the labelled records,
        in record order (the annotation file's, which the official evaluators sum in)."""
        if self.name == "nlvr2":
            return metrics.nlvr2_evaluate(preds, {r.key: r.answers[0] for r in recs})
        if self.name == "vcr":
            return _vcr_evaluate(preds, recs)
        if self.evaluation.label_scores and self.name in ("vqa", "gqa"):
            result = metrics.label_score_evaluate(
                preds, {r.key: r.label for r in recs}, _types(recs, "answer_type")
            )
            return result if self.name == "vqa" else _renamed(result, "overall", "accuracy")
        if self.name == "vqa":
            questions = {r.key: _vqa_question(r) for r in recs}
            return metrics.vqa_evaluate(preds, questions, self.evaluation.vqa_revision)
        if self.name == "gqa":
            questions = {r.key: _gqa_question(r) for r in recs}
            return metrics.gqa_evaluate(preds, questions, self._gqa_choices())
        answers = {r.key: r.answers[0] for r in recs}
        return metrics.exact_match_evaluate(preds, answers, _types(recs, "answer_type"))

    def _gqa_choices(self) -> dict[str, metrics.GqaChoices] | None:
        if self.evaluation.gqa_choices is None:
            return None
        from vlpipe.data_manifests.gqa import read_gqa_choices

        table = read_gqa_choices(self.evaluation.gqa_choices)
        return {qid: metrics.GqaChoices(*sets) for qid, sets in table.items()}

    def write_predictions(self, path: Path, preds: dict[str, str]) -> Path:
        self.submission.write(path, preds)
        return path

    def read_predictions(self, path: Path) -> dict:
        return self.submission.read(path)

    @property
    def submission_name(self) -> str:
        return self.submission.name


def _vqa_question(rec: TextRecord) -> metrics.VqaQuestion:
    if not rec.answers:
        raise EvaluationError(f"question {rec.key} has no human answers to score against")
    return metrics.VqaQuestion(
        rec.answers,
        rec.extra.get("question_type", ""),
        rec.extra.get("answer_type", ""),
        rec.extra.get("annotators"),
    )


def _gqa_question(rec: TextRecord) -> metrics.GqaQuestion:
    x = rec.extra
    return metrics.GqaQuestion(
        answer=rec.answers[0],
        balanced=x.get("balanced", True),
        structural=x.get("structural"),
        semantic=x.get("semantic"),
        detailed=x.get("detailed"),
        group=x.get("group"),
        words=len(rec.text.split()),
        steps=x.get("steps"),
        entailed=x.get("entailed", ()),
    )


def _vcr_evaluate(preds: dict[str, str], recs: Sequence[TextRecord]) -> dict:
    """Q->A, QA->R and Q->AR over the items whose answer and rationale records are scored."""
    records: dict[str, dict[str, str]] = {}
    for rec in recs:
        records.setdefault(rec.extra["annot_id"], {})[rec.extra["mode"]] = rec.key
    items = {i: (r["answer"], r["rationale"]) for i, r in records.items() if len(r) == 2}
    answers = {r.key: r.answers[0] for r in recs}
    return metrics.vcr_evaluate(preds, answers, items)


def _types(recs: Sequence[TextRecord], name: str) -> dict[str, str] | None:
    """{key: type} when every record has the field, else None (no per-type split)."""
    types = {r.key: r.extra[name] for r in recs if name in r.extra}
    return types if len(types) == len(recs) else None


def _renamed(result: dict, old: str, new: str) -> dict:
    return {new if k == old else k: v for k, v in result.items()}


def _easy_vqa_answers() -> tuple[str, ...]:
    from vlpipe.data_manifests.easy_vqa import easy_vqa_answers

    return tuple(easy_vqa_answers())


TASKS: dict[str, Task] = {
    "vqa": Task(
        "vqa",
        "bce",
        min_count=9,
        default_format="vqa",
        submission=_JSON_VQA,
        help="VQA v2: BCE on soft scores, vqaEval.py accuracy",
    ),
    "gqa": Task("gqa", "ce", default_format="gqa", help="GQA: cross-entropy, GQA eval.py metrics"),
    "nlvr2": Task(
        "nlvr2",
        "ce",
        images_per_example=2,
        answer_set=("False", "True"),
        default_format="nlvr2",
        submission=_CSV_NLVR2,
        help="NLVR2: two images per statement, accuracy and consistency",
    ),
    "easy-vqa": Task(
        "easy-vqa",
        "ce",
        answer_set=_easy_vqa_answers,
        default_format="easy-vqa",
        help="easy-VQA (PyPI package): 13 answers, accuracy per answer type",
    ),
    "vcr": Task(
        "vcr",
        "ce",
        answer_set=("0", "1", "2", "3"),
        default_format="vcr",
        submission=_CSV_VCR,
        choices=4,
        help="VCR: 4-way multiple choice, Q->A, QA->R and Q->AR accuracy",
    ),
}


def get_task(name: str, evaluation: EvalOptions | None = None) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return dataclasses.replace(TASKS[name], evaluation=evaluation or EvalOptions())
