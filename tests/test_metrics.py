"""Hand-computed checks of the official metrics, soft targets, answer vocab and submission files.

Each expected value follows from the official evaluator's rules, worked out in the comments
(GT-Vision-Lab/VQA vqaEval.py at a013f00 and 458a8b2, GQA eval.py, lil-lab/nlvr metrics.py,
airsplay/lxmert VQAEvaluator). The same code was run side by side with those evaluators on
thousands of generated cases (docs/evaluation.md); these tests pin the rules that decide figures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlpipe.fusion.answers import AnswerVocab, preprocess_answer, soft_score, target_scores
from vlpipe.fusion.metrics import (
    VqaQuestion,
    exact_match_evaluate,
    label_score_evaluate,
    nlvr2_evaluate,
    nlvr2_group,
    normalize_answer,
    process_punctuation,
    py2_round,
    vqa_accuracy,
    vqa_evaluate,
)
from vlpipe.fusion.submission import (
    read_gqa_submission,
    read_nlvr2_predictions,
    read_vqa_submission,
    write_gqa_submission,
    write_nlvr2_predictions,
    write_vqa_submission,
)


# --------------------------------------------------------------------------------------------
# Normalisation (vqaEval.py processPunctuation + processDigitArticle)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("two", "2"),  # number word -> digit
        ("Ten", "10"),  # lower-cased before the number map
        ("none", "0"),  # the official map sends "none" to "0"
        ("a dog", "dog"),  # articles dropped
        ("The  Red\tCar\n", "red car"),  # whitespace collapsed, tab/newline are spaces
        ("yes.", "yes"),  # a period not followed by a digit goes
        ("1.5", "1.5"),  # a decimal point stays
        ("dont", "don't"),  # contraction restored (ASCII apostrophe)
        ("don't", "don't"),  # the apostrophe is not in the punctuation list
        ("1,000", "1000"),  # digit-comma-digit: punctuation deleted, not spaced
        ("red,blue", "red blue"),  # otherwise a mark becomes a space
        ("black-and-white", "black and white"),
        ("t - shirt", "t shirt"),  # "- " occurs, so "-" is deleted, spaces then collapse
        ("what?!", "what"),
        ("Im", "im"),  # capitalised keys in the table never fire after lower-casing
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_comma_rule_applies_to_all_marks() -> None:
    # A digit-comma-digit anywhere switches every mark to deletion: "x-y" would otherwise be "x y".
    assert process_punctuation("x-y 1,000") == "xy 1000"
    assert process_punctuation("x-y") == "x y"


# --------------------------------------------------------------------------------------------
# Per-question VQA accuracy
# --------------------------------------------------------------------------------------------
def _gts(k: int, answer: str = "cat", other: str = "dog") -> list[str]:
    """10 human answers of which k are `answer`."""
    return [answer] * k + [other] * (10 - k)


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        # Leaving out one of the k matches leaves k-1, leaving out a non-match leaves k:
        # acc = (k * min(1, (k-1)/3) + (10-k) * min(1, k/3)) / 10
        (0, 0.0),
        (1, 0.3),  # (1*0 + 9*(1/3)) / 10 = 3/10
        (2, 0.6),  # (2*(1/3) + 8*(2/3)) / 10 = 6/10
        (3, 0.9),  # (3*(2/3) + 7*1) / 10 = 9/10
        (4, 1.0),  # (4*1 + 6*1) / 10
        (10, 1.0),
    ],
)
def test_vqa_accuracy_leave_one_out(k: int, expected: float) -> None:
    assert vqa_accuracy("cat", _gts(k)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    ("pred", "humans", "acc_2021", "acc_2016"),
    [
        # All humans agree: 2021 compares the prediction as given (stripped only), 2016
        # normalises it.
        ("two", ["2"] * 10, 0.0, 1.0),
        ("Yes", ["yes"] * 10, 0.0, 1.0),
        ("yes.", ["yes"] * 10, 0.0, 1.0),
        (" yes\n", ["yes"] * 10, 1.0, 1.0),
        # Humans disagree: 2021 normalises their answers too (lower case, numbers, articles),
        # 2016 only processes their punctuation.
        ("dog", ["Dog"] * 9 + ["cat"], 1.0, 0.0),
        ("2", ["two"] * 9 + ["cat"], 1.0, 0.0),
        ("dog", ["a dog"] * 9 + ["cat"], 1.0, 0.0),
        ("yes", ["yes."] * 9 + ["no"], 1.0, 1.0),
        # 2021 strips human answers before deciding whether they agree.
        ("yes", ["yes "] * 5 + ["yes"] * 5, 1.0, pytest.approx(1.0)),
        ("Yes", ["yes "] * 5 + ["yes"] * 5, 0.0, pytest.approx(1.0)),
    ],
)
def test_vqa_accuracy_per_revision(pred, humans, acc_2021, acc_2016) -> None:
    assert vqa_accuracy(pred, humans, "2021") == acc_2021
    assert vqa_accuracy(pred, humans, "2016") == acc_2016


def test_vqa_2016_keeps_unstripped_human_answers() -> None:
    # 2016: "yes " != "yes"; 5 of 10 humans match -> min(1, 5/3) or min(1, 4/3) = 1 for all.
    assert vqa_accuracy("yes", ["yes "] * 9 + ["yes"], "2016") == pytest.approx(0.3)


def test_vqa_accuracy_leave_one_out_removes_equal_records() -> None:
    # vqaEval.py leaves out every record equal to annotator i's. Three identical "cat" records
    # (same answer_id and confidence): leaving one out drops all three -> 0 for them, 3/3 -> 1
    # for the seven "dog" annotators: 7/10. Distinct records would give 0.9.
    humans = ["cat"] * 3 + ["dog"] * 7
    assert vqa_accuracy("cat", humans) == pytest.approx(0.9)
    assert vqa_accuracy("cat", humans, annotators=(0, 0, 0, 3, 4, 5, 6, 7, 8, 9)) == 0.7


def test_vqa_unknown_revision_is_refused() -> None:
    with pytest.raises(ValueError, match="2019"):
        vqa_accuracy("yes", ["yes"] * 10, "2019")


def test_vqa_accuracy_needs_answers() -> None:
    with pytest.raises(ValueError):
        vqa_accuracy("yes", [])


# --------------------------------------------------------------------------------------------
# VQA evaluation over questions
# --------------------------------------------------------------------------------------------
def _questions(answers: dict, qtypes: dict | None = None, atypes: dict | None = None) -> dict:
    return {
        qid: VqaQuestion(
            tuple(a), (qtypes or {}).get(qid, "what"), (atypes or {}).get(qid, "other")
        )
        for qid, a in answers.items()
    }


def test_vqa_evaluate_overall_per_answer_and_question_type() -> None:
    answers = {"1": ["yes"] * 10, "2": _gts(1), "3": _gts(2), "4": ["3"] * 10}
    atypes = {"1": "yes/no", "2": "other", "3": "other", "4": "number"}
    qtypes = {"1": "is the", "2": "what is", "3": "what is", "4": "how many"}
    preds = {"1": "yes", "2": "cat", "3": "bird", "4": "3"}
    # per question: 1.0, 0.3, 0.0, 1.0 -> overall 100 * 2.3 / 4 = 57.5
    # other: (0.3 + 0.0) / 2 = 15.0; yes/no 100.0; number 100.0
    result = vqa_evaluate(preds, _questions(answers, qtypes, atypes), per_question=True)
    assert result["overall"] == 57.5 and result["n"] == 4
    assert result["perAnswerType"] == {"yes/no": 100.0, "other": 15.0, "number": 100.0}
    assert result["perQuestionType"] == {"is the": 100.0, "what is": 15.0, "how many": 100.0}
    assert result["perQuestion"] == {"1": 100.0, "2": 30.0, "3": 0.0, "4": 100.0}
    assert result["metric"].startswith("vqaEval.py 2021 revision")
    assert vqa_evaluate(preds, _questions(answers), "2016")["metric"].startswith("vqaEval.py 2016")


def test_vqa_evaluate_rounds_to_two_decimals() -> None:
    # 100 * (1.0 + 0.3 + 0.0) / 3 = 43.333... -> 43.33
    answers = {"1": ["yes"] * 10, "2": _gts(1), "3": _gts(0)}
    result = vqa_evaluate({"1": "yes", "2": "cat", "3": "cat"}, _questions(answers))
    assert result["overall"] == 43.33


def test_vqa_evaluate_rounds_halves_away_from_zero_as_python2() -> None:
    # 1 right of 32: 100 * 1 / 32 = 3.125 exactly. Python 2's round gives 3.13; Python 3's
    # round(3.125, 2) would give 3.12.
    answers = {str(i): ["yes"] * 10 for i in range(32)}
    preds = {qid: "yes" if qid == "0" else "no" for qid in answers}
    assert vqa_evaluate(preds, _questions(answers))["overall"] == 3.13
    assert round(3.125, 2) == 3.12


@pytest.mark.parametrize(
    ("x", "expected"),
    [
        (0.125, 0.13),
        (0.375, 0.38),
        (2.675, 2.67),
        (12.125, 12.13),
        (43.3333, 43.33),
        (-0.125, -0.13),
    ],
)
def test_py2_round(x: float, expected: float) -> None:
    # 2.675 is stored as 2.67499999...: not a halfway case, it rounds down in Python 2 too.
    assert py2_round(x, 2) == expected


def test_vqa_evaluate_id_mismatch_names_ids() -> None:
    answers = _questions({str(i): ["yes"] * 10 for i in range(10)})
    preds = {str(i): "yes" for i in range(3)}  # 7 questions without prediction
    with pytest.raises(ValueError, match=r"7 id\(s\): 3, 4, 5, 6, 7, \.\.\.") as info:
        vqa_evaluate(preds, answers)
    assert "8" not in str(info.value)  # only 5 ids named
    few = _questions({str(i): ["yes"] * 10 for i in range(3)})
    with pytest.raises(ValueError, match="no ground truth.*99"):
        vqa_evaluate({**preds, "99": "no"}, few)


def test_lxmert_label_score() -> None:
    # airsplay/lxmert VQAEvaluator: score += label[ans] if ans in label; score / len.
    labels = {"1": {"yes": 1.0}, "2": {"cat": 0.6, "dog": 0.3}, "3": {}, "4": {"red": 0.9}}
    preds = {"1": "yes", "2": "dog", "3": "yes", "4": "blue"}
    types = {"1": "yes/no", "2": "other", "3": "yes/no", "4": "other"}
    result = label_score_evaluate(preds, labels, types)
    assert result["overall"] == (1.0 + 0.3) / 4 * 100.0
    assert result["perAnswerType"] == {"yes/no": 50.0, "other": 0.3 / 2 * 100.0}
    assert result["n"] == 4 and "label score" in result["metric"]


# --------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------
def test_exact_match() -> None:
    answers = {"a": "yes", "b": "traffic light", "c": "no", "d": "2"}
    # "Yes" and "two" would match under VQA normalisation, not under exact match.
    preds = {"a": "Yes", "b": "traffic light", "c": "no", "d": "two", "extra": "ignored"}
    assert exact_match_evaluate(preds, answers) == {
        "metric": "exact match",
        "accuracy": 50.0,
        "n": 4,
    }
    with pytest.raises(ValueError, match="missing prediction.*c"):
        exact_match_evaluate({"a": "yes", "b": "x", "d": "2"}, answers)


def test_exact_match_per_answer_type() -> None:
    answers = {"a": "yes", "b": "red", "c": "no", "d": "circle"}
    preds = {"a": "yes", "b": "blue", "c": "yes", "d": "circle"}
    types = {"a": "yes/no", "b": "color", "c": "yes/no", "d": "shape"}
    result = exact_match_evaluate(preds, answers, types)
    assert result["accuracy"] == 50.0
    assert result["perAnswerType"] == {"yes/no": 50.0, "color": 0.0, "shape": 100.0}
    with pytest.raises(ValueError, match="missing answer type.*d"):
        exact_match_evaluate(preds, answers, {k: v for k, v in types.items() if k != "d"})


# --------------------------------------------------------------------------------------------
# NLVR2
# --------------------------------------------------------------------------------------------
def test_nlvr2_group_blanks_the_pair_field() -> None:
    assert nlvr2_group("dev-850-0-0") == "dev-850--0"
    assert nlvr2_group("test1-12-3-1") == "test1-12--1"


def test_nlvr2_accuracy_and_consistency() -> None:
    labels = {
        # sentence group "dev-1--0"
        "dev-1-0-0": "True",
        "dev-1-1-0": "False",
        "dev-1-2-0": True,
        # sentence group "dev-2--1"
        "dev-2-0-1": False,
        "dev-2-1-1": "True",
    }
    preds = {
        "dev-1-0-0": True,
        "dev-1-1-0": "false",
        "dev-1-2-0": "TRUE",
        "dev-2-0-1": False,
        "dev-2-1-1": False,  # the only mistake: breaks group dev-2--1
    }
    # accuracy 4/5 = 80.0; consistency: 1 of 2 groups fully right = 50.0
    result = nlvr2_evaluate(preds, labels)
    assert (result["accuracy"], result["consistency"], result["n"]) == (80.0, 50.0, 5)


def test_nlvr2_groups_by_sentence_not_by_pair() -> None:
    # Same image pair (third field), different sentences (fourth field): two groups.
    labels = {"dev-5-0-0": True, "dev-5-0-1": True}
    preds = {"dev-5-0-0": True, "dev-5-0-1": False}
    assert nlvr2_evaluate(preds, labels)["consistency"] == 50.0


def test_nlvr2_rejects_bad_labels_and_missing_predictions() -> None:
    with pytest.raises(ValueError):
        nlvr2_evaluate({"dev-1-0-0": "yes"}, {"dev-1-0-0": True})
    with pytest.raises(ValueError, match="dev-1-1-0"):
        nlvr2_evaluate({"dev-1-0-0": True}, {"dev-1-0-0": True, "dev-1-1-0": True})


# --------------------------------------------------------------------------------------------
# Soft targets and answer vocabulary
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("count", "score"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0)])
def test_soft_score(count: int, score: float) -> None:
    assert soft_score(count) == score


def test_soft_score_saturates_and_rejects_negative() -> None:
    assert soft_score(10) == 1.0
    with pytest.raises(ValueError):
        soft_score(-1)


def test_target_scores_normalise_then_count() -> None:
    humans = ["Yes", "yes.", "yes", "yes", "yes", "two", "2", "a dog", "dog", "cat"]
    # yes x5 -> 1.0; "two"/"2" -> 2 x "2" -> 0.6; "a dog"/"dog" -> 0.6; cat -> 0.3
    assert target_scores(humans) == {"yes": 1.0, "2": 0.6, "dog": 0.6, "cat": 0.3}


def test_preprocess_answer_matches_butd() -> None:
    assert preprocess_answer("The Two Dogs!") == "2 dogs"
    assert preprocess_answer("10,000") == "10000"


def test_vocab_build_filters_and_orders() -> None:
    per_question = ["yes"] * 3 + ["no"] * 3 + ["2"] * 2 + ["cat"]
    vocab = AnswerVocab.build(per_question, min_count=2)
    # count descending, ties alphabetical; "cat" (1 question) is below min_count
    assert vocab.to_json() == ["no", "yes", "2"]
    assert len(vocab) == 3
    assert vocab.index("yes") == 1
    assert vocab.index("cat") is None
    assert vocab.answer(2) == "2"
    assert len(AnswerVocab.build(per_question, min_count=3)) == 2


def test_vocab_json_round_trip_and_encode() -> None:
    vocab = AnswerVocab.build(["b", "a", "a", "c", "c", "c"], min_count=1)
    restored = AnswerVocab.from_json(json.loads(json.dumps(vocab.to_json())))
    assert restored.answers == ["c", "a", "b"]
    assert [restored.index(a) for a in "abc"] == [1, 2, 0]
    target = restored.encode_scores({"a": 0.3, "c": 1.0, "unknown": 0.9})
    assert target.dtype == np.float32
    np.testing.assert_array_equal(target, np.array([1.0, 0.3, 0.0], dtype=np.float32))


def test_vocab_rejects_duplicates_and_non_lists() -> None:
    with pytest.raises(ValueError):
        AnswerVocab.from_json(["yes", "no", "yes"])
    with pytest.raises(ValueError):
        AnswerVocab.from_json({"yes": 0})


# --------------------------------------------------------------------------------------------
# Submission files
# --------------------------------------------------------------------------------------------
def test_vqa_submission_round_trip(tmp_path) -> None:
    path = tmp_path / "vqa.json"
    write_vqa_submission(path, {"1": "yes", "22": "2"})
    assert json.loads(path.read_text()) == [
        {"question_id": 1, "answer": "yes"},
        {"question_id": 22, "answer": "2"},
    ]
    assert read_vqa_submission(path) == {"1": "yes", "22": "2"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vqa.json"]  # no temp file left


def test_gqa_submission_round_trip(tmp_path) -> None:
    path = tmp_path / "gqa.json"
    write_gqa_submission(path, {"201": "no", "n5": "traffic light"})
    assert json.loads(path.read_text()) == [
        {"questionId": "201", "prediction": "no"},
        {"questionId": "n5", "prediction": "traffic light"},
    ]
    assert read_gqa_submission(path) == {"201": "no", "n5": "traffic light"}


def test_nlvr2_predictions_round_trip(tmp_path) -> None:
    path = tmp_path / "nlvr2.csv"
    path.write_text("stale content that must be replaced\n")
    write_nlvr2_predictions(path, {"dev-1-0-0": True, "dev-1-1-0": "false"})
    assert path.read_text() == "dev-1-0-0,True\ndev-1-1-0,False\n"
    assert read_nlvr2_predictions(path) == {"dev-1-0-0": True, "dev-1-1-0": False}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nlvr2.csv"]


def test_readers_reject_malformed_files(tmp_path) -> None:
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("dev-1-0-0,True\ndev-1-1-0\n")
    with pytest.raises(ValueError, match="bad.csv:2"):
        read_nlvr2_predictions(bad_csv)
    dup = tmp_path / "dup.json"
    dup.write_text(json.dumps([{"question_id": 1, "answer": "a"}] * 2))
    with pytest.raises(ValueError, match="duplicate"):
        read_vqa_submission(dup)
    wrong_keys = tmp_path / "keys.json"
    wrong_keys.write_text(json.dumps([{"question_id": "1", "prediction": "a"}]))
    with pytest.raises(ValueError):
        read_gqa_submission(wrong_keys)


# --------------------------------------------------------------------------------------------
# What the readers keep for the official evaluators
# --------------------------------------------------------------------------------------------
def _vqa_files(tmp_path, answer_records):
    questions = [{"image_id": 1, "question": "q?", "question_id": i} for i in (1, 2, 3)]
    anns = [
        {
            "question_id": qid,
            "image_id": 1,
            "question_type": "what",
            "answer_type": "other",
            "multiple_choice_answer": "cat",
            "answers": answer_records,
        }
        for qid in (3, 1, 2)  # another order than the questions'
    ]
    (tmp_path / "q.json").write_text(json.dumps({"questions": questions}))
    (tmp_path / "a.json").write_text(json.dumps({"annotations": anns}))
    return tmp_path / "q.json", tmp_path / "a.json"


def test_vqa_records_follow_the_annotation_order(tmp_path) -> None:
    from vlpipe.data_manifests.vqa import read_vqa

    records = [{"answer": "cat", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]
    q, a = _vqa_files(tmp_path, records)
    assert [r.key for r in read_vqa(q, a)] == ["3", "1", "2"]  # vqaEval.py sums in this order
    assert [r.key for r in read_vqa(q)] == ["1", "2", "3"]
    assert all("annotators" not in r.extra for r in read_vqa(q, a))  # distinct answer_ids


def test_vqa_reader_marks_equal_answer_records(tmp_path) -> None:
    from vlpipe.data_manifests.vqa import read_vqa
    from vlpipe.fusion.tasks import get_task

    same = {"answer_confidence": "yes", "answer_id": 1}
    records = [dict(same, answer="cat")] * 3
    records += [{"answer": "dog", "answer_confidence": "yes", "answer_id": i} for i in range(4, 11)]
    q, a = _vqa_files(tmp_path, records)
    recs = read_vqa(q, a)
    assert recs[0].extra["annotators"] == (0, 0, 0, 3, 4, 5, 6, 7, 8, 9)
    result = get_task("vqa").evaluate({r.key: "cat" for r in recs}, recs)
    assert result["overall"] == 70.0  # see test_vqa_accuracy_leave_one_out_removes_equal_records


def test_lxmert_empty_label_is_scored(tmp_path) -> None:
    from vlpipe.data_manifests.lxmert import read_lxmert
    from vlpipe.fusion.tasks import EvalOptions, get_task

    items = [
        {"question_id": 1, "img_id": "COCO_val2014_000000000001", "sent": "q?", "label": {"a": 1}},
        {"question_id": 2, "img_id": "COCO_val2014_000000000001", "sent": "q?", "label": {}},
        {"question_id": 3, "img_id": "COCO_val2014_000000000001", "sent": "q?"},  # test: no label
    ]
    (tmp_path / "m.json").write_text(json.dumps(items))
    recs = read_lxmert(tmp_path / "m.json")
    assert [r.labelled for r in recs] == [True, True, False]
    task = get_task("vqa", EvalOptions(label_scores=True))
    result = task.evaluate({"1": "a", "2": "a"}, recs[:2])
    assert result["overall"] == 50.0 and "label score" in result["metric"]
