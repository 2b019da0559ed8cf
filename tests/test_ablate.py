"""`vlpipe ablate` and `vlpipe report`: a 2x2 grid on tiny caches end to end (table rows, plot
files, skip on rerun, resume, failures recorded), the grid file's rules, the report of any runs."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest

from tests.conftest import vlpipe
from tests.fusion_fixtures import gqa_color_task
from vlpipe.errors import ConfigError
from vlpipe.pipelines.grid import load_grid


def write_grid(folder: Path, extra: str = "", variants: str | None = None) -> Path:
    """A 2 fusions x 2 seeds grid over the tiny GQA colour task's caches."""
    args = gqa_color_task(folder)
    image, text, questions = args[1], args[3], args[7]
    variants = variants or (
        '[variants.concat]\nfusion = "concat"\n\n'
        '[variants.cross]\nfusion = "cross"\nmodel = {hidden = 16, heads = 2, layers = 1}\n'
    )
    grid = f"""# tiny grid: two fusions, two seeds
[base]
task = "gqa"
data.features = ["{image}"]
data.text_features = ["{text}"]
data.annotations = ["{questions}"]
val.annotations = ["{questions}"]
optim.epochs = 2
optim.batch_size = 8
optim.lr = 0.003

[grid]
optim.seed = [0, 1]
{extra}
{variants}"""
    path = folder / "grid.toml"
    path.write_text(grid)
    return path


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def best_accuracy(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    return max(r["accuracy"] for r in rows)


def test_grid_2x2_end_to_end_then_skip_on_rerun(tmp_path):
    grid = write_grid(tmp_path)
    out = tmp_path / "abl"
    result = vlpipe("ablate", grid, "--out", out, "--jobs", "2", "--threads", "1")
    assert "4 runs (4 new)" in result.output
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == ["concat_seed=0", "concat_seed=1", "cross_seed=0", "cross_seed=1"]
    for name in runs:
        state = json.loads((out / "runs" / name / "ablate.json").read_text())
        assert state["state"] == "done", state
        assert (out / "runs" / name / "LATEST").exists()
    rows = read_csv(out / "results.csv")
    assert [r["configuration"] for r in rows] == ["concat", "cross"]
    assert all(r["seeds"] == "2" for r in rows)
    # the colour is in the features: concat learns it
    assert float(rows[0]["accuracy_mean"]) > 50, rows
    for row in rows:  # mean and sample std over the seeds of each run's best validation
        best = [best_accuracy(out / "runs" / f"{row['configuration']}_seed={s}") for s in (0, 1)]
        assert float(row["accuracy_mean"]) == pytest.approx(statistics.fmean(best), abs=1e-4)
        assert float(row["accuracy_std"]) == pytest.approx(statistics.stdev(best), abs=1e-4)
    assert all(int(float(r["params"])) > 0 for r in rows)
    assert all(0 < float(r["train_seconds"]) < 120 for r in rows)  # the trainer's wall time
    table = (out / "results.md").read_text()
    assert "| concat | 2 |" in table and "| cross | 2 |" in table
    for plot in ("results.png", "curves.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = (out / "runs" / "concat_seed=0" / "LATEST").stat().st_mtime_ns
    again = vlpipe("ablate", grid, "--out", out)
    assert "4 runs (4 done)" in again.output
    assert "start" not in again.output
    assert (out / "runs" / "concat_seed=0" / "LATEST").stat().st_mtime_ns == stamp


def test_failing_run_recorded_others_go_on_then_retried(tmp_path):
    variants = (
        '[variants.good]\nfusion = "concat"\n\n'
        # the cross fusion's heads must divide its width: this run fails inside `vlpipe train`
        '[variants.bad]\nfusion = "cross"\nmodel = {hidden = 15, heads = 2, layers = 1}\n'
    )
    grid = write_grid(tmp_path, variants=variants)
    text = grid.read_text().replace("optim.seed = [0, 1]", "optim.seed = [0]")
    grid.write_text(text)
    out = tmp_path / "abl"
    result = vlpipe("ablate", grid, "--out", out, "--threads", "1", code=1)
    assert "1 runs failed" in result.output
    good = json.loads((out / "runs" / "good" / "ablate.json").read_text())
    bad = json.loads((out / "runs" / "bad" / "ablate.json").read_text())
    assert good["state"] == "done"
    assert bad["state"] == "failed" and "exit status 1" in bad["error"]
    assert [r["configuration"] for r in read_csv(out / "results.csv")] == ["good"]
    again = vlpipe("ablate", grid, "--out", out, "--dry-run", code=0)
    assert "1 done, 1 failed" in again.output or "1 failed" in again.output


def test_interrupted_run_resumes(tmp_path):
    grid = write_grid(tmp_path, variants='[variants.concat]\nfusion = "concat"\n')
    grid.write_text(grid.read_text().replace("optim.seed = [0, 1]", "optim.seed = [0]"))
    out = tmp_path / "abl"
    from vlpipe.pipelines import ablate
    from vlpipe.pipelines.grid import load_grid as grid_of

    (planned,) = ablate.plan_runs(grid_of(grid, out))
    run = planned.run_dir
    run.mkdir(parents=True)
    (run / ablate.CONFIG).write_text(planned.config)
    (run / ablate.STATE).write_text('{"state": "running"}')
    # what a kill part-way leaves: the run's config, a checkpoint, the state "running"
    vlpipe("train", "--config", run / ablate.CONFIG, "--max-steps", "2", "--no-progress")
    result = vlpipe("ablate", grid, "--out", out, "--threads", "1")
    assert "1 runs (1 interrupted)" in result.output
    assert "--resume" in (run / ablate.LOG).read_text()
    meta = json.loads((run / (run / "LATEST").read_text() / "run.json").read_text())
    assert meta["step"] == 6  # 2 epochs x 3 batches: the rest of the run, not a new one
    assert json.loads((run / ablate.STATE).read_text())["state"] == "done"


def test_dry_run_lists_and_runs_nothing(tmp_path):
    grid = write_grid(tmp_path)
    out = tmp_path / "abl"
    result = vlpipe("ablate", grid, "--out", out, "--dry-run")
    assert "4 runs (4 new)" in result.output
    assert "cross_seed=1" in result.output
    assert not (out / "runs").exists()


def test_grid_names_and_product(tmp_path):
    grid = write_grid(tmp_path, extra="optim.lr = [0.001, 0.0003]")
    g = load_grid(grid, tmp_path / "o")
    names = [r.name for r in g.runs]
    assert len(names) == 8 and "cross_lr=0.0003_seed=1" in names
    run = next(r for r in g.runs if r.name == "cross_lr=0.0003_seed=1")
    assert run.layer["optim"]["lr"] == 0.0003 and run.layer["optim"]["seed"] == 1
    assert run.layer["optim"]["epochs"] == 2  # the base stays under the point
    assert run.configuration == "cross_lr=0.0003"
    assert run.layer["out"] == str(tmp_path / "o" / "runs" / run.name)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("optim.lr = 0.1", "must be a non-empty list"),
        ("optim.lr = []", "must be a non-empty list"),
        ('[variants."a b"]\nfusion = "concat"', "names may use"),
        ("[caches.x]\nbackbone = 'vit'\n[bogus]\na = 1", "unknown section"),
    ],
)
def test_bad_grid_files(tmp_path, extra, message):
    grid = write_grid(tmp_path, extra=extra)
    with pytest.raises(ConfigError, match=message):
        load_grid(grid, tmp_path / "o")


