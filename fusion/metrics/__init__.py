"""Official evaluation metrics for VQA v2, GQA and NLVR2, re-implemented in plain Python.

Each module follows its official evaluator, quirks and arithmetic included, so the figures
printed here equal the official ones to the last digit:

- `vqa`: GT-Vision-Lab/VQA vqaEval.py, both revisions (2021 default, 2016), and LXMERT's
  label-score evaluator for its preprocessed json;
- `gqa`: the GQA eval.py (accuracy, binary / open, validity, plausibility, consistency,
  distribution, per-type / steps / length accuracy);
- `nlvr2`: lil-lab/nlvr nlvr2/eval/metrics.py (accuracy and consistency);
- `vcr`: rowanz/r2c models/eval_q2ar.py (Q->A, QA->R, Q->AR).

The answer-normalisation primitives are shared with the BUTD / LXMERT training-target
preprocessing in `answers.py`, which uses the same tables.
"""

from .common import exact_match_evaluate, py2_round
from .gqa import GqaChoices, GqaQuestion, gqa_evaluate
from .nlvr2 import nlvr2_evaluate, nlvr2_group, parse_nlvr2_label
from .vcr import vcr_evaluate
from .vqa import (
    DEFAULT_REVISION,
    REVISIONS,
    VqaQuestion,
    label_score_evaluate,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    vqa_accuracy,
    vqa_evaluate,
)

__all__ = [
    "DEFAULT_REVISION",
    "REVISIONS",
    "GqaChoices",
    "GqaQuestion",
    "VqaQuestion",
    "exact_match_evaluate",
    "gqa_evaluate",
    "label_score_evaluate",
    "nlvr2_evaluate",
    "vcr_evaluate",
    "nlvr2_group",
    "normalize_answer",
    "parse_nlvr2_label",
    "process_digit_article",
    "process_punctuation",
    "py2_round",
    "vqa_accuracy",
    "vqa_evaluate",
]
