"""VCR: the annotation reader (object references made text, with the words' boxes kept), the
image listing, the multiple-choice task trained, evaluated and predicted through the CLI with
each fusion, its metrics and the leaderboard CSV."""

from __future__ import annotations

import csv
import json

import numpy as np
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
                                     "x-1/rationale_a1"]  # fmt: skip
    assert [r.answers for r in recs] == [("0",), ("1",), ("1",), ("2",)]
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

    assert FeatureCache(vcr / "t_train.h5").schema.facts["max_length"] == 128  # VCR's default
    keys = set(FeatureCache(vcr / "t_train.h5").keys())
    assert len(keys) == 8 * 8 and "x-0/answer/3" in keys and "x-0/rationale_a0/0" in keys
    assert len(FeatureCache(vcr / "t_test.h5").keys()) == 2 * 20


def _tiny(name: str) -> list:
    from vlpipe.fusion.registry import FUSIONS as REGISTERED

    return ["--model-config", json.dumps(REGISTERED[name].tiny)]


def test_every_candidate_meets_its_own_features_and_the_image(vcr):
    """Batches in a shuffled order: text_cls[b, c] is candidate c of record b's cache row, the
    image the record's; the model pairs them so (B*4 rows, image repeated per candidate)."""
    import torch

    from vlpipe.data_manifests.registry import read_texts
    from vlpipe.fusion.answers import AnswerVocab
    from vlpipe.fusion.data import CacheSet, TaskDataset
    from vlpipe.fusion.model import TaskModel
    from vlpipe.fusion.tasks import get_task

    task = get_task("vcr")
    images, texts = CacheSet([vcr / "v.h5"]), CacheSet([vcr / "t_train.h5"])
    records = read_texts("vcr", [vcr / "train.jsonl"])
    needs = ("image_cls", "text_cls")
    data = TaskDataset(task, records, images, texts, AnswerVocab(["0", "1", "2", "3"]), needs)
    order = [5, 0, 11, 3, 8]
    batch = data[order]
    assert batch["text_cls"].shape[:2] == (5, 4) and batch["target"].tolist() == [
        int(records[i].answers[0]) for i in order
    ]
    for b, i in enumerate(order):
        rows = texts.read(list(records[i].text_keys), ["text_cls"])["text_cls"]
        assert torch.equal(batch["text_cls"][b], torch.from_numpy(rows).float())
        own = images.read([records[i].image_keys[0]], ["image_cls"])["image_cls"][0]
        assert torch.equal(batch["image_cls"][b], torch.from_numpy(own).float())
    model = TaskModel("concat", _concat_config(data), 4, choices=4)
    image_rows = model._candidates("image_cls", batch["image_cls"])
    text_rows = model._candidates("text_cls", batch["text_cls"])
    for b in range(5):
        for c in range(4):  # row 4b + c: record b's image with its candidate c
            assert torch.equal(image_rows[4 * b + c], batch["image_cls"][b])
            assert torch.equal(text_rows[4 * b + c], batch["text_cls"][b, c])
    assert model(batch).shape == (5, 4)


def _concat_config(data):
    from vlpipe.fusion.model import make_fusion_config
    from vlpipe.pipelines.data import fusion_dims

    return make_fusion_config("concat", fusion_dims("concat", data.images, data.texts, 0))


FUSIONS = {name: _tiny(name) for name in ("concat", "cross", "lxmert", "lstm")}
TOKENIZING = ("lxmert", "lstm")


