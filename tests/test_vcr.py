"""VCR: the annotation reader (object references made text, with the words' boxes kept), the
image listing, the multiple-choice task trained, evaluated and predicted through the CLI with
each fusion, its metrics and the leaderboard CSV."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import vlpipe
from tests.test_encoder_top import bert_folder
from tests.test_tune_top import VIT
from tests.vcr_fixtures import frames, item, write_images, write_split
from vlpipe.data_manifests.base import AnnotationError
from vlpipe.data_manifests.vcr import read_vcr, render


def test_references_become_names_and_classes_and_keep_their_objects():
    objects = ["person", "person", "car", "dog", "person"]
    words, refs = render(["Why", "is", [0], "near", [2, 3, 4], "?"], objects)
    assert " ".join(words) == "Why is Casey near car , dog and Avery ?"
    assert refs == [-1, -1, 0, -1, 2, -1, 3, -1, 4, -1]
    words, refs = render([[1, 0], "smile"], objects)
    assert (" ".join(words), refs) == ("Riley and Casey smile", [1, -1, 0, -1])


def test_records_of_labelled_and_test_items(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps(item(0, frames()[0])) + "\n\n" + json.dumps(item(1, frames()[1])))
    recs = read_vcr(path)
    assert [r.key for r in recs] == ["x-0/answer", "x-0/rationale_a0", "x-1/answer",
                                     "x-1/rationale_a0"]  # fmt: skip
    answer, rationale = recs[:2]
    assert answer.text == "What is Casey and Riley red?" and answer.answers == ("0",)
    assert answer.choices[1] == "What is Casey and Riley red? [SEP] Casey is blue ."
    assert rationale.choices[0] == (
        "What is Casey and Riley red? Casey is red . [SEP] because car and dog look red"
    )
    assert rationale.extra["given"] == 0 and rationale.extra["mode"] == "rationale"
    assert answer.image_keys == (frames()[0],) and answer.text_keys[3] == "x-0/answer/3"
    refs = answer.extra["refs"][1]  # the question's words, [SEP], the choice's
    assert refs == (-1, -1, 0, -1, 1, -1, -1, 0, -1, -1, -1)
    write_split(tmp_path / "test.jsonl", 1, labelled=False)
    test = read_vcr(tmp_path / "test.jsonl")
    assert [r.key for r in test] == ["x-0/answer"] + [f"x-0/rationale_a{j}" for j in range(4)]
    assert not any(r.labelled for r in test)
    assert test[3].choices[0].startswith("What is Casey and Riley red? Casey is green .")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"question": ["Is", [7], "ok"]}, "line 2 (x-1): question: object reference 7 outside"),
        ({"answer_choices": [["a"]] * 3}, "field 'answer_choices' should be 4 token lists"),
        ({"answer_label": 4}, "answer_label 4 is not 0..3"),
        ({"rationale_label": None}, "has one of answer_label, rationale_label only"),
        ({"question": ["Is", [], "ok"]}, "token [] is neither a word nor a list of object"),
        ({"annot_id": "x-0"}, "record line 2: annot_id x-0 repeats line 1"),
        ({"img_fn": 3}, "field 'img_fn' should be str"),
    ],
    ids=["reference", "three-choices", "label", "one-label", "empty-ref", "repeat", "img-fn"],
)
def test_malformed_items_name_the_file_and_line(tmp_path, change, message):
    bad = {**item(1, frames()[1]), **change}
    bad = {k: v for k, v in bad.items() if v is not None}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(item(0, frames()[0])) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(AnnotationError) as err:
        read_vcr(path)
    assert str(path) in str(err.value) and message in str(err.value)


def test_the_listing_keys_frames_by_img_fn(tmp_path):
    from vlpipe.data_manifests.registry import list_images

    write_images(tmp_path)
    for root in (tmp_path, tmp_path / "vcr1images"):
        listed = list_images("vcr", root)
        assert sorted(r.key for r in listed) == sorted(frames())
        assert all(r.path.endswith(r.key) for r in listed)


def test_the_metric_is_r2c_s():
    from vlpipe.fusion.metrics import vcr_evaluate

    items = {f"x-{i}": (f"x-{i}/answer", f"x-{i}/rationale_a0") for i in range(4)}
    answers = {k: "0" for pair in items.values() for k in pair}
    preds = dict(answers)
    preds["x-0/answer"] = preds["x-1/rationale_a0"] = preds["x-2/answer"] = "2"
    preds["x-2/rationale_a0"] = "1"
    got = vcr_evaluate(preds, answers, items)
    assert (got["q2a"], got["qa2r"], got["q2ar"], got["n"]) == (50.0, 50.0, 25.0, 4)


@pytest.fixture(scope="module")
def vcr(tmp_path_factory):
    """The images, train (8 items) / val (4) / test (2, unlabelled) annotations, and the caches:
    tiny ViT patches of the frames, tiny BERT of every split's candidates."""
    tmp = tmp_path_factory.mktemp("vcr")
    write_images(tmp)
    splits = {"train": write_split(tmp / "train.jsonl", 8)}
    splits["val"] = write_split(tmp / "val.jsonl", 4, first=8)
    splits["test"] = write_split(tmp / "test.jsonl", 2, labelled=False, first=12)
    bert = bert_folder(tmp / "bert")
    common = ["--dataset", "vcr", "--no-progress", "--dtype", "float32"]
    vlpipe("extract", *common, *VIT, "--weights", "random", "--root", tmp, "--out", tmp / "v.h5")
    for name, path in splits.items():
        vlpipe("extract", *common, "--backbone", "bert", "--weights", bert,
               "--annotations", path, "--out", tmp / f"t_{name}.h5")  # fmt: skip
    return tmp


