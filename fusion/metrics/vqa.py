"""VQA v2 accuracy exactly as the official evaluator computes it, in either of its revisions,
and the label-score accuracy of LXMERT's own evaluator.

The official code is GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py
(Python 2). Its two revisions score human answers differently:

- "2021" (a013f00, 2021-03-11, "Fixed processing answers bug"; master, the default): every
  answer, human and predicted, has newlines and tabs turned into spaces and is stripped. When
  the humans disagree, all answers, the prediction included, are normalised (punctuation,
  lower case, number words, articles, contractions); when all humans agree, the prediction is
  compared as given (stripped only).
- "2016" (458a8b2, 2016-10-08; the numbers in papers before 2021): the prediction is always
  normalised; human answers are never stripped and only punctuation-processed, and only when
  they disagree.

Per question, accuracy is the mean over annotators i of min(1, #(other annotators whose answer
equals the prediction) / 3); "other" means every annotation record unequal to i's, which for the
released files (distinct answer_id) is everyone but i. Figures are rounded with Python 2's
`round` to 2 decimals; sums run in annotation-file order.

LXMERT's evaluator (airsplay/lxmert src/tasks/vqa_data.py, VQAEvaluator.evaluate) reads its
preprocessed json, which has no human answers: a prediction scores its soft label (0 when it is
not in the label dict), averaged over the questions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vlpipe.errors import ConfigError, EvaluationError

from .common import mean, naive_sum, py2_round, require_covered, require_same_ids

REVISIONS = {
    "2021": "vqaEval.py 2021 revision (GT-Vision-Lab/VQA a013f00, master)",
    "2016": "vqaEval.py 2016 revision (GT-Vision-Lab/VQA 458a8b2, before 2021)",
}
DEFAULT_REVISION = "2021"
LABEL_SCORE = "LXMERT label score (airsplay/lxmert VQAEvaluator: soft score of the prediction)"
DIGITS = 2  # vqaEval.py's default n

# Marks handled by process_punctuation, in the official order; the apostrophe and colon are not
# among them, so "don't" keeps its apostrophe.
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@")
_PUNCT += ("`", ",", "?", "!")

# The official patterns are byte-string patterns without re.UNICODE, so \d is ASCII-only there.
# "(?!<=\d)(\.)(?!\d)": the first group is a typo for a lookbehind and is really a lookahead for
# the literal "<=", which can never match where a "." stands: every period not followed by a
# digit goes.
_PERIOD_STRIP = re.compile(r"\.(?!\d)", re.ASCII)
# vqaEval.py passes re.UNICODE as the third positional argument of sub(), which is `count`: at
# most 32 (the flag's integer value) periods are stripped.
_PERIOD_STRIP_COUNT = 32
# A digit-comma-digit anywhere in the text ("1,000") switches every mark to deletion.
_COMMA_STRIP = re.compile(r"\d,\d", re.ASCII)

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
# Keys with a capital letter (Im, Ive, Id've, I'dve) never fire because the text is lower-cased
# first, and somebody'd maps to "somebodyd"; both are kept as in the original.
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

# Python 2's unicode.lower() uses the simple one-character case mapping; Python 3's str.lower()
# also applies the two context rules of SpecialCasing that matter here.
_PY2_LOWER_FIXES = str.maketrans({"\u0130": "i", "\u03a3": "\u03c3"})


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
    words = text.translate(_PY2_LOWER_FIXES).lower().split()
    words = [_NUMBER_WORDS.get(word, word) for word in words]
    words = [word for word in words if word not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(word, word) for word in words)


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, then strip: what both revisions do to the prediction."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(ans: str) -> str:
    """The full normalisation of an answer: whitespace, punctuation, then words."""
    return process_digit_article(process_punctuation(clean_whitespace(ans)))


# --------------------------------------------------------------------------------------------
# One question
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VqaQuestion:
    """What the official evaluator reads of one annotation.

    answers: the human answers as given, in annotator order.
    annotators: None when every annotation record is distinct (the released files: distinct
    answer_id); else one id per answer, equal ids marking records that are equal apart from
    their "answer" (the official leave-one-out removes every record equal to the one left out).
    """

    answers: tuple[str, ...]
    question_type: str = ""
    answer_type: str = ""
    annotators: tuple[int, ...] | None = None


def _compared(pred: str, answers: Sequence[str], revision: str) -> tuple[str, list[str]]:
    """The prediction and human answers in the form the revision compares them."""
    if revision == "2021":
        gts = [clean_whitespace(gt) for gt in answers]
        pred = clean_whitespace(pred)
        if len(set(gts)) > 1:
            gts = [process_digit_article(process_punctuation(gt)) for gt in gts]
            pred = process_digit_article(process_punctuation(pred))
        return pred, gts
    if revision == "2016":
        gts = list(answers)
        if len(set(gts)) > 1:
            gts = [process_punctuation(gt) for gt in gts]
        return normalize_answer(pred), gts
    raise ConfigError(f"unknown vqaEval.py revision {revision!r}; known: {sorted(REVISIONS)}")


def vqa_accuracy(
    pred: str,
    gt_answers: Sequence[str],
    revision: str = DEFAULT_REVISION,
    annotators: Sequence[int] | None = None,
) -> float:
    """Official per-question VQA accuracy in [0, 1] (unrounded).

    With 10 distinct annotators, k matching answers give 0.3, 0.6, 0.9, 1.0 for k = 1, 2, 3, 4+.
    """
    if len(gt_answers) == 0:
        raise EvaluationError("vqa_accuracy needs at least one ground-truth answer")
    pred, gts = _compared(pred, gt_answers, revision)
    hits = [gt == pred for gt in gts]
    if annotators is None:
        total = sum(hits)
        per_annotator = [min(1, (total - hit) / 3) for hit in hits]
    else:
        records = list(zip(annotators, gts, strict=True))
        per_annotator = [
            min(1, sum(other != rec and hit for other, hit in zip(records, hits, strict=True)) / 3)
            for rec in records
        ]
    # float(sum(gtAcc)) / len(gtAcc), summed in annotator order
    return naive_sum(per_annotator) / len(per_annotator)


# --------------------------------------------------------------------------------------------
# A set of questions
# --------------------------------------------------------------------------------------------
def vqa_evaluate(
    predictions: Mapping[str, str],
    questions: Mapping[str, VqaQuestion],
    revision: str = DEFAULT_REVISION,
    per_question: bool = False,
) -> dict:
    """Official VQA evaluation: {"metric", "overall", "perQuestionType", "perAnswerType", "n"}
    in percent, rounded as vqaEval.setAccuracy does; with `per_question`, also "perQuestion"
    {id: rounded percent} (the official evalQA). Iterates `questions` in its order (pass the
    annotation-file order). Question ids are strings; a prediction without ground truth or a
    question without prediction is an error, as in the official loadRes."""
    require_same_ids(predictions, questions)
    accs: dict[str, float] = {}
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    for qid, q in questions.items():
        acc = vqa_accuracy(predictions[qid], q.answers, revision, q.annotators)
        accs[qid] = acc
        by_qtype.setdefault(q.question_type, []).append(acc)
        by_atype.setdefault(q.answer_type, []).append(acc)
    out = {
        "metric": REVISIONS[revision],
        "overall": _rounded_percent(list(accs.values())),
        "perQuestionType": {t: _rounded_percent(v) for t, v in by_qtype.items()},
        "perAnswerType": {t: _rounded_percent(v) for t, v in by_atype.items()},
        "n": len(accs),
    }
    if per_question:
        out["perQuestion"] = {qid: py2_round(100 * acc, DIGITS) for qid, acc in accs.items()}
    return out


def _rounded_percent(accs: list[float]) -> float:
    # vqaEval.setAccuracy: round(100*float(sum(acc))/len(acc), n), in that operation order.
    return py2_round(100 * naive_sum(accs) / len(accs), DIGITS)


def label_score_evaluate(
    predictions: Mapping[str, str],
    labels: Mapping[str, Mapping[str, float]],
    answer_types: Mapping[str, str] | None = None,
) -> dict:
    """LXMERT's VQA / GQA evaluator over its preprocessed json: the mean soft label of the
    predictions, in percent (LXMERT prints `score * 100.`), not rounded. `answer_types` adds a
    per-type split computed the same way."""
    require_same_ids(predictions, labels)
    scores = {qid: float(label.get(predictions[qid], 0.0)) for qid, label in labels.items()}
    out = {"metric": LABEL_SCORE, "overall": mean(list(scores.values())) * 100.0}
    if answer_types is not None:
        require_covered(answer_types, scores, what="answer type")
        by_type: dict[str, list[float]] = {}
        for qid, score in scores.items():
            by_type.setdefault(answer_types[qid], []).append(score)
        out["perAnswerType"] = {t: mean(v) * 100.0 for t, v in by_type.items()}
    out["n"] = len(scores)
    return out
