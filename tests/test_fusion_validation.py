"""Validation during training: the BEST checkpoint (kept from pruning), early stopping and its
exact resume, and which checkpoint `evaluate` / `predict` read (--checkpoint best|latest|N).

The validation figures are scripted (the trainer's `evaluate` replaced), so each test decides
which validation is the best and when patience runs out."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import vlpipe
from tests.fusion_fixtures import DIM, color_records, gqa_color_task, image_cache, text_cache
from vlpipe.fusion import checkpoint as ckpt
from vlpipe.fusion import train as train_module
from vlpipe.fusion.answers import AnswerVocab
from vlpipe.fusion.data import CacheSet, TaskDataset
from vlpipe.fusion.model import TaskModel, make_fusion_config
from vlpipe.fusion.tasks import Task
from vlpipe.fusion.train import TrainConfig, train
from vlpipe.pipelines import eval_job  # noqa: F401 - binds the real evaluate before any script

CE = Task("color", "ce")  # headline: accuracy


@pytest.fixture
def data(tmp_path):
    image_cache(tmp_path / "img.h5", 12)
    recs = color_records(12)
    text_cache(tmp_path / "txt.h5", recs)
    images, texts = CacheSet([tmp_path / "img.h5"]), CacheSet([tmp_path / "txt.h5"])
    vocab = AnswerVocab(["red", "green", "blue"])
    return TaskDataset(CE, recs, images, texts, vocab, ("image_cls", "text_cls"))


def scripted(monkeypatch, accuracies):
    """Validations score these accuracies, one per validation, in order."""
    figures = iter(accuracies)
    monkeypatch.setattr(
        train_module, "evaluate", lambda *args, **kwargs: ({"accuracy": next(figures)}, {})
    )


def fit(data, run_dir, resume=False, **options):
    """24 questions, batch 4: 6 steps an epoch, validated after every step."""
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 4, "lr": 1e-2, "val_every": 1, **options})
    torch.manual_seed(0)
    config = make_fusion_config("concat", {"image_dim": DIM, "text_dim": DIM})
    model = TaskModel("concat", config, 3)
    train(model, CE, data, cfg, run_dir, {"task": "color"}, val=data, resume=resume,
          progress=False)  # fmt: skip
    return model


def steps_logged(run_dir) -> list[int]:
    return [int(line.split(",")[0]) for line in (run_dir / "train_log.csv").read_text().split()[1:]]


def test_best_names_the_highest_validation_and_survives_pruning(data, tmp_path, monkeypatch):
    scripted(monkeypatch, [10, 60, 30, 40, 20, 50])
    run = tmp_path / "run"
    fit(data, run)
    # the newest, the best, and KEEP (2) more
    assert ckpt.checkpoint_steps(run) == [2, 4, 5, 6]
    assert ckpt.best_checkpoint(run) == run / "ckpt-0000002"
    assert ckpt.latest_checkpoint(run) == run / "ckpt-0000006"
    meta = ckpt.load_meta(run / "ckpt-0000002")
    assert meta["eval"] == {"accuracy": 60} and meta["best"]["step"] == 2
    state = ckpt.load_trainer_state(run / "ckpt-0000006")
    assert state["best"] == {"metric": "accuracy", "value": 60.0, "step": 2}
    path, reason = ckpt.select_checkpoint(run)
    assert path == run / "ckpt-0000002" and reason.startswith("best accuracy 60.00 at step 2 of 6")


def test_early_stop_at_the_right_validation_and_exactly_after_a_resume(
    data, tmp_path, monkeypatch, capsys
):
    figures = [10, 50, 30, 40, 20, 70]  # the best at step 2; patience 2 runs out at step 4
    scripted(monkeypatch, figures)
    fit(data, tmp_path / "a", early_stop=2)
    assert steps_logged(tmp_path / "a") == [1, 2, 3, 4]
    assert "stopped at step 4: early_stop after 2 validations" in capsys.readouterr().out
    meta = ckpt.load_meta(ckpt.latest_checkpoint(tmp_path / "a"))
    assert meta["step"] == 4 and meta["stopped"].startswith("early_stop after 2 validations")
    # cut after the first validation that did not improve: the count resumes with the run
    scripted(monkeypatch, figures)
    fit(data, tmp_path / "b", early_stop=2, max_steps=3)
    fit(data, tmp_path / "b", early_stop=2, resume=True)
    assert steps_logged(tmp_path / "b") == [1, 2, 3, 4]
    assert ckpt.latest_checkpoint(tmp_path / "b").name == "ckpt-0000004"
    # a run that stopped early stays stopped; a larger patience continues it
    fit(data, tmp_path / "b", early_stop=2, resume=True)
    assert "nothing more to train" in capsys.readouterr().out
    assert steps_logged(tmp_path / "b") == [1, 2, 3, 4]
    fit(data, tmp_path / "b", early_stop=3, resume=True)  # step 5 scores 20: the third
    assert steps_logged(tmp_path / "b") == [1, 2, 3, 4, 5]


def test_early_stop_delta_counts_small_gains_as_none(data, tmp_path, monkeypatch):
    scripted(monkeypatch, [50, 50.5, 50.7, 90])
    fit(data, tmp_path / "run", early_stop=2, early_stop_delta=1.0)
    assert steps_logged(tmp_path / "run") == [1, 2, 3]
    assert ckpt.best_checkpoint(tmp_path / "run").name == "ckpt-0000003"  # still the highest


def test_a_trainer_state_without_the_validation_record_resumes(data, tmp_path, monkeypatch):
    scripted(monkeypatch, [10, 20, 30, 40, 50, 60])
    run = tmp_path / "run"
    fit(data, run, max_steps=2)
    state_file = ckpt.latest_checkpoint(run) / "trainer.pt"
    state = torch.load(state_file, weights_only=False)
    del state["best"], state["bad_evals"]  # as written before validation was recorded
    torch.save(state, state_file)
    fit(data, run, resume=True, early_stop=5)
    assert steps_logged(run) == list(range(1, 7)) and ckpt.best_checkpoint(run).name.endswith("6")


def test_evaluate_and_predict_choose_the_checkpoint(tmp_path, monkeypatch):
    args = gqa_color_task(tmp_path)
    quick = [*args, "--epochs", "2", "--batch-size", "8", "--no-progress"]
    scripted(monkeypatch, [10, 60, 30, 40, 20, 50])  # 6 steps, validated after each
    run = tmp_path / "run"
    vlpipe("train", *quick, "--val-annotations", args[-1], "--val-every", "1", "--out", run)
    scoring = ["--run", run, *args[:4], "--annotations", args[-1]]

    def evaluate(*extra, code=0):
        return vlpipe("evaluate", *scoring, *extra, "--json", code=code)

    best = evaluate()
    line = f"checkpoint: {run / 'ckpt-0000002'} (best accuracy 60.00 at step 2 of 6; the default"
    assert line in best.stderr
    assert json.loads(best.stdout)["checkpoint"]["path"] == str(run / "ckpt-0000002")
    assert "(latest, step 6)" in evaluate("--checkpoint", "latest").stderr
    assert "ckpt-0000004 (step 4, as --checkpoint asked)" in evaluate("--checkpoint", 4).stderr
    missing = evaluate("--checkpoint", 3, code=1)
    assert "no checkpoint of step 3; steps available: 2, 4, 5, 6" in missing.output
    assert "expected best, latest or a step" in evaluate("--checkpoint", "top", code=1).output
    shown = vlpipe("predict", *scoring, "--checkpoint", "5", "--out", tmp_path / "p.json")
    assert "ckpt-0000005 (step 5" in shown.output and (tmp_path / "p.json").exists()
    # validation settings may change on resume, the micro-batching may not
    vlpipe("train", *quick, "--val-annotations", args[-1], "--val-every", "2", "--out", run,
           "--resume")  # fmt: skip
    refused = vlpipe("train", *quick, "--val-annotations", args[-1], "--grad-accum", "2",
                     "--out", run, "--resume", code=1)  # fmt: skip
    assert "train.grad_accum: 1 -> 2" in refused.output


def test_a_run_without_validation_reads_its_latest_and_has_no_best(tmp_path):
    args = gqa_color_task(tmp_path)
    run = tmp_path / "run"
    vlpipe("train", *args, "--epochs", "1", "--batch-size", "8", "--no-progress", "--out", run)
    scoring = ["evaluate", "--run", run, *args[:4], "--annotations", args[-1]]
    assert "(latest, step 3; the default, as the run has no BEST)" in vlpipe(*scoring).stderr
    refused = vlpipe(*scoring, "--checkpoint", "best", code=1)
    assert "no best checkpoint (it never validated" in refused.output
    assert "Traceback" not in refused.output
    (tmp_path / "BEST.pth").write_bytes(b"")  # an LXMERT checkpoint is a single one
    foreign = ["--run", tmp_path / "BEST.pth", "--task", "gqa", "--checkpoint", "best"]
    single = vlpipe("evaluate", *foreign, *args[:4], "--annotations", args[-1], code=1)
    assert "is a single LXMERT checkpoint" in single.output