@pytest.mark.parametrize("fusion", list(FUSIONS))
def test_train_evaluate_and_predict_with_each_fusion(vcr, fusion, tmp_path):
    data = ["--task", "vcr", "--features", vcr / "v.h5"]

    def texts(split: str, flag: str = "--text-features") -> list:
        return [flag, vcr / f"t_{split}.h5"] if fusion not in TOKENIZING else []

    run = tmp_path / "run"
    vlpipe("train", *data, "--annotations", vcr / "train.jsonl", *texts("train"), "--fusion",
           fusion, *FUSIONS[fusion], "--epochs", 2, "--batch-size", 4, "--lr", 1e-3,
           "--val-annotations", vcr / "val.jsonl", *texts("val", "--val-text-features"),
           "--num-workers", 0, "--no-progress", "--out", run)  # fmt: skip
    log = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    assert {"q2a", "qa2r", "q2ar"} <= log[-1].keys() and log[-1]["n"] == 4
    if fusion == "concat":  # the paper's VCR recipe, with the flags on top
        assert 'preset = "concat-vcr"' in (run / "config.toml").read_text()
    if fusion in TOKENIZING:  # a QA->R candidate needs more than the default 20 tokens
        assert "max_length = 128" in (run / "config.toml").read_text()
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


# ---- region features at given boxes ---------------------------------------------------------
def frcnn(root, out, *extra) -> tuple:
    return ("extract", "--backbone", "frcnn", "--root", root, "--out", out, "--weights",
            "random", "--model-kwargs", '{"tiny": true}', "--image-size", 64, "--max-size", 128,
            "--num-workers", 0, "--dtype", "float32", "--no-progress", *extra)  # fmt: skip


def test_features_at_given_boxes_equal_the_detector_s_at_its_own_proposals(tmp_path):
    """The boxes the caffe policy kept (its unregressed proposals, stored in original pixels)
    given back: the regions after the whole image are the detector's own, features, labels
    and confidences alike."""
    from tests.conftest import write_image
    from vlpipe.cache import FeatureCache

    root = tmp_path / "images"
    for i, size in enumerate([(96, 64), (64, 80)]):
        write_image(root / f"img{i}.png", size=size, seed=i)
    own = tmp_path / "own.h5"
    vlpipe(*frcnn(root, own, "--dataset", "folder", "--max-boxes", 6))
    cache = FeatureCache(own)
    keys = sorted(cache.keys())
    fields = ["image_feats", "image_boxes", "image_mask", "obj_ids", "obj_conf", "attr_conf"]
    ref = cache.read(keys, fields)
    table = {k: ref["image_boxes"][i][ref["image_mask"][i]].tolist() for i, k in enumerate(keys)}
    (tmp_path / "boxes.json").write_text(json.dumps(table))
    given = tmp_path / "given.h5"
    vlpipe(*frcnn(root, given, "--dataset", "folder", "--boxes", tmp_path / "boxes.json",
                  "--max-boxes", 7))  # fmt: skip
    got = FeatureCache(given).read(keys, fields)
    for i, key in enumerate(keys):
        n = int(ref["image_mask"][i].sum())
        assert got["image_mask"][i].sum() == n + 1
        assert np.array_equal(got["image_boxes"][i][0], [0, 0, *_size(root, key)])
        for name in ("image_feats", "image_boxes", "obj_conf", "attr_conf"):
            np.testing.assert_allclose(got[name][i][1 : n + 1], ref[name][i][:n], rtol=1e-5,
                                       atol=1e-5, err_msg=f"{key} {name}")  # fmt: skip
        assert np.array_equal(got["obj_ids"][i][1 : n + 1], ref["obj_ids"][i][:n])
    prov = FeatureCache(given).provenance
    assert prov["box_policy"]["name"] == "given" and prov["box_policy"]["source"].endswith(
        "boxes.json"
    )


def _size(root, key) -> tuple[int, int]:
    from PIL import Image

    with Image.open(root / f"{key}.png") as img:
        return img.size


