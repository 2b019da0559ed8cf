"""`vlpipe train --tune-top K` from middle-layer caches: the frozen blocks stay as the weights
made them and the top K train, at --encoder-lr; evaluate rebuilds the tops and agrees with the
trainer's validation; resume is exact with dropout in the tops; wrong uses are clean errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import vlpipe
from tests.test_encoder_top import BERT, VIT, bert_folder, vit_file
from vlpipe.fusion.checkpoint import latest_checkpoint

IMAGES, QUESTIONS = 12, 100  # the questions of the first 12 easy-VQA images are more than 100


def _extract(out, split, limit, *args):
    easy = ["--dataset", "easy-vqa", "--split", split, "--limit", limit, "--dtype", "float32"]
    vlpipe("extract", *easy, "--num-workers", 0, "--no-progress", *args, "--out", out)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Layer-2-of-4 ViT and layer-2-of-4 BERT caches of easy-VQA train and test, the weights."""
    tmp = tmp_path_factory.mktemp("tune")
    vit, bert = vit_file(tmp / "vit.safetensors"), bert_folder(tmp / "bert")
    for split in ("train", "test"):
        _extract(tmp / f"v_{split}.h5", split, IMAGES, *VIT, "--weights", vit, "--layer", 2)
        _extract(tmp / f"t_{split}.h5", split, QUESTIONS, *BERT, "--weights", bert, "--layer", 2)
        _extract(tmp / f"v4_{split}.h5", split, IMAGES, *VIT, "--weights", vit)
    return tmp, vit, bert


def _args(tmp, vit, bert, out, *extra):
    return [
        "train", "--task", "easy-vqa", "--split", "train", "--limit", QUESTIONS,
        "--val-split", "test", "--val-limit", 40, "--fusion", "concat",
        "--features", tmp / "v_train.h5", "--text-features", tmp / "t_train.h5",
        "--val-features", tmp / "v_test.h5", "--val-text-features", tmp / "t_test.h5",
        "--tune-top", 1, "--vision-weights", vit, "--text-weights", bert,
        "--lr", 1e-3, "--encoder-lr", 1e-4, "--epochs", 2, "--batch-size", 16,
        "--out", out, "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run(caches):
    tmp, vit, bert = caches
    vlpipe(*_args(tmp, vit, bert, tmp / "run"))
    return tmp / "run"


def _weights(run_dir):
    return load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


def test_frozen_blocks_keep_their_weights_and_the_top_trains(caches, run):
    tmp, vit, bert = caches
    state = _weights(run)
    vit_state = load_file(str(vit))
    bert_state = load_file(str(bert / "model.safetensors"))
    bert_state = {k.removeprefix("bert."): v for k, v in bert_state.items()}
    # blocks 3..4 of 4 are rebuilt: tops.vision.blocks.0 is block 3 (frozen), .1 block 4
    for name, value in vit_state.items():
        if name.startswith("blocks.2."):
            assert torch.equal(state["tops.vision.blocks.0." + name[9:]], value), name
    changed = [
        n for n, v in vit_state.items()
        if n.startswith("blocks.3.") and not torch.equal(state["tops.vision.blocks.1." + n[9:]], v)
    ]  # fmt: skip
    assert changed, "the trained ViT block did not move"
    assert not torch.equal(state["tops.vision.norm.weight"], vit_state["norm.weight"])
    for name, value in bert_state.items():
        if name.startswith("encoder.layer.2."):
            assert torch.equal(state["tops.text.blocks.0." + name[16:]], value), name
    assert any(
        not torch.equal(state["tops.text.blocks.1." + n[16:]], v)
        for n, v in bert_state.items()
        if n.startswith("encoder.layer.3.")
    )


def test_encoder_blocks_train_at_their_own_learning_rate(caches, run):
    from vlpipe.fusion.train import make_optimizer
    from vlpipe.fusion.train_config import TrainConfig
    from vlpipe.pipelines.data import model_from_meta

    meta = json.loads((latest_checkpoint(run) / "run.json").read_text())
    model = model_from_meta(meta)
    opt = make_optimizer(model, TrainConfig(lr=1e-3, encoder_lr=1e-4))
    top_ids = {id(p) for n, p in model.named_parameters() if n.startswith("tops.")}
    for group in opt.param_groups:
        tops = {id(p) in top_ids for p in group["params"]}
        assert len(tops) == 1  # a group is all encoder or all fusion / head
        assert group["lr"] == (1e-4 if tops.pop() else 1e-3)
    trained = {id(p) for p in model.parameters() if p.requires_grad}
    assert trained == {id(p) for g in opt.param_groups for p in g["params"]}
    default = make_optimizer(model, TrainConfig(lr=1e-3))
    assert {g["lr"] for g in default.param_groups} == {1e-3}


def test_evaluate_rebuilds_the_tops_and_agrees_with_validation(caches, run):
    tmp, _, _ = caches
    out = vlpipe(
        "evaluate", "--run", run, "--features", tmp / "v_test.h5",
        "--text-features", tmp / "t_test.h5", "--split", "test", "--limit", 40, "--json",
    )  # fmt: skip
    results = json.loads(out.stdout.strip().splitlines()[-1])
    last = json.loads((run / "eval_log.jsonl").read_text().splitlines()[-1])
    assert results["accuracy"] == pytest.approx(last["accuracy"])


def test_resume_with_dropout_in_the_tops_is_exact(caches, run):
    tmp, vit, bert = caches
    out = tmp / "resumed"
    vlpipe(*_args(tmp, vit, bert, out, "--max-steps", 5))
    vlpipe(*_args(tmp, vit, bert, out, "--resume"))
    a, b = _weights(run), _weights(out)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "change, named",
    [
        ({"--features": "v4_train.h5", "--text-weights": None}, "--vision-weights"),
        ({"--tune-top": 0}, "--vision-weights"),
        ({"--vision-weights": None}, "--vision-weights"),
        ({"--vision-weights": "bert/model.safetensors"}, "sha256"),
        ({"--tune-top": 3}, "--tune-top"),
    ],
)
def test_wrong_uses_are_clean_errors(caches, tmp_path, change, named):
    """a last-layer image cache with --vision-weights; weights without --tune-top; a middle-layer
    cache without its weights; other weights; more blocks than the cache leaves."""
    tmp, vit, bert = caches
    args = _args(tmp, vit, bert, tmp_path / "run")
    for flag, value in change.items():
        i = args.index(flag)
        if value is None:
            del args[i : i + 2]
        else:
            args[i + 1] = tmp / value if isinstance(value, str) else value
    result = vlpipe(*args, code=1)
    assert named in result.output and "Traceback" not in result.output