def test_bad_value_in_a_run_fails_before_anything_runs(tmp_path):
    grid = write_grid(tmp_path, extra="optim.batch_size = [0, 8]")
    result = vlpipe("ablate", grid, "--out", tmp_path / "o", code=1)
    assert "batch_size" in result.output and "must be >= 1" in result.output
    assert not (tmp_path / "o" / "runs").exists()


def test_unknown_cache_reference(tmp_path):
    grid = write_grid(tmp_path)
    grid.write_text(
        grid.read_text().replace('data.text_features = ["', 'data.x = ["cache:nope", "')
    )
    with pytest.raises(ConfigError, match="names no"):
        load_grid(grid, tmp_path / "o")


def test_grid_caches_extracted_once(tmp_path, image_folder, capsys):
    """[caches] tables are extraction jobs run before the grid; cache:NAME is their path and a
    rerun reuses them."""
    grid = tmp_path / "g.toml"
    grid.write_text(
        f"""[caches.vit]
backbone = "vit"
dataset = "folder"
root = "{image_folder}"
weights = "random"
arch = "vit_tiny_patch16_224"
model = {{embed_dim = 32, depth = 2, num_heads = 2}}
image_size = 32
run.num_workers = 0

[base]
task = "gqa"
data.features = ["cache:vit"]
"""
    )
    g = load_grid(grid, tmp_path / "o")
    assert g.runs[0].layer["data"]["features"] == [str(tmp_path / "o" / "caches" / "vit.h5")]
    from vlpipe.pipelines.ablate import extract_caches
    from vlpipe.pipelines.configs import AblateJob

    job = AblateJob(grid=grid, out=tmp_path / "o", progress=False)
    extract_caches(g, job)
    shards = sorted((tmp_path / "o" / "caches" / "vit.h5.shards").glob("*.h5"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    extract_caches(g, job)  # reused: no shard written again
    assert sorted((tmp_path / "o" / "caches" / "vit.h5.shards").glob("*.h5")) == shards
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    assert "0 new items, 6 reused" in capsys.readouterr().out


def test_report_of_plain_runs_groups_seeds(tmp_path):
    """`vlpipe report` reads any run folders: two seeds of one config are one row."""
    args = gqa_color_task(tmp_path)
    common = [*args, "--val-annotations", args[7], "--epochs", "1", "--batch-size", "8"]
    for seed in (0, 1):
        vlpipe(
            "train",
            *common,
            "--seed",
            seed,
            "--out",
            tmp_path / "runs" / f"r_seed={seed}",
            "--no-progress",
        )
    vlpipe("train", *common, "--lr", "0.01", "--out", tmp_path / "runs" / "other", "--no-progress")
    result = vlpipe("report", tmp_path / "runs", "--out", tmp_path / "rep")
    rows = read_csv(tmp_path / "rep" / "results.csv")
    assert [(r["configuration"], r["seeds"]) for r in rows] == [("other", "1"), ("r", "2")]
    assert "vit" in rows[0]["image_features"] and "sha256" in rows[0]["image_features"]
    assert "| r | 2 |" in result.output


def test_report_without_runs_is_an_error(tmp_path):
    result = vlpipe("report", tmp_path, code=1)
    assert "no run folders" in result.output


def test_submitit_local_executor(tmp_path):
    """The SLURM path through submitit, on its local executor: same runs, same table."""
    pytest.importorskip("submitit", reason="pip install submitit (in the dev extra)")
    grid = write_grid(tmp_path, variants='[variants.concat]\nfusion = "concat"\n')
    grid.write_text(grid.read_text().replace("optim.seed = [0, 1]", "optim.seed = [0]"))
    out = tmp_path / "abl"
    vlpipe("ablate", grid, "--out", out, "--executor", "submitit-local", "--threads", "1")
    state = json.loads((out / "runs" / "concat" / "ablate.json").read_text())
    assert state["state"] == "done", state
    assert [r["configuration"] for r in read_csv(out / "results.csv")] == ["concat"]


def test_a_changed_grid_restarts_untrained_runs_and_keeps_trained_ones(tmp_path):
    from vlpipe.pipelines.ablate import CONFIG, STATE, _state

    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG).write_text("old = 1\n")
    (run / STATE).write_text('{"state": "running"}')  # stopped before its first checkpoint
    assert _state(run, "new = 1\n") == ("new", None)
    (run / "LATEST").write_text("ckpt-0000001")  # it trained: its results are the old config's
    state, error = _state(run, "new = 1\n")
    assert state == "changed" and "another config" in error
    assert _state(run, "old = 1\n")[0] == "interrupted"
