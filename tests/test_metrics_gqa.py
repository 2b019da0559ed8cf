"""GQA eval.py metrics on a small all-questions file, each figure worked out by hand from the
official script's rules (the side-by-side run against eval.py is in docs/evaluation.md)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import vlpipe
from vlpipe.data_manifests.base import AnnotationError
from vlpipe.data_manifests.gqa import read_gqa, read_gqa_choices
from vlpipe.fusion.tasks import EvalOptions, get_task


def _q(question, answer, balanced, structural, semantic, detailed, group, entailed, program):
    return {
        "imageId": "1",
        "question": question,
        "answer": answer,
        "isBalanced": balanced,
        "types": {"structural": structural, "semantic": semantic, "detailed": detailed},
        "groups": {"global": group, "local": "x"},
        "entailed": entailed,
        "semantic": [{"operation": o, "argument": a, "dependencies": []} for o, a in program],
    }


QUESTIONS = {
    # 4 words, 2 steps ("select: cat", "verify color: red")
    "q1": _q(
        "is the cat red?",
        "yes",
        True,
        "verify",
        "attr",
        "verifyAttr",
        "g1",
        ["q2", "q1"],
        [("select", "cat"), ("verify color", "red")],
    ),
    # not balanced: only consistency reads it
    "q2": _q(
        "what color is it?",
        "red",
        False,
        "query",
        "attr",
        "queryAttr",
        "g1",
        [],
        [("select", "cat"), ("query", "color")],
    ),
    # 5 words, 2 steps ("query: color" is a step, only "query: name" is not)
    "q3": _q(
        "what color is the cat?",
        "red",
        True,
        "query",
        "attr",
        "colorCommon",
        "g1",
        ["q2"],
        [("select", "cat"), ("query", "color")],
    ),
    # 5 words, 1 step ("choose name" is not a step), no global group
    "q4": _q(
        "is it left or right?",
        "left",
        True,
        "choose",
        "rel",
        "positionChoose",
        None,
        ["q3", "q2"],
        [("select", "cat"), ("choose name", "left|right")],
    ),
}
CHOICES = {
    "q1": {"valid": ["yes", "no"], "plausible": ["yes", "no"]},
    "q2": {"valid": ["red"], "plausible": ["red"]},
    "q3": {"valid": ["red", "blue"], "plausible": ["red"]},
    "q4": {"valid": ["left", "right"], "plausible": ["right"]},
}
PREDICTIONS = {"q1": "yes", "q2": "red", "q3": "color", "q4": "left"}


@pytest.fixture
def files(tmp_path):
    (tmp_path / "all.json").write_text(json.dumps(QUESTIONS))
    balanced = {k: v for k, v in QUESTIONS.items() if v["isBalanced"]}
    (tmp_path / "balanced.json").write_text(json.dumps(balanced))
    (tmp_path / "choices.json").write_text(json.dumps(CHOICES))
    preds = [{"questionId": k, "prediction": v} for k, v in PREDICTIONS.items()]
    (tmp_path / "preds.json").write_text(json.dumps(preds))
    return tmp_path


def _evaluate(questions, choices=None):
    task = get_task("gqa", EvalOptions(gqa_choices=choices))
    return task.evaluate(PREDICTIONS, read_gqa(questions))


def test_all_official_metrics(files):
    r = _evaluate(files / "all.json", files / "choices.json")
    assert r["n"] == 3  # q2 is not balanced: not scored
    assert r["accuracy"] == 2 / 3 * 100  # q1, q4 right; q3 wrong
    assert (r["binary"], r["open"]) == (100.0, 0.0)  # q3 is the only "query"
    # q3's "colorCommon" accepts any of color / material / shape, whatever the choices say;
    # q4's "left" is valid but not plausible.
    assert r["validity"] == 100.0
    assert r["plausibility"] == 2 / 3 * 100
    # right answers q1 (entailed q2, itself excluded: right -> 1.0) and q4 (q3 wrong, q2 right
    # -> 0.5): (1.0 + 0.5) / 2
    assert r["consistency"] == 75.0
    # group g1: gold {yes: 1, red: 1}, predicted {yes: 1, color: 1}: chi2 = 0 + 1 = 1,
    # weighted by the group's 2 questions: 2 / 2 = 1, / 100
    assert r["distribution"] == 0.01
    assert r["accuracyPerStructuralType"] == {
        "verify": [100.0, 1],
        "query": [0.0, 1],
        "choose": [100.0, 1],
    }
    assert r["accuracyPerSemanticType"] == {"attr": [50.0, 2], "rel": [100.0, 1]}
    assert r["accuracyPerSteps"] == {2: [50.0, 2], 1: [100.0, 1]}
    assert r["accuracyPerLength"] == {4: [100.0, 1], 5: [50.0, 2]}
    assert r["metric"].startswith("GQA eval.py")


def test_balanced_file_alone_has_no_consistency_or_validity(files):
    r = _evaluate(files / "balanced.json")
    assert r["accuracy"] == 2 / 3 * 100
    assert "consistency" not in r and "validity" not in r
    assert "entailed questions" in r["notes"][0]


def test_prediction_needed_for_every_balanced_question(files):
    recs = read_gqa(files / "all.json")
    with pytest.raises(ValueError, match="missing prediction.*q3"):
        get_task("gqa").evaluate({"q1": "yes", "q2": "red", "q4": "left"}, recs)


def test_malformed_files_name_file_and_record(tmp_path):
    bad = dict(QUESTIONS, q5={**QUESTIONS["q1"], "entailed": [7]})
    (tmp_path / "q.json").write_text(json.dumps(bad))
    with pytest.raises(AnnotationError, match=r"q\.json: record q5"):
        read_gqa(tmp_path / "q.json")
    (tmp_path / "c.json").write_text(json.dumps({"q1": {"valid": ["yes"]}}))
    with pytest.raises(AnnotationError, match=r"c\.json: record q1.*plausible"):
        read_gqa_choices(tmp_path / "c.json")


def test_score_cli(files):
    out = vlpipe(
        "score",
        "--task",
        "gqa",
        "--predictions",
        files / "preds.json",
        "--annotations",
        files / "all.json",
        "--gqa-choices",
        files / "choices.json",
        "--json",
    )
    r = json.loads(out.output)
    assert r["consistency"] == 75.0 and r["accuracyPerLength"] == {"4": [100.0, 1], "5": [50.0, 2]}
