"""GQA metrics as the official eval.py computes them (the script distributed with the GQA data,
gqadataset.org; "Evaluation code for GQA").

eval.py iterates over a questions file, scores only questions with `isBalanced` (so an
all-questions file can be given: the others serve consistency), and reports:

- accuracy: exact, case-sensitive match of prediction and answer; binary / open: the same over
  questions whose structural type is / is not "query";
- validity and plausibility (with the choices file): the prediction is in the question's
  "valid" / "plausible" list ("Common" detailed types accept only color, material, shape);
- consistency (with --consistency): over balanced questions answered correctly, the accuracy
  on their entailed questions (itself excluded), averaged;
- distribution: a chi-square of predicted vs gold answer counts per global group, weighted by
  group size, divided by 100 (lower is better);
- accuracy per structural type, semantic type, reasoning steps and question length (words).

Averages are `float(sum(l)) / len(l) * 100` (0 for an empty list), in file order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vlpipe.errors import EvaluationError

from .common import mean, require_covered

METRIC = "GQA eval.py (gqadataset.org)"
_COMMON_GROUP = ("color", "material", "shape")  # eval.py belongs(): "Common" detailed types


@dataclass(frozen=True)
class GqaQuestion:
    """What eval.py reads of one question (None where the file lacks the field)."""

    answer: str
    balanced: bool = True
    structural: str | None = None
    semantic: str | None = None
    detailed: str | None = None
    group: str | None = None  # groups["global"]
    words: int = 0  # len(question.split())
    steps: int | None = None  # reasoning steps (data_manifests.gqa: eval.py getStepsNum)
    entailed: tuple[str, ...] = ()


@dataclass(frozen=True)
class GqaChoices:
    valid: frozenset[str]
    plausible: frozenset[str]


def gqa_evaluate(
    predictions: Mapping[str, str],
    questions: Mapping[str, GqaQuestion],
    choices: Mapping[str, GqaChoices] | None = None,
    consistency: bool | None = None,
) -> dict:
    """The official metrics in percent (distribution: chi-square / 100), not rounded.

    `questions` in file order. Every balanced question needs a prediction. Validity and
    plausibility are reported with `choices`. Consistency is computed when asked, or by default
    when every entailed question of the balanced ones is in `questions` (pass the
    all-questions file); it then needs a prediction for every question, as in eval.py."""
    balanced = {qid: q for qid, q in questions.items() if q.balanced}
    if not balanced:
        raise EvaluationError("nothing to evaluate: no balanced questions with an answer")
    require_covered(predictions, balanced, what="prediction")
    scores = {qid: 1.0 if predictions[qid] == q.answer else 0.0 for qid, q in balanced.items()}
    out: dict = {"metric": METRIC, "accuracy": _pct(scores.values())}
    out["binary"] = _pct(s for qid, s in scores.items() if balanced[qid].structural != "query")
    out["open"] = _pct(s for qid, s in scores.items() if balanced[qid].structural == "query")
    if choices is not None:
        out.update(_validity(predictions, balanced, choices))
    if _wants_consistency(questions, balanced, consistency, out):
        require_covered(predictions, questions, what="prediction (consistency)")
        out["consistency"] = _consistency(predictions, questions, balanced, scores)
    distribution = _distribution(predictions, balanced)
    if distribution is not None:
        out["distribution"] = distribution
    out.update(_breakdowns(balanced, scores))
    out["n"] = len(scores)
    return out


def _pct(scores) -> float:
    return mean(list(scores)) * 100


def _validity(predictions, balanced, choices) -> dict[str, float]:
    require_covered(choices, balanced, what="choices entry")
    valid, plausible = [], []
    for qid, q in balanced.items():
        common = q.detailed is not None and "Common" in q.detailed
        pred = predictions[qid]
        valid.append(1.0 if pred in (_COMMON_GROUP if common else choices[qid].valid) else 0.0)
        ok = pred in (_COMMON_GROUP if common else choices[qid].plausible)
        plausible.append(1.0 if ok else 0.0)
    return {"validity": _pct(valid), "plausibility": _pct(plausible)}


def _wants_consistency(questions, balanced, asked: bool | None, out: dict) -> bool:
    absent = {e for q in balanced.values() for e in q.entailed if e not in questions}
    if absent and asked:
        raise EvaluationError(
            f"consistency needs the entailed questions: {len(absent)} are not in the questions "
            "file (give the all-questions file, e.g. testdev_all_questions.json)"
        )
    if absent:
        out["notes"] = [
            f"consistency not computed: {len(absent)} entailed questions are not in the "
            "questions file (give the all-questions file)"
        ]
    return not absent if asked is None else asked


def _consistency(predictions, questions, balanced, scores) -> float:
    per_question = []
    for qid, q in balanced.items():
        inferred = [e for e in q.entailed if e != qid]
        if scores[qid] and inferred:
            right = [1.0 if predictions[e] == questions[e].answer else 0.0 for e in inferred]
            per_question.append(mean(right))
    return _pct(per_question)


def _distribution(predictions, balanced) -> float | None:
    """eval.py chiSquare over global groups, / 100; None when no question has a group (where
    eval.py would divide by zero)."""
    gold: dict[str, dict[str, int]] = {}
    predicted: dict[str, dict[str, int]] = {}
    for qid, q in balanced.items():
        if q.group is not None:
            gold.setdefault(q.group, {}).setdefault(q.answer, 0)
            gold[q.group][q.answer] += 1
            counts = predicted.setdefault(q.group, {})
            counts[predictions[qid]] = counts.get(predictions[qid], 0) + 1
    sum_score, sum_overall = 0.0, 0
    for group, answers in gold.items():
        score, overall = 0.0, 0
        for answer, expected in answers.items():
            observed = predicted[group].get(answer, 0)
            score += float(observed - expected) ** 2 / expected
            overall += expected
        sum_score += score * overall
        sum_overall += overall
    return None if sum_overall == 0 else sum_score / sum_overall / 100


def _breakdowns(balanced, scores) -> dict[str, dict]:
    """{type: [accuracy, count]} per structural type, semantic type, steps and words."""
    fields = {
        "accuracyPerStructuralType": lambda q: q.structural,
        "accuracyPerSemanticType": lambda q: q.semantic,
        "accuracyPerSteps": lambda q: q.steps,
        "accuracyPerLength": lambda q: q.words,
    }
    out = {}
    for name, field in fields.items():
        groups: dict = {}
        for qid, q in balanced.items():
            if field(q) is not None:
                groups.setdefault(field(q), []).append(scores[qid])
        out[name] = {key: [_pct(v), len(v)] for key, v in groups.items()}
    return out
