"""Official evaluation metrics for VQA v2, GQA and NLVR2, re-implemented in plain Python.

Each function follows the behaviour of the official evaluator, including its quirks, so numbers
computed here can be compared with published ones:

- VQA v2: GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py (the Python 3
  version, with ASCII contractions and the per-type averaging fix).
- GQA: the accuracy part of the official `eval.py` distributed with the GQA data set (exact
  string match against `answer`).
- NLVR2: lil-lab/nlvr, nlvr2/eval/metrics.py (accuracy, called "precision" there, and
  consistency).

The answer-normalisation primitives are shared with the BUTD/LXMERT training-target
preprocessing in `answers.py`, which uses the same tables.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

# Marks handled by process_punctuation. vqaEval.py and BUTD's compute_softscore.py use the same
# list; note that the apostrophe and colon are NOT in it, so "don't" keeps its apostrophe.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@")
_PUNCT += ("`", ",", "?", "!")

# vqaEval.py writes this as "(?!<=\d)(\.)(?!\d)": the first group is a typo for a lookbehind and
# is really a lookahead for the literal "<=", which can never match where a "." stands. The
# effective rule is therefore "drop every period that is not followed by a digit".
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
# vqaEval.py passes re.UNICODE as the third positional argument of sub(), which is `count`, so at
# most 32 (the flag's integer value) periods are stripped. Kept for exactness.
_PERIOD_STRIP_COUNT = 32
# A digit-comma-digit anywhere in the text ("1,000") switches every punctuation mark from
# "replace by a space" to "delete".
_COMMA_STRIP = re.compile(r"\d,\d")

_NUMBER_WORDS = {
    "none": "0",  # sic: the official map turns "none" into "0"
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table (vqaEval.py == BUTD compute_softscore.py), as key=value pairs.
# Entries whose key has a capital letter (Im, Ive, Id've, I'dve) can never fire because the text
# is lower-cased first, and somebody'd maps to "somebodyd"; both are kept as in the original.
_CONTRACTION_TABLE = """
    aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've
    couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't
    hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've
    he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've I'dve=I'd've Im=I'm
    Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
    mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've
    mustnt=mustn't mustve=must've neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't
    ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at shant=shan't shed've=she'd've
    she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've
    shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
    somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
    someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's
    somethingd=something'd somethingd've=something'd've something'dve=something'd've
    somethingll=something'll thats=that's thered=there'd thered've=there'd've
    there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
    they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't
    wed've=we'd've we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're
    whats=what's whatve=what've whens=when's whered=where'd wheres=where's whereve=where've
    whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's whove=who've
    whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
    wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll
    yall'd've=y'all'd've y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've
    you'dve=you'd've youll=you'll youre=you're youve=you've
"""
_CONTRACTIONS = dict(pair.split("=") for pair in _CONTRACTION_TABLE.split())

_MAX_IDS_IN_ERROR = 5


# --------------------------------------------------------------------------------------------
# Answer normalisation
# --------------------------------------------------------------------------------------------
def process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: remove or space out punctuation, strip periods.

    A mark is deleted when it touches a space somewhere in the text (or when the text holds a
    digit-comma-digit), otherwise it is replaced by a space: "black-and-white" -> "black and
    white", "1,000" -> "1000". The decision is taken on the original text, per mark.
    """
    delete_all = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in _PUNCT:
        if delete_all or f"{mark} " in text or f" {mark}" in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words to digits, drop articles, fix
    contractions, collapse whitespace."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(ans: str) -> str:
    """Normalise a predicted answer exactly as vqaEval.py does before matching it."""
    ans = ans.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(ans))


# --------------------------------------------------------------------------------------------
# VQA v2
# --------------------------------------------------------------------------------------------
def vqa_accuracy(pred: str, gt_answers: Sequence[str]) -> float:
    """Official per-question VQA accuracy in [0, 1].

    Mean over the leave-one-out subsets of the human answers of min(#matches / 3, 1). With 10
    annotators, k matching answers give 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, >=4.

    As in vqaEval.py, the prediction is fully normalised, but the human answers only go through
    process_punctuation, and only when they are not all identical: they are never lower-cased or
    mapped from number words (the released annotations are already in that form).
    """
    if len(gt_answers) == 0:
        raise ValueError("vqa_accuracy needs at least one ground-truth answer")
    pred = normalize_answer(pred)
    gts = list(gt_answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(gt) for gt in gts]
    hits = [gt == pred for gt in gts]
    total = sum(hits)
    # Leaving annotator i out removes their match (if any); summed in annotator order, as the
    # official loop does, so the float result is bit-identical.
    per_subset = [min(1, (total - hit) / 3) for hit in hits]
    return float(sum(per_subset)) / len(per_subset)


def vqa_evaluate(
    predictions: Mapping[str, str],
    answers: Mapping[str, Sequence[str]],
    answer_types: Mapping[str, str] | None = None,
) -> dict:
    """Official VQA evaluation over a set of questions.

    Returns {"overall": percent, "perAnswerType": {type: percent}, "n": count}, percentages
    rounded to 2 decimals as vqaEval.py does (its default n=2). Question ids are compared as
    strings. Like the official code (loadRes asserts, evaluate would raise KeyError), a
    prediction without ground truth or a question without prediction is an error.
    """
    preds = {str(qid): ans for qid, ans in predictions.items()}
    gts = {str(qid): list(anss) for qid, anss in answers.items()}
    _require_same_ids(preds, gts, what="question")
    # Iterate in ground-truth order, as the official code iterates over the annotation file.
    accs = {qid: vqa_accuracy(preds[qid], gt) for qid, gt in gts.items()}
    by_type = _group_by_type(accs, answer_types) if answer_types is not None else {}
    return {
        "overall": _percent_rounded(list(accs.values())),
        "perAnswerType": {t: _percent_rounded(v) for t, v in by_type.items()},
        "n": len(accs),
    }


