"""Edges of the jobs a user reaches: what --overwrite, --resume, --accept-changes, validation,
evaluation and a foreign checkpoint do when the inputs are unusual (found in review)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import vlpipe
from tests.fusion_fixtures import PROV, gqa_color_task, image_cache

QUICK = ["--epochs", "1", "--batch-size", "8", "--no-progress"]


def _meta(run):
    return json.loads((run / (run / "LATEST").read_text() / "run.json").read_text())


def test_overwrite_replaces_only_once_the_new_inputs_are_checked(tmp_path):
    data, run = gqa_color_task(tmp_path), tmp_path / "run"
    vlpipe("train", *data, *QUICK, "--out", run)
    bad = vlpipe("train", *data, "--features", tmp_path / "typo.h5", "--overwrite", "--out", run,
                 code=1)  # fmt: skip
    assert "typo.h5" in bad.output
    assert (run / "LATEST").exists() and _meta(run)["step"] > 0  # the earlier run is intact


def test_resume_compares_only_what_the_saved_run_recorded(tmp_path):
    data, run = gqa_color_task(tmp_path), tmp_path / "run"
    vlpipe("train", *data, *QUICK, "--epochs", "2", "--max-steps", "2", "--out", run)
    path = run / (run / "LATEST").read_text() / "run.json"
    older = json.loads(path.read_text())
    del older["data"]  # a run written before the training data joined the identity
    path.write_text(json.dumps(older))
    vlpipe("train", *data, *QUICK, "--epochs", "2", "--out", run, "--resume")
    assert _meta(run)["step"] == 6


def test_accept_changes_takes_a_dropout_change_not_a_shape_change(tmp_path):
    data, run = gqa_color_task(tmp_path), tmp_path / "run"
    cross = ["--fusion", "cross", "--epochs", "2", "--batch-size", "8", "--no-progress"]
    small = {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}
    vlpipe("train", *data, *cross, "--model-config", json.dumps(small), "--max-steps", "2",
           "--out", run)  # fmt: skip
    dropout = json.dumps({**small, "dropout": 0.2})
    ok = vlpipe("train", *data, *cross, "--model-config", dropout, "--out", run, "--resume",
                "--accept-changes")  # fmt: skip
    assert "WARNING: resuming" in ok.output and "fusion_config.dropout: 0.1 -> 0.2" in ok.output
    wider = json.dumps({**small, "hidden": 32, "dropout": 0.2})
    refused = vlpipe("train", *data, *cross, "--model-config", wider, "--out", run, "--resume",
                     "--accept-changes", code=1)  # fmt: skip
    assert "parameters change shape" in refused.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--val-features", "{img}"], "--val-features: validation needs --val-split or"),
        (["--answer-table", "x.json"], "--answer-table: only with --init"),
        (["--vocab", "v.txt"], "--vocab: only fusions that tokenize"),
        (["--init-bert", "bert"], "--init-bert: BERT language layers: only --fusion lxmert"),
        (["--model-config", '{"image_dim": 5}'], "--model-config image_dim=5: the caches give 16"),
        (["--lr", "nan"], "--lr must be a number, got nan"),
        (["--optimizer", "bertadam", "--warmup-ratio", "1"], "--warmup-ratio must be < 1"),
        (["--val-every", "3"], "--val-every: validation needs --val-split or --val-annotations"),
        (["--early-stop", "2"], "--early-stop: validation needs --val-split or"),
        (["--early-stop-delta", "0.5"], "--early-stop-delta: only with --early-stop"),
        (["--grad-accum", "0"], "--grad-accum must be >= 1, got 0"),
    ],
)
def test_options_that_would_do_nothing_or_break_are_named(tmp_path, args, message):
    data = gqa_color_task(tmp_path)
    args = [a.replace("{img}", str(tmp_path / "img.h5")) for a in args]
    result = vlpipe("train", *data, *args, *QUICK, "--out", tmp_path / "r", code=1)
    assert message in result.output and "Traceback" not in result.output


def test_caches_of_one_set_must_share_their_encoder_and_keys(tmp_path):
    data = gqa_color_task(tmp_path)
    image_cache(tmp_path / "seed7.h5", 12, prov=dict(PROV, weights_sha256="other"))
    mixed = vlpipe("train", *data, "--features", tmp_path / "seed7.h5", "--out", tmp_path / "r",
                   code=1)  # fmt: skip
    assert "different encoders (they differ in weights_sha256)" in mixed.output
    image_cache(tmp_path / "copy.h5", 12)
    twice = vlpipe("train", *data, "--features", tmp_path / "copy.h5", "--out", tmp_path / "r",
                   code=1)  # fmt: skip
    assert "are in more than one of" in twice.output


def test_evaluate_says_what_skip_missing_left_out_and_refuses_checkpoint_flags(tmp_path):
    data, run = gqa_color_task(tmp_path), tmp_path / "run"
    vlpipe("train", *data, *QUICK, "--out", run)
    questions = json.loads((tmp_path / "q.json").read_text())
    questions["x"] = {"imageId": "img99", "question": "what color is the shape?", "answer": "red"}
    (tmp_path / "q2.json").write_text(json.dumps(questions))
    out = vlpipe("evaluate", "--run", run, *data[:4], "--annotations", tmp_path / "q2.json",
                 "--skip-missing", "--json")  # fmt: skip
    result = json.loads(out.stdout)
    assert result["skipped"] == 1 and "not the official split" in result["warnings"][-1]
    refused = vlpipe("evaluate", "--run", run, *data[:4], "--annotations", tmp_path / "q.json",
                     "--answers", "a.json", code=1)  # fmt: skip
    assert "--answers: for LXMERT checkpoints from elsewhere" in refused.output


def test_numbers_are_read_as_strings_where_a_string_is_declared(tmp_path):
    data, run = gqa_color_task(tmp_path), tmp_path / "run"
    vlpipe("train", *data, *QUICK, "--out", run, "--set", "eval.vqa_eval=2016")
    assert _meta(run)["evaluation"]["vqa_revision"] == "2016"


def test_a_corrupt_run_record_is_one_line(tmp_path):
    data, run = gqa_color_task(tmp_path), tmp_path / "run"
    vlpipe("train", *data, *QUICK, "--out", run)
    (run / (run / "LATEST").read_text() / "run.json").write_text("{not json")
    out = vlpipe("evaluate", "--run", run, *data[:4], "--annotations", data[-1], code=1)
    assert "not a readable run record" in out.output and "Traceback" not in out.output


def test_a_cache_records_a_config_that_replays(tmp_path):
    from tests.conftest import TINY_VIT_ARGS, write_image
    from vlpipe.cache import FeatureCache
    from vlpipe.config import to_toml
    from vlpipe.pipelines.configs import ExtractJob
    from vlpipe.pipelines.extract_job import resolve_extract

    write_image(tmp_path / "imgs" / "a.png")
    vlpipe("extract", "--dataset", "folder", "--root", tmp_path / "imgs", *TINY_VIT_ARGS,
           "--out", tmp_path / "a.h5")  # fmt: skip
    recorded = FeatureCache(tmp_path / "a.h5").provenance["config"]
    (tmp_path / "again.toml").write_text(to_toml(resolve_extract(recorded)))
    vlpipe("extract", "--config", tmp_path / "again.toml", "--out", tmp_path / "b.h5")
    a, b = FeatureCache(tmp_path / "a.h5"), FeatureCache(tmp_path / "b.h5")
    assert (a["a"]["image_cls"] == b["a"]["image_cls"]).all()
    assert isinstance(resolve_extract(recorded), ExtractJob)


def test_natural_order_is_total():
    from vlpipe.data_manifests.base import natural_key

    keys = ["img10", "img01", "img2", "img1", "x" + "9" * 5000]
    # equal numbers ("01", "1") are ordered by the key itself, so the order never depends on input
    assert sorted(keys, key=natural_key) == ["img01", "img1", "img2", "img10", "x" + "9" * 5000]
    assert sorted(reversed(keys), key=natural_key) == sorted(keys, key=natural_key)