def test_vcr_metadata_boxes_are_the_regions_after_the_whole_image(tmp_path):
    """Object i is region i + 1; a box past the frame is pooled as clipped to it (here: the
    whole frame, region 0's box)."""
    from vlpipe.cache import FeatureCache

    images = write_images(tmp_path, n=2)
    meta_file = (images / frames(2)[0]).with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    meta["boxes"].append([-5.0, -5.0, 100.0, 100.0, 0.5])
    meta_file.write_text(json.dumps(meta))
    out = tmp_path / "r.h5"
    vlpipe(*frcnn(tmp_path, out, "--dataset", "vcr", "--boxes", "metadata"))
    got = FeatureCache(out).read(frames(2), ["image_boxes", "image_mask", "image_feats"])
    assert got["image_mask"][0].sum() == 1 + len(meta["boxes"]) == 6
    np.testing.assert_allclose(got["image_boxes"][0][1:5], [b[:4] for b in meta["boxes"][:4]])
    np.testing.assert_allclose(got["image_boxes"][0][5], [0, 0, 40, 30])
    np.testing.assert_allclose(got["image_feats"][0][5], got["image_feats"][0][0], atol=1e-6)


@pytest.mark.parametrize(
    ("setup", "extra", "message"),
    [
        ("no-meta", ["--boxes", "metadata"], "(the metadata of image"),
        ("bad-box", ["--boxes", "metadata"], "box 0 [9.0, 3.0, 2.0, 25.0, 0.9] is not"),
        ("", ["--boxes", "metadata", "--max-boxes", 3], "has 4 boxes, more than --max-boxes 3"),
        ("", ["--boxes", "metadata", "--box-policy", "adaptive"], "drop --box-policy"),
    ],
    ids=["missing-metadata", "bad-box", "too-many", "with-policy"],
)
def test_wrong_given_boxes_are_clean_errors_before_any_work(tmp_path, setup, extra, message):
    images = write_images(tmp_path, n=2)
    meta = (images / frames(2)[1]).with_suffix(".json")
    if setup == "no-meta":
        meta.unlink()
    if setup == "bad-box":
        data = json.loads(meta.read_text())
        data["boxes"][0] = [9.0, 3.0, 2.0, 25.0, 0.9]
        meta.write_text(json.dumps(data))
    out = tmp_path / "r.h5"
    got = vlpipe(*frcnn(tmp_path, out, "--dataset", "vcr", *extra), code=1).output
    assert message in " ".join(got.split()) and "Traceback" not in got
    assert not out.exists()


def test_a_broken_leaderboard_csv_is_a_clean_error(vcr, tmp_path):
    from vlpipe.fusion.submission import VCR_COLUMNS

    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(VCR_COLUMNS) + "\nx-8,0.1,0.2\n")
    args = ["score", "--task", "vcr", "--predictions", bad, "--annotations", vcr / "val.jsonl"]
    out = vlpipe(*args, code=1).output
    assert f"{bad}:2: expected 21 cells" in " ".join(out.split()) and "Traceback" not in out
    bad.write_bytes(b"\xff\xfe annot_id")
    assert "not UTF-8 text" in vlpipe(*args, code=1).output


def test_an_lxmert_answer_head_is_not_poured_into_the_choice_head(vcr):
    """--init of a QA checkpoint whose answers include "0".."3": those rows score counts, not
    candidates; the multiple-choice head keeps its own init."""
    from types import SimpleNamespace

    import torch

    from vlpipe.fusion.answer_tables import AnswerList
    from vlpipe.fusion.data import CacheSet
    from vlpipe.fusion.model import TaskModel, make_fusion_config
    from vlpipe.pipelines.data import fusion_dims
    from vlpipe.pipelines.lxmert_import import transfer_head

    dims = fusion_dims("concat", CacheSet([vcr / "v.h5"]), CacheSet([vcr / "t_train.h5"]), 0)
    model = TaskModel("concat", make_fusion_config("concat", dims), 4, choices=4)
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    head = {k: torch.randn_like(v) for k, v in before.items()}
    head["net.4.weight"], head["net.4.bias"] = torch.randn(10, 8), torch.randn(10)
    ckpt = SimpleNamespace(head_shape=(8, 10), head=head, source="lxmert.pth")
    table = AnswerList("answers", [str(i) for i in range(10)])
    said = transfer_head(model, ckpt, ["0", "1", "2", "3"], table)
    assert "NOT transferred: a 4-way multiple-choice head" in said
    assert all(torch.equal(v, before[k]) for k, v in model.head.state_dict().items())
