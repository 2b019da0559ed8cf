"""NLVR2 accuracy and consistency as lil-lab/nlvr's nlvr2/eval/metrics.py computes them."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from vlpipe.errors import EvaluationError

from .common import require_covered

METRIC = "NLVR2 metrics.py (lil-lab/nlvr)"


def parse_nlvr2_label(value: bool | str | np.bool_) -> bool:
    """A label or prediction as a bool: accepts bools and "True"/"False" in any case.

    The official script compares lower-cased strings; anything else than true/false would
    silently count as wrong there, here it is an error.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise EvaluationError(f"NLVR2 label must be a bool or 'True'/'False', got {value!r}")


def nlvr2_group(identifier: str) -> str:
    """Consistency group of an NLVR2 example: the identifier with its third field blanked.

    "dev-850-0-0" (split-set-pair-sentence) -> "dev-850--0": all image pairs that share the
    sentence, as in metrics.py.
    """
    fields = identifier.split("-")
    if len(fields) < 3:
        raise EvaluationError(
            f"NLVR2 identifier {identifier!r} has fewer than 3 dash-separated fields"
        )
    fields[2] = ""
    return "-".join(fields)


def nlvr2_evaluate(predictions: Mapping[str, bool | str], labels: Mapping[str, bool | str]) -> dict:
    """Accuracy over the examples in `labels` and consistency (the share of sentence groups
    whose examples are all right), in percent: metrics.py's fractions times 100. Every
    labelled example needs a prediction; extra predictions are ignored."""
    if not labels:
        raise EvaluationError("nothing to evaluate: no ground-truth examples")
    require_covered(predictions, labels, what="prediction")
    num_correct = 0.0
    group_ok: dict[str, bool] = {}
    for identifier, label in labels.items():
        ok = parse_nlvr2_label(predictions[identifier]) == parse_nlvr2_label(label)
        num_correct += 1.0 if ok else 0.0
        group = nlvr2_group(identifier)
        group_ok[group] = group_ok.get(group, True) and ok
    consistent = float(sum(group_ok.values()))
    return {
        "metric": METRIC,
        "accuracy": num_correct / len(labels) * 100,
        "consistency": consistent / len(group_ok) * 100,
        "n": len(labels),
    }
