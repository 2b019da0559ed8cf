"""Job configs on the command line: --config files, flags over them, presets, values checked
where they are declared, and a saved config.toml that reproduces its run."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import vlpipe
from tests.fusion_fixtures import gqa_color_task, logged_losses

QUICK = ["--epochs", "2", "--batch-size", "8", "--no-progress"]


def _weights(run):
    return load_file(str(run / (run / "LATEST").read_text() / "model.safetensors"))


def test_saved_config_reproduces_the_run(tmp_path):
    data = gqa_color_task(tmp_path)
    vlpipe("train", *data, *QUICK, "--lr", "3e-3", "--seed", "7", "--out", tmp_path / "a")
    saved = (tmp_path / "a" / "config.toml").read_text()
    assert "lr = 0.003" in saved and "seed = 7" in saved and "resume" not in saved
    again = vlpipe("train", "--config", tmp_path / "a" / "config.toml", "--out", tmp_path / "b")
    assert "done" in again.output
    assert logged_losses(tmp_path / "a") == logged_losses(tmp_path / "b")
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_flags_override_the_file_and_set_overrides_the_file(tmp_path):
    data = gqa_color_task(tmp_path)
    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.01\n  epochs: 1\n  seed: 3\n")
    vlpipe(
        "train",
        *data,
        "--config",
        tmp_path / "c.yaml",
        "--set",
        "optim.seed=4",
        "--lr",
        "0.02",
        "--no-progress",
        "--out",
        tmp_path / "run",
    )
    meta = json.loads(
        (tmp_path / "run" / (tmp_path / "run" / "LATEST").read_text() / "run.json").read_text()
    )
    assert (meta["train"]["lr"], meta["train"]["epochs"], meta["train"]["seed"]) == (0.02, 1, 4)
    assert meta["config"]["preset"] == "concat"  # the fusion's preset under the file


def test_presets_are_listed_and_applied(tmp_path):
    out = vlpipe("presets").output
    for name in ("lxmert-vqa", "lxmert-gqa", "lxmert-nlvr2", "concat", "demo"):
        assert name in out
    data = gqa_color_task(tmp_path)
    vlpipe(
        "train",
        *data,
        "--preset",
        "demo",
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        tmp_path / "r",
    )
    meta = json.loads(
        (tmp_path / "r" / (tmp_path / "r" / "LATEST").read_text() / "run.json").read_text()
    )
    assert meta["train"]["lr"] == 1e-3 and meta["train"]["batch_size"] == 128


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--max-steps", "-1"], "--max-steps must be >= 0"),
        (["--lr", "-1"], "--lr must be >= 0"),
        (["--device", "gpu"], "--device 'gpu': expected auto, cpu, cuda, cuda:N or mps"),
        (["--optimizer", "sgd"], "--optimizer must be one of adamw, bertadam"),
        (["--max-length", "0"], "--max-length must be >= 3"),
        (["--fusion", "nope"], "--fusion must be one of concat, lstm, lxmert, cross"),
        (
            ["--model-config", '{"hidden": "x"}'],
            "--model-config (concat): unknown option(s) hidden",
        ),
        (["--fusion", "cross", "--model-config", '{"layers": "x"}'], "layers should be an integer"),
        (["--model-config", "[1]"], "--model-config must be a JSON object"),
        (["--set", "optim.lr=abc"], "--lr should be a number, got 'abc'"),
        (["--set", "optim.nope=1"], "unknown option(s) nope"),
        (["--vqa-eval", "2019"], "--vqa-eval must be one of 2021, 2016"),
        (["--limit", "0"], "--limit must be >= 1"),
        (["--threads", "-1"], "--threads must be >= 0"),
    ],
)
def test_wrong_values_get_one_line_naming_the_option(tmp_path, args, message):
    data = gqa_color_task(tmp_path)
    result = vlpipe("train", *data, *args, "--no-progress", "--out", tmp_path / "run", code=1)
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_cuda_without_a_gpu_is_named(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")  # the error only exists without one
    data = gqa_color_task(tmp_path)
    result = vlpipe("train", *data, "--device", "cuda", "--out", tmp_path / "run", code=1)
    assert "--device cuda: no CUDA GPU on this machine" in result.output


def test_missing_required_and_bad_config_file(tmp_path):
    assert "--task is required" in vlpipe("train", "--out", tmp_path / "r", code=1).output
    (tmp_path / "bad.toml").write_text("[optim\n")
    result = vlpipe("train", "--config", tmp_path / "bad.toml", code=1)
    assert "bad.toml" in result.output


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "score"])
def test_each_flag_once_and_every_default_in_help(command, monkeypatch):
    from vlpipe.pipelines import configs
    from vlpipe.pipelines.cli import TRAIN_PREFIXES
    from vlpipe.pipelines.options import flags_of

    cls = {
        "train": configs.TrainJob,
        "evaluate": configs.EvaluateJob,
        "predict": configs.PredictJob,
        "score": configs.ScoreJob,
    }[command]
    flags = [f.option for f in flags_of(cls, TRAIN_PREFIXES if command == "train" else None)]
    assert len(flags) == len(set(flags)), sorted(f for f in flags if flags.count(f) > 1)
    monkeypatch.setenv("COLUMNS", "250")  # one line per option
    helptext = vlpipe(command, "--help").output
    if command == "train":
        assert "default 32" in helptext and "default 4" in helptext and "--config" in helptext
        lines = {line.split()[1]: line for line in helptext.splitlines() if "│ --" in line}
        for option in ("--grad-accum", "--val-every", "--early-stop", "--early-stop-delta"):
            assert "; default " in lines[option], lines[option]
    if command in ("evaluate", "predict"):
        assert "--checkpoint" in helptext and "best | latest | a step number" in helptext


TINY_EXTRACT = ["--weights", "random", "--arch", "vit_tiny_patch16_224", "--image-size", "32"]
TINY_EXTRACT += ["--model-config", '{"embed_dim": 32, "depth": 1, "num_heads": 2}', "--no-progress"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backbone", "vit", "--image-size", "0"], "--image-size must be >= 16, got 0"),
        (["--backbone", "vit", "--shard-items", "0"], "--shard-items must be >= 1, got 0"),
        (["--backbone", "vit", "--precision", "fp8"], "--precision must be one of fp32"),
        (["--backbone", "vit", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--backbone", "vit", "--arch", "vit_tiny_patch"], "not a timm architecture; close:"),
        (["--backbone", "vit", "--max-length", "30"], "--max-length: only for --backbone bert"),
        (["--backbone", "vit", "--layer", "layer2"], "--layer 'layer2': N, the encoder blocks"),
        (["--backbone", "frcnn", "--layer", "2"], "--layer: only for --backbone vit | bert | res"),
        (["--backbone", "vit", "--weights-layout", "timm"], "--weights-layout: only for"),
        (["--backbone", "vit", "--annotations", "q.json"], "--annotations: image backbones"),
        (["--backbone", "frcnn", "--cls-only"], "--cls-only: only for --backbone vit | resnet |"),
        (["--backbone", "nope"], "--backbone must be one of vit, bert, resnet, cnn, frcnn"),
    ],
)
def test_wrong_extract_values_name_the_option(tmp_path, args, message):
    from tests.conftest import write_image

    write_image(tmp_path / "imgs" / "a.png")
    result = vlpipe(
        "extract",
        "--dataset",
        "folder",
        "--root",
        tmp_path / "imgs",
        *TINY_EXTRACT,
        *args,
        "--out",
        tmp_path / "c.h5",
        code=1,
    )
    assert message in result.output and "Traceback" not in result.output


def test_bert_options_are_checked_too(tmp_path):
    result = vlpipe(
        "extract",
        "--backbone",
        "bert",
        "--dataset",
        "easy-vqa",
        "--split",
        "test",
        "--weights",
        "random",
        "--image-size",
        "64",
        "--out",
        tmp_path / "b.h5",
        code=1,
    )
    expect = "--image-size: only for --backbone vit | resnet | cnn | frcnn, not 'bert'"
    assert expect in result.output


@pytest.mark.parametrize("case", ["text cache as features", "min count", "folder", "no answers"])
def test_wrong_training_inputs_are_named(tmp_path, case):
    data = gqa_color_task(tmp_path)
    args, message = {
        "text cache as features": (
            ["--features", tmp_path / "txt.h5", "--annotations", tmp_path / "q.json"],
            "--features takes image caches",
        ),
        "min count": (
            [*data[:4], "--annotations", tmp_path / "q.json", "--min-answer-count", "100"],
            "no answer is given for at least 100 of the 24 training questions",
        ),
        "folder": ([*data[:4], "--annotations", tmp_path], "is a folder, not an annotation file"),
        "no answers": ([*data[:4], "--annotations", tmp_path / "u.json"], "no training example"),
    }[case]
    questions = json.loads((tmp_path / "q.json").read_text())
    (tmp_path / "u.json").write_text(
        json.dumps({k: {**v, "answer": None} for k, v in questions.items()})
    )
    result = vlpipe("train", "--task", "gqa", *args, "--out", tmp_path / "r", code=1)
    assert message in result.output and "Traceback" not in result.output


def test_fusions_lists_every_fusion_and_its_fields():
    from vlpipe.fusion.registry import FUSIONS

    out = vlpipe("fusions").output
    for name in FUSIONS:
        assert f"{name}: " in out
    assert "l_layers = 9" in out and "visual_feat_dim = 2048  (from the caches)" in out
