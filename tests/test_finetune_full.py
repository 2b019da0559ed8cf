"""`vlpipe train --finetune full`: the encoders that made the caches (a tiny ViT, a random
ResNet, a tiny BERT) rebuilt from the same weights and trained end to end on the decoded images
and tokenized texts of the caches' listings; evaluate, predict and --resume rebuild the run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import vlpipe, write_image
from tests.test_encoder_top import bert_folder
from tests.test_tune_top import (
    EASY,
    OPTIM,
    TRAIN_DATA,
    VIT,
    assert_train_refused,
    latest,
    logged_losses,
    vit_file,
)

CNN = ["--backbone", "cnn", "--arch", "resnet18", "--image-size", 32, "--weights", "random"]
CNN += ["--cls-only", "--num-workers", 0]
FULL = ["--finetune", "full"]


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    """Weights (vit, bert, other: another ViT) and last-layer caches: ViT patches of train
    (v) and test (v_test) images, BERT of train (t) and test (t_test) questions, a pooled
    random ResNet (cnn), and a layer-2 ViT one (v2)."""
    tmp = tmp_path_factory.mktemp("full")
    paths = {"vit": vit_file(tmp / "vit.safetensors"), "bert": bert_folder(tmp / "bert")}
    paths["other"] = vit_file(tmp / "other.safetensors", seed=1)
    vision = [*EASY, *VIT, "--weights", paths["vit"]]
    text = [*EASY, "--backbone", "bert", "--weights", paths["bert"]]
    for name, args, split, limit in [
        ("v", vision, "train", 12),
        ("t", text, "train", 120),
        ("v_test", vision, "test", 6),
        ("t_test", text, "test", 60),
        ("cnn", [*EASY, *CNN], "train", 12),
        ("v2", [*vision, "--layer", 2], "train", 12),
    ]:
        paths[name] = tmp / f"{name}.h5"
        vlpipe("extract", *args, "--split", split, "--limit", limit, "--out", paths[name])
    return paths


def train_args(c) -> list:
    args = ["train", *TRAIN_DATA, "--features", c["v"], "--text-features", c["t"], *FULL]
    args += ["--vision-weights", c["vit"], "--text-weights", c["bert"], "--encoder-lr", 1e-4]
    args += ["--val-split", "test", "--val-limit", 60]
    return args + ["--val-features", c["v_test"], "--val-text-features", c["t_test"], *OPTIM]


@pytest.fixture(scope="module")
def run(caches, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "run"
    vlpipe(*train_args(caches), "--out", out)
    return out


def weights(run) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(latest(run) / "model.safetensors"))


@pytest.mark.parametrize("image", ["v", "cnn"])
def test_the_rebuilt_encoders_give_the_cached_features(caches, image):
    """In eval mode, on the images decoded from the listing and the questions tokenized as at
    extraction, the live encoders reproduce the caches."""
    from vlpipe.data_manifests.registry import read_texts
    from vlpipe.fusion.answers import AnswerVocab
    from vlpipe.fusion.data import CacheSet, TaskDataset
    from vlpipe.fusion.image_files import ImageFiles
    from vlpipe.fusion.model import needs_with_tops
    from vlpipe.fusion.tasks import get_task
    from vlpipe.pipelines.finetune import build_finetune

    images, texts = CacheSet([caches[image]]), CacheSet([caches["t"]])
    weights = {"vision": "random" if image == "cnn" else str(caches["vit"])}
    live = build_finetune({**weights, "text": str(caches["bert"])}, images, texts, True)
    encoders = live.encoders.eval()
    fields = ("image_cls", "text_feats", "text_cls", "text_mask")
    fields += ("region_feats", "region_boxes") if image == "v" else ()
    task = get_task("easy-vqa")
    vocab = AnswerVocab(list(task.fixed_answers))
    records = read_texts("easy-vqa", [], "train", 40)
    files = ImageFiles(images, encoders.transform)
    needs = needs_with_tops(fields, encoders)
    assert set(needs) == {"pixels", "text_ids", "text_mask"}
    ours = TaskDataset(task, records, files, None, vocab, needs, live.tokenizer, live.max_length)
    cached = TaskDataset(task, records, images, texts, vocab, fields)
    with torch.no_grad():
        got = encoders(ours[list(range(40))])
    want = cached[list(range(40))]
    for name in fields:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_every_encoder_weight_trains_at_the_encoder_lr(caches, run):
    import timm
    from safetensors.torch import load_file

    meta = json.loads((latest(run) / "run.json").read_text())
    assert meta["finetune"] == {"mode": "full", "vision": True, "text": True, "grid": [2, 2]}
    assert meta["tune"] is None and meta["tokenizer"]["vocab"] == "vocab.txt"
    from vlpipe.pipelines.report import _inputs, _trained_encoders

    inputs = _inputs(meta["caches"], _trained_encoders(meta))  # the report's input columns
    assert all(v.endswith(", fine-tuned end to end") for v in inputs.values()), inputs
    state = weights(run)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4,
                            embed_dim=32, num_heads=2)  # fmt: skip
    vit.load_state_dict(load_file(str(caches["vit"])))
    for key in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "norm.weight"):
        assert not torch.equal(state[f"tops.vision.model.{key}"], vit.state_dict()[key]), key
    assert "tops.text.embeddings.word_embeddings.weight" in state
    saved = torch.load(latest(run) / "trainer.pt", weights_only=False)["optimizer"]
    assert {g["initial_lr"] for g in saved["param_groups"]} == {1e-3, 1e-4}


def test_evaluate_and_predict_rebuild_the_encoders(caches, run, tmp_path):
    log = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    data = ["--split", "test", "--limit", 60, "--features", caches["v_test"]]
    got = json.loads(vlpipe("evaluate", "--run", run, "--checkpoint", "latest", *data,
                            "--json").output.splitlines()[0])  # fmt: skip
    assert (got["accuracy"], got["n"]) == (log[-1]["accuracy"], 60)
    assert not got.get("warnings")  # no text cache needed: BERT reads the questions itself
    out = tmp_path / "pred.json"
    vlpipe("predict", "--run", run, *data, "--out", out)
    assert len(json.loads(out.read_text())) == 60


def test_resume_with_dropout_is_exact(caches, run, tmp_path):
    from vlpipe.pipelines.data import model_from_meta

    model = model_from_meta(json.loads((latest(run) / "run.json").read_text()))
    assert model.tops.text.encoder.layer[0].output.dropout.p == 0.1
    part = tmp_path / "part"
    vlpipe(*train_args(caches), "--max-steps", 5, "--out", part)
    vlpipe(*train_args(caches), "--resume", "--out", part)
    a, b = weights(run), weights(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert logged_losses(part) == logged_losses(run) and len(logged_losses(run)) == 16


def test_gradient_checkpointing_takes_the_same_steps(caches, run, tmp_path):
    out = tmp_path / "ckpt"
    vlpipe(*train_args(caches), "--grad-checkpointing", "--max-steps", 4, "--out", out)
    a, b = [float(x) for x in logged_losses(out)], [float(x) for x in logged_losses(run)[:4]]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def gqa(tmp_path_factory):
    """A GQA image folder (a text file named .jpg among the images) and its questions,
    extracted by the tiny ViT and BERT."""
    tmp = tmp_path_factory.mktemp("gqa")
    weights, bert = vit_file(tmp / "vit.safetensors"), bert_folder(tmp / "bert")
    for i in range(4):
        write_image(tmp / "images" / f"img{i}.jpg", size=(40, 30), seed=i)
    (tmp / "images" / "bad.jpg").write_text("not an image")
    questions = {
        f"q{i}": {"imageId": image, "question": "what colour?", "answer": "red"}
        for i, image in enumerate(["img0", "img1", "img2", "img3", "bad", "img0"])
    }
    (tmp / "q.json").write_text(json.dumps(questions))
    common = ["--dataset", "gqa", "--no-progress"]
    images = ["--root", tmp, "--out", tmp / "v.h5"]
    vlpipe("extract", *common, *VIT, "--weights", weights, *images, code=3)  # 3: one failed
    vlpipe("extract", *common, "--backbone", "bert", "--weights", bert,
           "--annotations", tmp / "q.json", "--out", tmp / "t.h5")  # fmt: skip
    args = ["--task", "gqa", "--annotations", tmp / "q.json", "--features", tmp / "v.h5"]
    args += ["--text-features", tmp / "t.h5", *FULL, "--vision-weights", weights, *OPTIM]
    return tmp, args


def test_images_that_failed_at_extraction_are_missing(gqa):
    tmp, args = gqa
    out = vlpipe("train", *args, "--out", tmp / "r1", code=1).output
    assert "1 image keys of the annotations are not in the images listed for" in out
    assert "['bad']" in out and "Traceback" not in out
    vlpipe("train", *args, "--skip-missing", "--max-steps", 1, "--out", tmp / "r2")


def test_an_image_broken_after_extraction_is_a_clean_error(gqa, tmp_path):
    import shutil

    tmp, args = gqa
    shutil.copy(tmp / "images" / "img2.jpg", tmp_path / "img2.jpg")
    (tmp / "images" / "img2.jpg").write_bytes(b"\xff\xd8\xff")  # truncated JPEG
    try:
        out = vlpipe("train", *args, "--skip-missing", "--out", tmp_path / "r", code=1).output
    finally:
        shutil.copy(tmp_path / "img2.jpg", tmp / "images" / "img2.jpg")
    assert f"{tmp / 'images' / 'img2.jpg'}: " in " ".join(out.split()) and "(image img2)" in out
    assert "Traceback" not in out


WEIGHTS = ["--vision-weights", "{vit}", "--text-weights", "{bert}"]
LAST = ["--features", "{v}", "--text-features", "{t}"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*LAST, *FULL], "--finetune full: pass --vision-weights and / or --text-weights"),
        ([*LAST, *FULL, "--vision-weights", "{other}"], "--vision-weights {other}: sha256 "),
        ([*LAST, *FULL, "--vision-weights", "random"],
         "--vision-weights random: {v} was made from vit.safetensors"),
        (["--features", "{v2}", "--text-features", "{t}", *FULL, *WEIGHTS],
         "--finetune full: {v2} holds the tokens after block 2 of 4; give a last-layer cache"),
        ([*LAST, *FULL, *WEIGHTS, "--tune-top", 1], "--tune-top and --finetune full"),
        ([*LAST, "--grad-checkpointing"], "--grad-checkpointing: only with --finetune full"),
        (["--features", "{v}", "--fusion", "lstm", *FULL, *WEIGHTS],
         "--text-weights: this fusion tokenizes the text itself"),
        ([*LAST, "--finetune", "half"], "half"),
    ],
    ids=["no-weights", "sha-mismatch", "random-for-a-file", "middle-layer", "with-tune-top",
         "checkpointing-alone", "lstm-text-weights", "unknown-mode"],
)  # fmt: skip
def test_wrong_finetune_options_are_clean_errors(caches, tmp_path, args, message):
    assert_train_refused(caches, tmp_path, args, message)


def test_questions_about_images_the_cache_does_not_hold_are_missing(caches, tmp_path):
    """The 12-image cache is the recipe: image 12 is in its listing but not in the cache."""
    args = ["--features", caches["v"], "--text-features", caches["t"], *FULL]
    args += ["--vision-weights", caches["vit"]]
    more = ["--task", "easy-vqa", "--split", "train", "--limit", 140, *OPTIM]
    out = vlpipe("train", *more, *args, "--out", tmp_path / "r", code=1).output
    assert "image keys of the annotations are not in the images listed for" in out


def test_a_frozen_run_does_not_resume_as_a_full_one(caches, tmp_path):
    frozen = ["train", *TRAIN_DATA, "--features", caches["v"], "--text-features", caches["t"]]
    vlpipe(*frozen, *OPTIM, "--max-steps", 2, "--out", tmp_path / "r")
    full = [*FULL, "--vision-weights", caches["vit"], "--resume"]
    out = vlpipe(*frozen, *OPTIM, *full, "--out", tmp_path / "r", code=1).output
    assert "cannot resume" in out and "finetune: None -> {'mode': 'full'" in " ".join(out.split())


def test_a_cnn_of_converted_weights_evaluates_after_full_finetuning(caches, tmp_path):
    """EfficientNet-Lite0 in lukemelas' layout (random tensors): the run's architecture is
    rebuilt without the file, so without its conversion."""
    from safetensors.torch import save_file

    from tests.test_cnn import KEYS_FILE

    gen = torch.Generator().manual_seed(0)
    state = {
        key: torch.zeros(shape, dtype=torch.int64) if dtype == "int64"
        else torch.randn(shape, generator=gen) * 0.05
        for key, shape, dtype in json.loads(KEYS_FILE.read_text())["keys"]
    }  # fmt: skip
    weights = tmp_path / "lite0.safetensors"
    save_file(state, str(weights))
    cnn = ["--backbone", "cnn", "--weights", weights, "--weights-layout", "lukemelas"]
    cnn += ["--image-size", 32, "--cls-only", "--num-workers", 0]
    vlpipe("extract", *EASY, *cnn, "--split", "train", "--limit", 4, "--out", tmp_path / "c.h5")
    data = ["--task", "easy-vqa", "--split", "train", "--limit", 32]
    data += ["--features", tmp_path / "c.h5", "--text-features", caches["t"]]
    run = tmp_path / "run"
    vlpipe("train", *data, *FULL, "--vision-weights", weights, *OPTIM, "--max-steps", 2,
           "--out", run)  # fmt: skip
    got = vlpipe("evaluate", "--run", run, *data[:6], "--features", tmp_path / "c.h5",
                 "--text-features", caches["t"], "--json").output  # fmt: skip
    assert json.loads(got.splitlines()[0])["n"] == 32


@pytest.mark.gpu
def test_full_finetuning_on_cuda_with_bf16_autocast(caches, tmp_path):
    """The same run on the GPU under bf16 autocast (the default --amp): it trains, and its
    checkpoint evaluates on the CPU as on the GPU (the weights are fp32)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out = tmp_path / "gpu"
    vlpipe(*train_args(caches), "--device", "cuda", "--out", out)
    losses = [float(x) for x in logged_losses(out)]
    assert len(losses) == 16 and all(np.isfinite(losses))
    data = ["--split", "test", "--limit", 60, "--features", caches["v_test"], "--json"]
    cpu, gpu = (json.loads(vlpipe("evaluate", "--run", out, *data, "--device", device)
                           .output.splitlines()[0]) for device in ("cpu", "cuda"))  # fmt: skip
    assert abs(cpu["accuracy"] - gpu["accuracy"]) <= 100 / 60 * 2  # bf16 may flip a near tie
