"""`vlpipe demo` on a few easy-VQA images: it runs, prints per-answer-type accuracy, and a
second run in the same folder reuses its caches and replaces its own run."""

from __future__ import annotations

import json

from tests.conftest import vlpipe

QUICK = ("--limit", "12", "--epochs", "1", "--num-workers", "0", "--no-progress")


def test_demo_twice_in_one_folder(tmp_path, minilm_dir):
    work = tmp_path / "demo"
    args = ("demo", "--workdir", work, "--vision", "vit", "--text-weights", minilm_dir, *QUICK)
    first = vlpipe(*args)
    assert "RANDOM-INIT" in first.output  # offline, the paper's ViT has no pretrained weights
    assert "easy-VQA test accuracy" in first.output and "shape" in first.output
    caches = sorted(work.glob("*.h5"))
    assert len(caches) == 4
    shards = {p: p.stat().st_mtime_ns for p in work.glob("*.shards/*.h5")}
    (work / "notes.txt").write_text("mine")  # a file of the user's in the demo folder
    second = vlpipe(*args)
    assert second.output.count("0 new items") == 4  # every cache reused
    assert {p: p.stat().st_mtime_ns for p in work.glob("*.shards/*.h5")} == shards
    assert (work / "notes.txt").read_text() == "mine"
    run = work / "run_concat"
    meta = json.loads((run / (run / "LATEST").read_text() / "run.json").read_text())
    log_rows = (run / "train_log.csv").read_text().splitlines()[1:]
    assert len(log_rows) == meta["step"] >= 1  # one run's steps, not two runs' logs
    rows = (run / "eval_log.jsonl").read_text().splitlines()
    assert len(rows) == 1  # the run was replaced, not continued or appended to