def test_the_text_cache_holds_every_candidate(vcr):
    from vlpipe.cache import FeatureCache

    keys = set(FeatureCache(vcr / "t_train.h5").keys())
    assert len(keys) == 8 * 8 and "x-0/answer/3" in keys and "x-0/rationale_a0/0" in keys
    assert len(FeatureCache(vcr / "t_test.h5").keys()) == 2 * 20


FUSIONS = {
    "concat": [],
    "cross": ["--model-config", json.dumps({"layers": 1, "hidden": 32, "heads": 2,
                                            "intermediate": 64})],
    "lxmert": ["--model-config", json.dumps({"l_layers": 1, "r_layers": 1, "x_layers": 1,
                                             "hidden": 32, "heads": 2, "intermediate": 64})],
}  # fmt: skip


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_train_evaluate_and_predict_with_each_fusion(vcr, fusion, tmp_path):
    data = ["--task", "vcr", "--features", vcr / "v.h5"]

    def texts(split: str, flag: str = "--text-features") -> list:
        return [flag, vcr / f"t_{split}.h5"] if fusion != "lxmert" else []  # lxmert tokenizes

    run = tmp_path / "run"
    vlpipe("train", *data, "--annotations", vcr / "train.jsonl", *texts("train"), "--fusion",
           fusion, *FUSIONS[fusion], "--epochs", 2, "--batch-size", 4, "--lr", 1e-3,
           "--val-annotations", vcr / "val.jsonl", *texts("val", "--val-text-features"),
           "--num-workers", 0, "--no-progress", "--out", run)  # fmt: skip
    log = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    assert {"q2a", "qa2r", "q2ar"} <= log[-1].keys() and log[-1]["n"] == 4
    got = vlpipe("evaluate", "--run", run, "--checkpoint", "latest", *data, "--annotations",
                 vcr / "val.jsonl", *texts("val"), "--json").output  # fmt: skip
    result = json.loads(got.splitlines()[0])
    assert (result["q2a"], result["qa2r"], result["q2ar"]) == tuple(
        log[-1][k] for k in ("q2a", "qa2r", "q2ar")
    )
    out = tmp_path / "submission.csv"
    vlpipe("predict", "--run", run, *data, "--annotations", vcr / "test.jsonl",
           *texts("test"), "--out", out)  # fmt: skip
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["annot_id"] for r in rows] == ["x-12", "x-13"]
    for row in rows:
        groups = [[float(row[c]) for c in cols] for cols in _groups(row)]
        assert all(abs(sum(g) - 1) < 1e-5 for g in groups) and len(groups) == 5


def _groups(row: dict) -> list[list[str]]:
    heads = ["answer"] + [f"rationale_conditioned_on_a{j}" for j in range(4)]
    return [[f"{h}_{i}" for i in range(4)] for h in heads]


def test_the_leaderboard_csv_has_r2c_s_columns_and_scores_back(vcr, tmp_path):
    from vlpipe.fusion.submission import VCR_COLUMNS

    assert VCR_COLUMNS[:6] == ["annot_id", "answer_0", "answer_1", "answer_2", "answer_3",
                               "rationale_conditioned_on_a0_0"]  # fmt: skip
    assert VCR_COLUMNS[-1] == "rationale_conditioned_on_a3_3" and len(VCR_COLUMNS) == 21
    run = tmp_path / "run"
    data = ["--task", "vcr", "--features", vcr / "v.h5"]
    vlpipe("train", *data, "--annotations", vcr / "train.jsonl", "--text-features",
           vcr / "t_train.h5", "--epochs", 1, "--batch-size", 4, "--no-progress",
           "--out", run)  # fmt: skip
    val = ["--annotations", vcr / "val.jsonl", "--text-features", vcr / "t_val.h5"]
    out = tmp_path / "val.csv"
    vlpipe("predict", "--run", run, *data, *val, "--out", out)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["rationale_conditioned_on_a1_0"] == ""  # only the right answer's group
    scored = json.loads(vlpipe("score", "--task", "vcr", "--predictions", out, "--annotations",
                               vcr / "val.jsonl", "--json").output.splitlines()[0])  # fmt: skip
    direct = json.loads(vlpipe("evaluate", "--run", run, *data, *val, "--json")
                        .output.splitlines()[0])  # fmt: skip
    assert scored["q2ar"] == direct["q2ar"] and scored["n"] == 4
