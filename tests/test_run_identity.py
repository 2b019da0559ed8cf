"""What a run folder promises: --overwrite replaces only vlpipe's files, --resume continues only
the same run, and evaluation says when its features are not the ones the run was trained on."""

from __future__ import annotations

import json

from tests.conftest import vlpipe
from tests.fusion_fixtures import PROV, gqa_color_task, image_cache

TRAIN = ["--epochs", "2", "--batch-size", "8", "--lr", "1e-2", "--no-progress"]


def test_overwrite_replaces_the_run_and_keeps_the_users_files(tmp_path):
    data, run = gqa_color_task(tmp_path), tmp_path / "run"
    vlpipe("train", *data, *TRAIN, "--out", run)
    (run / "notes.txt").write_text("mine")
    again = vlpipe("train", *data, *TRAIN, "--out", run, code=1)
    assert "--overwrite" in again.output
    vlpipe("train", *data, *TRAIN, "--out", run, "--overwrite", "--seed", "5")
    meta = json.loads((run / (run / "LATEST").read_text() / "run.json").read_text())
    assert meta["train"]["seed"] == 5  # the new run, not the old one
    assert (run / "notes.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    assert "is a file" in vlpipe("train", *data, *TRAIN, "--out", tmp_path / "file", code=1).output


def test_resume_refuses_another_run_identity(tmp_path):
    data, run = gqa_color_task(tmp_path), tmp_path / "run"
    vlpipe("train", *data, *TRAIN, "--out", run, "--max-steps", "2")
    out = vlpipe("train", *data, *TRAIN, "--lr", "3e-2", "--out", run, "--resume", code=1)
    assert "train.lr: 0.01 -> 0.03" in out.output and "--accept-changes" in out.output
    out = vlpipe("train", *data, *TRAIN, "--limit", "20", "--out", run, "--resume", code=1)
    assert "training data.examples: 24 -> 20" in out.output
    # where and how long it runs may change
    vlpipe("train", *data, *TRAIN, "--out", run, "--resume", "--max-steps", "4", "--num-workers", 1)
    ok = vlpipe(
        "train", *data, *TRAIN, "--lr", "3e-2", "--out", run, "--resume", "--accept-changes"
    )
    assert "WARNING: resuming" in ok.output


def test_resume_on_features_of_another_size_is_a_clear_error(tmp_path):
    data, run = gqa_color_task(tmp_path), tmp_path / "run"
    vlpipe("train", *data, *TRAIN, "--out", run, "--max-steps", "2")
    wide = tmp_path / "wide"
    wide.mkdir()
    other = gqa_color_task(wide, dim=24)
    out = vlpipe("train", *other, *TRAIN, "--out", run, "--resume", "--accept-changes", code=1)
    assert "fusion_config.image_dim: 16 -> 24" in out.output and "Traceback" not in out.output
    out = vlpipe("evaluate", "--run", run, *other[:4], "--annotations", other[-1], code=1)
    assert "features of size 24" in out.output and "Traceback" not in out.output


def test_evaluate_warns_when_the_features_come_from_another_encoder(tmp_path):
    data, run = gqa_color_task(tmp_path), tmp_path / "run"
    vlpipe("train", *data, *TRAIN, "--out", run)
    image_cache(tmp_path / "other.h5", 12, prov=dict(PROV, weights_sha256="z"))
    args = ["evaluate", "--run", run, "--features", tmp_path / "other.h5", *data[2:4]]
    out = vlpipe(*args, "--annotations", tmp_path / "q.json", "--json")
    assert "WARNING: image features differ" in out.output and "weights_sha256" in out.output
    clean = vlpipe("evaluate", "--run", run, *data[:4], "--annotations", tmp_path / "q.json")
    assert "WARNING" not in clean.output