def _percent_rounded(accs: list[float]) -> float:
    # Same operation order as vqaEval.setAccuracy: round(100 * sum / len, 2).
    return round(100 * float(sum(accs)) / len(accs), 2)


# --------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------
def gqa_evaluate(
    predictions: Mapping[str, str],
    answers: Mapping[str, str],
    answer_types: Mapping[str, str] | None = None,
) -> dict:
    """GQA accuracy: exact, case-sensitive string match, in percent (not rounded).

    As in the official eval.py, every question in `answers` needs a prediction and extra
    predictions are ignored; no normalisation is applied to either side. With `answer_types`
    the result also holds "perAnswerType" {type: percent} (easy-VQA: yes/no, color, shape).
    """
    preds = {str(qid): ans for qid, ans in predictions.items()}
    gold = {str(qid): ans for qid, ans in answers.items()}
    _require_covered(preds, gold, what="prediction")
    scores = {qid: 1.0 if preds[qid] == ans else 0.0 for qid, ans in gold.items()}
    out = {"accuracy": _percent(list(scores.values())), "n": len(scores)}
    if answer_types is not None:
        by_type = _group_by_type(scores, answer_types)
        out["perAnswerType"] = {t: _percent(v) for t, v in by_type.items()}
    return out


# --------------------------------------------------------------------------------------------
# NLVR2
# --------------------------------------------------------------------------------------------
def parse_nlvr2_label(value: bool | str | np.bool_) -> bool:
    """A label or prediction as a bool: accepts bools and "True"/"False" in any case.

    The official script compares lower-cased strings; anything else than true/false would
    silently count as wrong there, here it is an error.
    """
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"NLVR2 label must be a bool or 'True'/'False', got {value!r}")


def nlvr2_group(identifier: str) -> str:
    """Consistency group of an NLVR2 example: the identifier with its third field blanked.

    "dev-850-0-0" (split-set-pair-sentence) -> "dev-850--0": all image pairs that share the
    sentence, as in lil-lab/nlvr nlvr2/eval/metrics.py.
    """
    fields = identifier.split("-")
    if len(fields) < 3:
        raise ValueError(f"NLVR2 identifier {identifier!r} has fewer than 3 dash-separated fields")
    fields[2] = ""
    return "-".join(fields)


def nlvr2_evaluate(predictions: Mapping[str, bool | str], labels: Mapping[str, bool | str]) -> dict:
    """NLVR2 accuracy and consistency in percent (not rounded).

    Accuracy is over the examples in `labels`; consistency is the share of sentence groups (see
    nlvr2_group) whose examples are all predicted correctly. Every labelled example needs a
    prediction; extra predictions are ignored, as in the official script.
    """
    _require_covered(predictions, labels, what="prediction")
    correct: list[float] = []
    group_ok: dict[str, bool] = {}
    for identifier, label in labels.items():
        ok = parse_nlvr2_label(predictions[identifier]) == parse_nlvr2_label(label)
        correct.append(1.0 if ok else 0.0)
        group = nlvr2_group(identifier)
        group_ok[group] = group_ok.get(group, True) and ok
    consistent = [1.0 if ok else 0.0 for ok in group_ok.values()]
    return {"accuracy": _percent(correct), "consistency": _percent(consistent), "n": len(correct)}


# --------------------------------------------------------------------------------------------
# Shared checks
# --------------------------------------------------------------------------------------------
def _percent(scores: list[float]) -> float:
    if not scores:
        raise ValueError("nothing to evaluate: no ground-truth examples")
    return 100.0 * sum(scores) / len(scores)


def _some_ids(ids: Iterable[str]) -> str:
    """ "3 id(s): a, b, c" naming at most _MAX_IDS_IN_ERROR of them, for error messages."""
    ids = sorted(ids)
    more = ", ..." if len(ids) > _MAX_IDS_IN_ERROR else ""
    return f"{len(ids)} id(s): {', '.join(ids[:_MAX_IDS_IN_ERROR])}{more}"


def _group_by_type(scores: Mapping[str, float], types: Mapping) -> dict[str, list[float]]:
    """{type: [score, ...]} in the order of `scores`; every scored id needs a type."""
    types = {str(qid): t for qid, t in types.items()}
    _require_covered(types, scores, what="answer type")
    by_type: dict[str, list[float]] = {}
    for qid, score in scores.items():
        by_type.setdefault(types[qid], []).append(score)
    return by_type


def _require_covered(have: Mapping, need: Mapping, what: str) -> None:
    """Every key of `need` must be in `have`."""
    missing = need.keys() - have.keys()
    if missing:
        raise ValueError(f"missing {what} for {_some_ids(missing)}")


def _require_same_ids(preds: Mapping, gts: Mapping, what: str) -> None:
    if not gts:
        raise ValueError("nothing to evaluate: no ground-truth examples")
    _require_covered(preds, gts, what="prediction")
    extra = preds.keys() - gts.keys()
    if extra:
        raise ValueError(f"{what}s with a prediction but no ground truth: {_some_ids(extra)}")
