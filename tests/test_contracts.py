"""Contracts between the stages are declared in the cache schema, not dug out of provenance:
the patch grid, the unit of boxes, the tokenizer vocab; and a run carries its own vocab."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import TINY_BERT, TINY_VIT_ARGS, vlpipe, write_image
from vlpipe.cache import FeatureCache, Schema, region_shapes


def test_schema_declares_facts_per_kind():
    assert Schema.build("regions", region_shapes(4, 8), "float16").facts == {"box_unit": "pixels"}
    patches = {"image_cls": (8,), "image_hw": (2,), "image_feats": (4, 8)}
    assert Schema.build("patches", patches, "float16", {"grid": [2, 2]}).facts == {"grid": [2, 2]}
    with pytest.raises(ValueError, match="vocab_sha256.*not declared for this kind"):
        Schema.build("patches", patches, "float16", {"vocab_sha256": "x"})
    schema = Schema.build("patches", patches, "float16", {"grid": [2, 2]})
    assert Schema.from_json(schema.to_json()) == schema


def test_extraction_declares_the_grid_and_the_vocab(tmp_path, minilm_dir):
    for i in range(2):
        write_image(tmp_path / "imgs" / f"img{i}.png", size=(40, 30), seed=i)
    vlpipe(
        "extract",
        "--dataset",
        "folder",
        "--root",
        tmp_path / "imgs",
        *TINY_VIT_ARGS,
        "--out",
        tmp_path / "v.h5",
    )
    assert FeatureCache(tmp_path / "v.h5").schema.facts == {"grid": [2, 2]}
    questions = {"q0": {"imageId": "img0", "question": "what color?", "answer": "red"}}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    vlpipe(
        "extract",
        "--backbone",
        "bert",
        "--dataset",
        "gqa",
        "--annotations",
        tmp_path / "q.json",
        "--weights",
        "random",
        "--model-kwargs",
        TINY_BERT,
        "--vocab",
        minilm_dir / "vocab.txt",
        "--no-progress",
        "--out",
        tmp_path / "t.h5",
    )
    facts = FeatureCache(tmp_path / "t.h5").schema.facts
    assert facts["vocab_size"] == 30522 and facts["max_length"] == 20
    assert len(facts["vocab_sha256"]) == 64


def test_a_run_carries_its_vocab(tmp_path):
    from tests.fusion_fixtures import gqa_color_task

    data = gqa_color_task(tmp_path, n_images=6)
    from vlpipe.fusion.registry import FUSIONS

    tiny = json.dumps(FUSIONS["lxmert"].tiny)
    vlpipe(
        "train",
        *data,
        "--fusion",
        "lxmert",
        "--model-config",
        tiny,
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        tmp_path / "run",
    )
    run = tmp_path / "run"
    meta = json.loads((run / (run / "LATEST").read_text() / "run.json").read_text())
    assert meta["tokenizer"]["vocab"] == "vocab.txt" and (run / "vocab.txt").is_file()
    moved = tmp_path / "elsewhere"
    shutil.move(run, moved)  # no path of the training machine is needed to evaluate it
    out = vlpipe("evaluate", "--run", moved, *data[:4], "--annotations", data[-1], "--json")
    assert json.loads(out.stdout)["n"] == 12


def test_a_run_records_how_its_tokenizer_cases(tmp_path, minilm_dir):
    from tests.fusion_fixtures import gqa_color_task
    from vlpipe.fusion.registry import FUSIONS

    cased = tmp_path / "cased"
    cased.mkdir()
    shutil.copy(minilm_dir / "vocab.txt", cased / "vocab.txt")
    (cased / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    data = gqa_color_task(tmp_path, n_images=6)
    tiny = json.dumps(FUSIONS["lxmert"].tiny)
    vlpipe("train", *data, "--fusion", "lxmert", "--model-config", tiny, "--vocab", cased,
           "--epochs", "1", "--no-progress", "--out", tmp_path / "run")  # fmt: skip
    run = tmp_path / "run"
    meta = json.loads((run / (run / "LATEST").read_text() / "run.json").read_text())
    assert meta["tokenizer"]["lowercase"] is False
    assert (run / "vocab.txt").read_bytes() == (cased / "vocab.txt").read_bytes()


def test_a_text_cache_identity_is_its_vocab_not_the_path_to_it(tmp_path, minilm_dir, monkeypatch):
    questions = {"q0": {"imageId": "i", "question": "what color?", "answer": "red"}}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    shutil.copytree(minilm_dir, tmp_path / "bert")
    monkeypatch.chdir(tmp_path)
    args = ["extract", "--backbone", "bert", "--dataset", "gqa", "--annotations", "q.json"]
    args += ["--no-progress", "--out", "t.h5"]
    vlpipe(*args, "--weights", "bert")
    again = vlpipe(
        *args, "--weights", tmp_path / "bert", "--resume"
    )  # the same model, by another path
    assert "skipped 1 already cached" in again.output
