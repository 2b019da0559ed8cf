"""VCR's three accuracies, as rowanz/r2c's models/eval_q2ar.py computes them: Q->A (the arg-max
answer is the right one), QA->R (the arg-max rationale, given the right answer, is the right
one) and Q->AR (both, per item), in percent."""

from __future__ import annotations

from collections.abc import Mapping

from vlpipe.errors import EvaluationError

from .common import mean, require_covered


def vcr_evaluate(
    predictions: Mapping[str, str], answers: Mapping[str, str], items: Mapping[str, tuple]
) -> dict:
    """predictions / answers: {record key: "0".."3"}; items: {annot_id: (answer record key,
    rationale record key)} of every item scored (both records labelled)."""
    if not items:
        raise EvaluationError("nothing to evaluate: no VCR item with both labels")
    require_covered(predictions, answers, what="prediction")
    hit = {key: predictions[key] == answer for key, answer in answers.items()}
    q2a = [hit[a] for a, _ in items.values()]
    qa2r = [hit[r] for _, r in items.values()]
    return {
        "metric": "VCR accuracy",
        "q2a": mean([float(h) for h in q2a]) * 100,
        "qa2r": mean([float(h) for h in qa2r]) * 100,
        "q2ar": mean([float(a and r) for a, r in zip(q2a, qa2r, strict=True)]) * 100,
        "n": len(items),
    }
