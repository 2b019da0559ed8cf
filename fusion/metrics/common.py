"""Arithmetic and id checks shared by the official metrics.

The official evaluators are plain Python loops; reproducing their printed figures to the last
digit means reproducing their arithmetic: left-to-right float sums (Python 3.12's `sum()` is
compensated, the evaluators ran on older Pythons), the same operation order, and for VQA the
rounding of Python 2's `round`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_UP, Decimal

from vlpipe.errors import EvaluationError

_MAX_IDS_IN_ERROR = 5


def naive_sum(values: Iterable[float]) -> float:
    """Left-to-right float sum, as `sum()` computed it before Python 3.12."""
    total = 0.0
    for value in values:
        total += value
    return total


def mean(values: list[float]) -> float:
    """`float(sum(l)) / len(l)`, 0 for an empty list (GQA eval.py `avg`)."""
    return naive_sum(values) / len(values) if values else 0.0


def py2_round(x: float, ndigits: int) -> float:
    """Python 2.7's `round(x, ndigits)`: the exact binary value of `x` rounded to `ndigits`
    decimals, halfway cases away from zero (Python 3 rounds them to even: round(0.125, 2) is
    0.12 there, 0.13 in Python 2). Non-halfway values round the same in both, e.g. 2.675 ->
    2.67 because the double nearest 2.675 lies below it."""
    quantum = Decimal(1).scaleb(-ndigits)
    return float(Decimal(x).quantize(quantum, rounding=ROUND_HALF_UP))


def some_ids(ids: Iterable[str]) -> str:
    """ "3 id(s): a, b, c" naming at most _MAX_IDS_IN_ERROR of them, for error messages."""
    ids = sorted(ids)
    more = ", ..." if len(ids) > _MAX_IDS_IN_ERROR else ""
    return f"{len(ids)} id(s): {', '.join(ids[:_MAX_IDS_IN_ERROR])}{more}"


def require_covered(have: Mapping, need: Iterable[str], what: str) -> None:
    """Every id of `need` must be in `have`."""
    missing = [key for key in need if key not in have]
    if missing:
        raise EvaluationError(f"missing {what} for {some_ids(missing)}")


def require_same_ids(preds: Mapping, gts: Mapping) -> None:
    """Predictions for exactly the ground-truth questions (vqaEval.py's loadRes asserts it)."""
    if not gts:
        raise EvaluationError("nothing to evaluate: no ground-truth examples")
    require_covered(preds, gts, what="prediction")
    extra = preds.keys() - gts.keys()
    if extra:
        raise EvaluationError(f"questions with a prediction but no ground truth: {some_ids(extra)}")


def exact_match_evaluate(
    predictions: Mapping[str, str],
    answers: Mapping[str, str],
    answer_types: Mapping[str, str] | None = None,
) -> dict:
    """Exact, case-sensitive string-match accuracy in percent (easy-VQA), with a per-type split
    when `answer_types` is given. Every question in `answers` needs a prediction; extra
    predictions are ignored."""
    if not answers:
        raise EvaluationError("nothing to evaluate: no ground-truth examples")
    require_covered(predictions, answers, what="prediction")
    scores = {qid: 1.0 if predictions[qid] == ans else 0.0 for qid, ans in answers.items()}
    out = {"metric": "exact match", "accuracy": mean(list(scores.values())) * 100, "n": len(scores)}
    if answer_types is not None:
        require_covered(answer_types, scores, what="answer type")
        by_type: dict[str, list[float]] = {}
        for qid, score in scores.items():
            by_type.setdefault(answer_types[qid], []).append(score)
        out["perAnswerType"] = {t: mean(v) * 100 for t, v in by_type.items()}
    return out
