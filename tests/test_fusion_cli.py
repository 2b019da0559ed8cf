"""`vlpipe train / evaluate / predict` on official-format annotation files, and a short real
easy-VQA run that must beat the majority answer."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from tests.conftest import TINY_VIT, vlpipe
from tests.fusion_fixtures import COLORS, PROV, QUESTIONS, gqa_color_task, image_cache, text_cache
from vlpipe.data_manifests.base import TextRecord


def write_vqa(tmp_path, n_images=12):
    questions, annotations, recs = [], [], []
    for i in range(n_images):
        for q in range(2):
            qid = i * 10 + q
            questions.append({"image_id": i, "question": QUESTIONS[q], "question_id": qid})
            answer = COLORS[i % 3]
            annotations.append(
                {
                    "question_id": qid,
                    "image_id": i,
                    "question_type": "what color",
                    "answer_type": "other",
                    "multiple_choice_answer": answer,
                    "answers": [
                        {"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                        for k in range(10)
                    ],
                }
            )
            recs.append(TextRecord(str(qid), QUESTIONS[q], (str(i),)))
    qfile, afile = tmp_path / "questions.json", tmp_path / "annotations.json"
    qfile.write_text(
        json.dumps(
            {
                "info": {},
                "task_type": "Open-Ended",
                "data_type": "mscoco",
                "data_subtype": "train2014",
                "license": {},
                "questions": questions,
            }
        )
    )
    afile.write_text(json.dumps({"annotations": annotations}))
    return qfile, afile, recs


@pytest.fixture
def vqa_setup(tmp_path):
    qfile, afile, recs = write_vqa(tmp_path)
    image_cache(tmp_path / "img.h5", 12)
    import h5py

    # the VQA keys are COCO ids: rename the fixture's img{i} keys in a copy of the cache
    text_cache(tmp_path / "txt.h5", recs)
    _rekey(tmp_path / "img.h5", lambda k: k.removeprefix("img"))
    assert h5py.is_hdf5(tmp_path / "img.h5")
    return tmp_path, qfile, afile


def caches(folder):
    """The image and text cache arguments of train / evaluate / predict."""
    return ["--features", folder / "img.h5", "--text-features", folder / "txt.h5"]


def _rekey(path, fn):
    import h5py

    from vlpipe.cache import build_index, complete_shards

    for shard in complete_shards(path):
        with h5py.File(shard, "r+") as h5:
            keys = [fn(k.decode()) for k in h5["keys"][:]]
            h5["keys"][:] = keys
    build_index(path)


def test_train_evaluate_predict_vqa(vqa_setup):
    tmp_path, qfile, afile = vqa_setup
    run = tmp_path / "run"
    vlpipe(
        "train",
        *caches(tmp_path),
        "--task",
        "vqa",
        "--fusion",
        "concat",
        "--annotations",
        qfile,
        "--annotations",
        afile,
        "--min-answer-count",
        1,
        "--epochs",
        12,
        "--batch-size",
        8,
        "--lr",
        3e-3,
        "--out",
        run,
        "--no-progress",
    )
    meta = json.loads((run / (run / "LATEST").read_text() / "run.json").read_text())
    assert sorted(meta["answers"]) == sorted(COLORS) and meta["fusion"] == "concat"
    assert meta["caches"]["image"]["backbone"] == "vit"
    assert (run / "train_log.csv").exists() and (run / "curves.png").exists()
    out = vlpipe(
        "evaluate",
        "--run",
        run,
        *caches(tmp_path),
        "--annotations",
        qfile,
        "--annotations",
        afile,
        "--json",
    )
    scores = json.loads(out.stdout)  # stderr: the checkpoint it read
    assert "checkpoint: " in out.stderr and scores["checkpoint"]["reason"].startswith("latest")
    assert scores["overall"] == 100.0 and scores["perAnswerType"]["other"] == 100.0
    vlpipe(
        "predict",
        "--run",
        run,
        *caches(tmp_path),
        "--annotations",
        qfile,
        "--out",
        tmp_path / "sub.json",
    )
    sub = json.loads((tmp_path / "sub.json").read_text())
    assert sub[0] == {"question_id": 0, "answer": "red"} and len(sub) == 24
    # The submission scored without the model gives the figures `evaluate` printed.
    scored = vlpipe(
        "score",
        "--task",
        "vqa",
        "--predictions",
        tmp_path / "sub.json",
        "--annotations",
        qfile,
        "--annotations",
        afile,
        "--json",
    )
    assert json.loads(scored.output) == {k: v for k, v in scores.items() if k != "checkpoint"}
    assert scores["metric"].startswith("vqaEval.py 2021 revision")
    old = vlpipe(
        "evaluate",
        "--run",
        run,
        *caches(tmp_path),
        "--annotations",
        qfile,
        "--annotations",
        afile,
        "--vqa-eval",
        "2016",
        "--json",
    )
    assert json.loads(old.stdout)["metric"].startswith("vqaEval.py 2016 revision")
    bad = vlpipe(
        "score",
        "--task",
        "vqa",
        "--predictions",
        tmp_path / "sub.json",
        "--annotations",
        qfile,
        "--annotations",
        afile,
        "--vqa-eval",
        "2019",
        code=1,
    )
    assert "2019" in bad.output and "Traceback" not in bad.output


def test_train_refuses_annotations_the_cache_lacks(vqa_setup):
    tmp_path, qfile, afile = vqa_setup
    _rekey(tmp_path / "img.h5", lambda k: "x" + k)
    result = vlpipe(
        "train",
        *caches(tmp_path),
        "--task",
        "vqa",
        "--annotations",
        qfile,
        "--annotations",
        afile,
        "--min-answer-count",
        1,
        "--out",
        tmp_path / "run",
        "--no-progress",
        code=1,
    )
    assert "image keys of the annotations are not in" in result.output
    assert not (tmp_path / "run").exists()


def test_nlvr2_predictions_csv(tmp_path):
    image_cache(tmp_path / "img.h5", 6)
    _rekey(tmp_path / "img.h5", lambda k: f"dev-{k[3:]}-0-img0")
    lines, recs = [], []
    for i in range(6):
        ident = f"dev-{i}-0-0"
        label = "True" if i % 3 == 0 else "False"
        lines.append(json.dumps({"identifier": ident, "sentence": QUESTIONS[0], "label": label}))
        recs.append(TextRecord(ident, QUESTIONS[0], ()))
    # the second image of every pair is the first image of the next pair, wrapped around
    _add_img1(tmp_path / "img.h5")
    (tmp_path / "dev.json").write_text("\n".join(lines) + "\n")
    text_cache(tmp_path / "txt.h5", recs)
    run = tmp_path / "run"
    vlpipe(
        "train",
        *caches(tmp_path),
        "--task",
        "nlvr2",
        "--annotations",
        tmp_path / "dev.json",
        "--epochs",
        2,
        "--out",
        run,
        "--no-progress",
    )
    vlpipe(
        "predict",
        "--run",
        run,
        *caches(tmp_path),
        "--annotations",
        tmp_path / "dev.json",
    )
    rows = (run / "predictions.csv").read_text().split()
    assert len(rows) == 6 and rows[0].split(",")[0] == "dev-0-0-0"
    assert {r.split(",")[1] for r in rows} <= {"True", "False"}
    scores = json.loads(
        vlpipe(
            "evaluate",
            "--run",
            run,
            *caches(tmp_path),
            "--annotations",
            tmp_path / "dev.json",
            "--json",
        ).stdout
    )
    assert set(scores) == {"metric", "accuracy", "consistency", "n", "checkpoint"}
    assert scores["n"] == 6


def _add_img1(path):
    """Append img1 rows to the cache (a second writer's shard, then re-index)."""
    import numpy as np

    from vlpipe.cache import CacheWriter, FeatureCache, Schema

    cache = FeatureCache(path)
    keys = cache.keys()
    data = cache.read(keys)
    schema = Schema(cache.kind, cache.fields)
    with CacheWriter(path, schema, cache.provenance, writer="r1", resume=True) as writer:
        writer.add(
            [k.replace("img0", "img1") for k in keys],
            {f: np.roll(v, 1, axis=0) for f, v in data.items()},
        )


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_easy_vqa_slice_beats_the_majority_answer(tmp_path, minilm_dir):
    """Real easy-VQA images through a tiny random ViT, real questions through MiniLM, concat
    fusion trained on 150 images, scored on 50 others."""
    from vlpipe.data_manifests.easy_vqa import read_easy_vqa

    vlpipe(
        "extract",
        "--backbone",
        "vit",
        "--dataset",
        "easy-vqa",
        "--split",
        "train",
        "--limit",
        200,
        "--weights",
        "random",
        "--arch",
        "vit_tiny_patch16_224",
        "--model-kwargs",
        TINY_VIT,
        "--image-size",
        64,
        "--cls-only",
        "--num-workers",
        0,
        "--out",
        tmp_path / "img.h5",
        "--no-progress",
    )
    vlpipe(
        "extract",
        "--backbone",
        "bert",
        "--dataset",
        "easy-vqa",
        "--split",
        "train",
        "--weights",
        minilm_dir,
        "--cls-only",
        "--out",
        tmp_path / "q.h5",
        "--no-progress",
    )
    from vlpipe.cache import FeatureCache

    images = sorted(FeatureCache(tmp_path / "img.h5").keys())
    train_imgs, test_imgs = set(images[:150]), set(images[150:])
    recs = read_easy_vqa("train")
    train_recs = [r for r in recs if r.image_keys[0] in train_imgs]
    test_recs = [r for r in recs if r.image_keys[0] in test_imgs]

    for name, part in (("train", train_recs), ("test", test_recs)):
        questions = {
            r.key: {"imageId": r.image_keys[0], "question": r.text, "answer": r.answers[0]}
            for r in part
        }
        (tmp_path / f"{name}_q.json").write_text(json.dumps(questions))
    torch.manual_seed(0)
    caches = ["--features", tmp_path / "img.h5", "--text-features", tmp_path / "q.h5"]
    out = vlpipe(
        "train",
        "--task",
        "easy-vqa",
        *caches,
        "--annotations-format",
        "gqa",
        "--annotations",
        tmp_path / "train_q.json",
        "--val-annotations",
        tmp_path / "test_q.json",
        "--epochs",
        6,
        "--batch-size",
        64,
        "--lr",
        1e-3,
        "--no-progress",
        "--out",
        tmp_path / "run",
    )
    results = json.loads(out.output.split("validation: ", 1)[1])
    majority = Counter(r.answers[0] for r in test_recs).most_common(1)[0][1] / len(test_recs)
    assert results["accuracy"] > 100 * majority + 10, (results, majority)


def test_skip_missing_trains_on_the_examples_with_features(tmp_path):
    from vlpipe.cache import CacheWriter, FeatureCache

    data = gqa_color_task(tmp_path)
    questions = json.loads((tmp_path / "q.json").read_text())
    # one image that failed at extraction (recorded in its own cache), one never extracted
    failed = tmp_path / "failed.h5"
    schema = FeatureCache(tmp_path / "img.h5").schema
    with CacheWriter(failed, schema, PROV) as writer:
        writer.add_failure("img50", "/data/img50.png", "truncated file")
    questions["x1"] = {"imageId": "img50", "question": QUESTIONS[0], "answer": "red"}
    questions["x2"] = {"imageId": "img99", "question": QUESTIONS[0], "answer": "red"}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    refused = vlpipe("train", *data, "--features", failed, "--out", tmp_path / "a", code=1)
    assert "img99" in refused.output
    out = vlpipe(
        "train",
        *data,
        "--features",
        failed,
        "--skip-missing",
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        tmp_path / "b",
    )
    assert "left out 2 of 26 examples" in out.output
    # (the two questions are not in the text cache either)
    assert (
        "image failed at extraction: truncated file; text not in the caches (e.g. x1)" in out.output
    )
    assert "image not in the caches; text not in the caches (e.g. x2)" in out.output
