"""`vlpipe train --tune-top K` end to end: middle-layer caches of a tiny ViT and a tiny BERT
(the tokens after block 2 of 4), the blocks above them rebuilt from the weights that made the
caches and trained with the fusion and head at their own learning rate; evaluate, predict and
--resume rebuild the same model from the run. The tops' equality with the full encoders is
tests/test_encoder_top.py's."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.conftest import vlpipe
from tests.test_encoder_top import bert_folder

VIT_CONFIG = {"depth": 4, "embed_dim": 32, "num_heads": 2}
VIT = ["--backbone", "vit", "--arch", "vit_tiny_patch16_224", "--image-size", 32]
VIT += ["--model-config", json.dumps(VIT_CONFIG), "--num-workers", 0]
EASY = ["--dataset", "easy-vqa", "--dtype", "float32", "--no-progress"]
# The first 120 training questions ask about images 0..11, the first 60 test ones about 0..5.
TRAIN_DATA = ["--task", "easy-vqa", "--split", "train", "--limit", 120]
OPTIM = ["--epochs", 2, "--batch-size", 16, "--lr", 1e-3, "--num-workers", 0, "--no-progress"]
LR, ENCODER_LR = 1e-3, 1e-4


def vit_file(path, seed: int = 0):
    """A tiny timm ViT's state dict as a .safetensors file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, **VIT_CONFIG)
    save_file(model.state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Paths: the weights (vit, bert, other: another ViT), layer-2 caches of both encoders for
    train (v2, t2) and test (v2_test, t2_test), and last-layer ones (vl, tl)."""
    tmp = tmp_path_factory.mktemp("tune")
    paths = {"vit": vit_file(tmp / "vit.safetensors"), "bert": bert_folder(tmp / "bert")}
    paths["other"] = vit_file(tmp / "other.safetensors", seed=1)
    vision = [*EASY, *VIT, "--weights", paths["vit"]]
    text = [*EASY, "--backbone", "bert", "--weights", paths["bert"]]
    for name, args, split, limit, layer in [
        ("v2", vision, "train", 12, 2),
        ("t2", text, "train", 120, 2),
        ("v2_test", vision, "test", 6, 2),
        ("t2_test", text, "test", 60, 2),
        ("vl", vision, "train", 2, None),
        ("tl", text, "train", 16, None),
    ]:
        paths[name] = tmp / f"{name}.h5"
        layers = ["--layer", layer] if layer else []
        vlpipe("extract", *args, "--split", split, "--limit", limit, *layers, "--out", paths[name])
    return paths


def train_args(c, tune: bool = True) -> list:
    """A run on the layer-2 caches, validated on the test ones: --tune-top 1, or frozen."""
    args = ["train", *TRAIN_DATA, "--features", c["v2"], "--text-features", c["t2"]]
    args += ["--val-split", "test", "--val-limit", 60]
    args += ["--val-features", c["v2_test"], "--val-text-features", c["t2_test"], *OPTIM]
    if tune:
        args += ["--tune-top", 1, "--vision-weights", c["vit"], "--text-weights", c["bert"]]
        args += ["--encoder-lr", ENCODER_LR]
    return args


TEST_DATA = ["--split", "test", "--limit", 60]


def eval_data(c) -> list:
    return [*TEST_DATA, "--features", c["v2_test"], "--text-features", c["t2_test"]]


@pytest.fixture(scope="module")
def run(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    vlpipe(*train_args(caches), "--out", out)
    return out


def latest(run):
    return run / (run / "LATEST").read_text().strip()


def weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(latest(run) / "model.safetensors"))


def logged_losses(run) -> list[str]:
    with open(run / "train_log.csv") as f:
        return [row["loss"] for row in csv.DictReader(f)]


def test_the_frozen_block_is_the_encoders_the_trained_ones_moved(caches, run):
    import timm
    from safetensors.torch import load_file
    from transformers import BertModel

    meta = json.loads((latest(run) / "run.json").read_text())
    assert meta["tune"] == {"k": 1, "vision": [2, 4], "text": [2, 4], "grid": [2, 2]}
    from vlpipe.pipelines.report import _trained_encoders

    assert _trained_encoders(meta) == {"image": "top 1 of 4 blocks trained",
                                       "text": "top 1 of 4 blocks trained"}  # fmt: skip
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, **VIT_CONFIG)
    vit.load_state_dict(load_file(str(caches["vit"])))
    bert = BertModel.from_pretrained(str(caches["bert"]))
    state = weights(run)
    for side, blocks in (("vision", vit.blocks), ("text", bert.encoder.layer)):
        for key, value in blocks[2].state_dict().items():  # block 3: below the trained one
            assert torch.equal(state[f"tops.{side}.blocks.0.{key}"], value), (side, key)
        trained = blocks[3].state_dict()  # block 4: every matrix and norm scale moved
        moved = {
            k for k, v in trained.items() if not torch.equal(state[f"tops.{side}.blocks.1.{k}"], v)
        }
        assert {k for k in trained if k.endswith("weight")} <= moved, side
    for key, value in vit.norm.state_dict().items():
        assert not torch.equal(state[f"tops.vision.norm.{key}"], value), key


def test_encoder_blocks_train_at_the_encoder_lr(run):
    import dataclasses

    from vlpipe.fusion.train import TrainConfig, make_optimizer
    from vlpipe.pipelines.data import model_from_meta

    model = model_from_meta(json.loads((latest(run) / "run.json").read_text()))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "tops.vision.blocks.1.attn.qkv.weight" in trainable
    assert "tops.text.blocks.1.output.dense.weight" in trainable
    assert "tops.vision.blocks.0.attn.qkv.weight" not in trainable
    names = {id(p): n for n, p in model.named_parameters()}
    base = TrainConfig(lr=LR, encoder_lr=ENCODER_LR, weight_decay=0.01)
    for cfg, encoder_lr in [
        (base, ENCODER_LR),
        (dataclasses.replace(base, optimizer="bertadam"), ENCODER_LR),
        (dataclasses.replace(base, encoder_lr=None), LR),  # default: --lr
    ]:
        grouped = []
        for group in make_optimizer(model, cfg).param_groups:
            for p in group["params"]:
                name = names[id(p)]
                assert group["lr"] == (encoder_lr if name.startswith("tops.") else LR), name
                grouped.append(name)
        assert sorted(grouped) == sorted(trainable), cfg.optimizer  # each once, no frozen one
    saved = torch.load(latest(run) / "trainer.pt", weights_only=False)["optimizer"]
    assert {g["initial_lr"] for g in saved["param_groups"]} == {LR, ENCODER_LR}  # the CLI's


def test_evaluate_and_predict_rebuild_the_tops(caches, run, tmp_path):
    from vlpipe.pipelines.eval_job import load_run

    model, _, _ = load_run(run, "latest")
    assert model.tops.vision is not None and model.tops.text is not None
    key = "tops.text.blocks.1.output.dense.weight"
    assert torch.equal(model.state_dict()[key], weights(run)[key])
    log = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    best = max(log, key=lambda r: r["accuracy"])
    assert best is not log[-1]  # the two checkpoints score differently
    for which, want in (("latest", log[-1]), ("best", best)):
        args = ["evaluate", "--run", run, "--checkpoint", which, *eval_data(caches), "--json"]
        got = json.loads(vlpipe(*args).output.splitlines()[0])
        assert (got["accuracy"], got["n"]) == (want["accuracy"], 60), which
        assert f"ckpt-{want['step']:07d}" in got["checkpoint"]["path"]
    other = ["--split", "train", "--limit", 16, "--features", caches["vl"]]
    refused = vlpipe("evaluate", "--run", run, *other, "--text-features", caches["tl"], code=1)
    assert "--features" in refused.output and "holds the last layer's output" in refused.output
    out = tmp_path / "pred.json"
    vlpipe("predict", "--run", run, *eval_data(caches), "--out", out)
    preds = json.loads(out.read_text())
    answers = json.loads((latest(run) / "run.json").read_text())["answers"]
    assert len(preds) == 60 and all(p["prediction"] in answers for p in preds)


def test_resume_with_dropout_is_exact(caches, run, tmp_path):
    from vlpipe.pipelines.data import model_from_meta

    model = model_from_meta(json.loads((latest(run) / "run.json").read_text()))
    assert model.tops.text.blocks[1].output.dropout.p == 0.1  # the trained BERT layer drops
    part = tmp_path / "part"
    vlpipe(*train_args(caches), "--max-steps", 5, "--out", part)
    assert latest(part).name == "ckpt-0000005"
    vlpipe(*train_args(caches), "--resume", "--out", part)
    a, b = weights(run), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(part) == logged_losses(run) and len(logged_losses(run)) == 16
    assert (part / "eval_log.jsonl").read_text() == (run / "eval_log.jsonl").read_text()


TUNE = ["--tune-top", 1]
WEIGHTS = ["--vision-weights", "{vit}", "--text-weights", "{bert}"]
MIDDLE = ["--features", "{v2}", "--text-features", "{t2}"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--features", "{vl}", "--text-features", "{tl}", *TUNE, *WEIGHTS],
         "--vision-weights: {vl} holds no middle layer"),
        (["--features", "{vl}", "--text-features", "{tl}", *TUNE],
         "--tune-top 1: no cache holds a middle layer"),
        ([*MIDDLE, "--vision-weights", "{vit}"], "--vision-weights: only with --tune-top K"),
        ([*MIDDLE, "--text-weights", "{bert}"], "--text-weights: only with --tune-top K"),
        (["--features", "{v2}", "--text-features", "{tl}", *TUNE],
         "--tune-top: {v2} holds the tokens after block 2 of 4: pass --vision-weights"),
        ([*MIDDLE, *TUNE, "--vision-weights", "{vit}"], "pass --text-weights"),
        ([*MIDDLE, *TUNE, "--vision-weights", "{other}", "--text-weights", "{bert}"],
         "--vision-weights {other}: sha256 "),
        ([*MIDDLE, *TUNE, "--vision-weights", "random", "--text-weights", "{bert}"],
         "--vision-weights random: {v2} was made from vit.safetensors"),
        ([*MIDDLE, *TUNE, "--vision-weights", "{vit}.missing", "--text-weights", "{bert}"],
         "--vision-weights {vit}.missing: weights file or folder does not exist"),
        ([*MIDDLE, "--tune-top", 5, *WEIGHTS], "--tune-top 5: {v2} holds the tokens after "
         "block 2 of 4, so 1..2 blocks"),
        (["--features", "{v2}", "--fusion", "lstm", *TUNE, *WEIGHTS],
         "--text-weights: --fusion lstm reads no text cache"),
        ([*MIDDLE, *TUNE, *WEIGHTS, "--val-split", "train", "--val-limit", 16,
          "--val-features", "{vl}"],
         "--val-features {vl}: holds the last layer's output, but the run's vision top "
         "continues from block 2 of 4"),
    ],
    ids=["last-layer", "last-layer-no-weights", "vision-weights-alone", "text-weights-alone",
         "no-vision-weights", "no-text-weights", "sha-mismatch", "random-for-a-file",
         "missing-file", "k-above-blocks", "lstm-text-weights", "val-last-layer"],
)  # fmt: skip
def test_wrong_tune_top_options_are_clean_errors(caches, tmp_path, args, message):
    assert_train_refused(caches, tmp_path, args, message)


def assert_train_refused(caches, tmp_path, args, message) -> None:
    """`train` with `args` ("{name}" filled from `caches`) exits 1 saying `message`, no
    traceback, no run written."""
    args = [a.format(**caches) if isinstance(a, str) else a for a in args]
    out = vlpipe("train", *TRAIN_DATA, *args, *OPTIM, "--out", tmp_path / "run", code=1).output
    assert message.format(**caches) in " ".join(out.split()), out
    assert "Traceback" not in out and not (tmp_path / "run" / "LATEST").exists()


def test_a_frozen_run_on_middle_layer_caches_is_a_layer_probe(caches, tmp_path):
    """Without --tune-top the fusion reads the layer-2 tokens as they are (no final norm)."""
    out = tmp_path / "probe"
    vlpipe(*train_args(caches, tune=False), "--out", out)
    meta = json.loads((latest(out) / "run.json").read_text())
    assert meta["tune"] is None and meta["caches"]["image"]["preprocessing"]["encoder_block"]
    assert meta["fusion_config"]["image_dim"] == VIT_CONFIG["embed_dim"]
    assert not [k for k in weights(out) if k.startswith("tops.")]
    losses = logged_losses(out)
    assert len(losses) == 16 and losses[-1] != losses[0]
    got = vlpipe("evaluate", "--run", out, *eval_data(caches), "--json").output
    assert json.loads(got.splitlines()[0])["n"] == 60
