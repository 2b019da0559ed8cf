"""Stage two: task models on tiny caches, gradients, checkpoints, exact resume, mismatches."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from tests.fusion_fixtures import DIM, color_records, image_cache, text_cache
from vlpipe.fusion.answers import AnswerVocab
from vlpipe.fusion.data import CacheSet, DataMismatch, TaskDataset, grid_boxes
from vlpipe.fusion.model import TaskModel, make_fusion_config
from vlpipe.fusion.tasks import Task, get_task
from vlpipe.fusion.train import TrainConfig, evaluate, train
from vlpipe.pipelines.eval_job import load_run

CE = Task("color", "ce")
VOCAB = AnswerVocab(["red", "green", "blue"])


@pytest.fixture
def caches(tmp_path):
    image_cache(tmp_path / "img.h5", 12)
    recs = color_records(12)
    text_cache(tmp_path / "txt.h5", recs)
    return CacheSet([tmp_path / "img.h5"]), CacheSet([tmp_path / "txt.h5"]), recs


def dataset(caches, needs, task=CE, vocab=VOCAB, tokenizer=None):
    images, texts, recs = caches
    return TaskDataset(task, recs, images, texts, vocab, needs, tokenizer)


def tiny_model(fusion: str, n_out: int = 3, pair: int = 1) -> TaskModel:
    values = {
        "concat": {"image_dim": DIM, "text_dim": DIM},
        "lstm": {"image_dim": DIM, "vocab_size": 2100, "embed_dim": 8, "hidden": 8},
    }[fusion]
    return TaskModel(fusion, make_fusion_config(fusion, values), n_out, pair)


@pytest.mark.parametrize("fusion", ["concat", "lstm"])
def test_forward_backward_every_parameter_gets_a_gradient(caches, fusion):
    model = tiny_model(fusion)
    batch = dataset(caches, model.needs)[list(range(8))]
    loss = CE.loss_fn(model(batch), batch["target"])
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_vqa_soft_scores_and_bce(caches):
    from vlpipe.data_manifests.base import TextRecord

    images, texts, _ = caches
    rec = TextRecord(
        "q0_0", "what color is the shape?", ("img0",), answers=("red",) * 2 + ("blue",) * 8
    )
    ds = TaskDataset(get_task("vqa"), [rec], images, texts, VOCAB, ("image_cls", "text_cls"))
    target = ds[[0]]["target"][0]
    assert target.tolist() == pytest.approx([0.6, 0.0, 1.0])
    model = tiny_model("concat")
    loss = get_task("vqa").loss_fn(model(ds[[0]]), ds[[0]]["target"])
    assert loss.item() > 0


def test_nlvr2_pairs_two_images_per_statement(tmp_path):
    from vlpipe.data_manifests.base import TextRecord

    image_cache(tmp_path / "img.h5", 4)
    recs = [
        TextRecord(
            f"dev-{i}-0-0",
            "what color is the shape?",
            (f"img{i}", f"img{i + 1}"),
            answers=("True" if i % 2 else "False",),
        )
        for i in range(3)
    ]
    text_cache(tmp_path / "txt.h5", recs)
    task = get_task("nlvr2")
    ds = TaskDataset(
        task,
        recs,
        CacheSet([tmp_path / "img.h5"]),
        CacheSet([tmp_path / "txt.h5"]),
        AnswerVocab(task.fixed_answers),
        ("image_cls", "text_cls"),
    )
    batch = ds[[0, 1, 2]]
    assert batch["image_cls"].shape == (3, 2, DIM) and batch["target"].tolist() == [0, 1, 0]
    model = tiny_model("concat", n_out=2, pair=2)
    logits = model(batch)
    assert logits.shape == (3, 2)
    # swapping the two images changes the input of the pair head
    swapped = dict(batch, image_cls=batch["image_cls"].flip(1))
    assert not torch.allclose(model(swapped), logits)


def test_patch_cache_gets_cls_region_and_grid_boxes(caches):
    ds = dataset(caches, ("region_feats", "region_boxes", "region_mask"))
    batch = ds[[0, 1]]
    assert batch["region_feats"].shape == (2, 5, DIM)  # CLS + 2x2 patches
    assert batch["region_boxes"][0, 0].tolist() == [0, 0, 1, 1]
    assert batch["region_boxes"][0, 4].tolist() == [0.5, 0.5, 1.0, 1.0]
    assert grid_boxes((2, 3), False).shape == (6, 4)


def test_region_boxes_are_normalised_by_image_size(tmp_path):
    image_cache(tmp_path / "r.h5", 3, kind="regions")
    recs = color_records(3)
    ds = TaskDataset(
        CE,
        recs,
        CacheSet([tmp_path / "r.h5"]),
        None,
        VOCAB,
        ("region_feats", "region_boxes", "region_mask", "image_cls"),
    )
    boxes = ds[[0]]["region_boxes"][0, 0]
    assert boxes.tolist() == pytest.approx([0, 0, 0.5, 0.5])  # (20, 15) of a 40x30 image


def test_missing_keys_fail_before_training_and_name_them(caches):
    images, texts, recs = caches
    from vlpipe.data_manifests.base import TextRecord

    bad = recs + [TextRecord("qx", "what color is the shape?", ("img99",), ("red",))]
    with pytest.raises(DataMismatch, match=r"1 image keys .*img99"):
        TaskDataset(CE, bad, images, texts, VOCAB, ("image_cls", "text_cls"))


def test_cache_kind_that_cannot_feed_the_model_is_named(tmp_path):
    image_cache(tmp_path / "img.h5", 3)
    recs = color_records(3)
    with pytest.raises(DataMismatch, match=r"needs \['text_cls'\].*text cache: none"):
        TaskDataset(
            CE, recs, CacheSet([tmp_path / "img.h5"]), None, VOCAB, ("image_cls", "text_cls")
        )


def _losses(run_dir):
    with open(run_dir / "train_log.csv") as fh:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]


def _eval_steps(run_dir):
    lines = (run_dir / "eval_log.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_interrupted_run_resumed_equals_uninterrupted(caches, tmp_path):
    cfg = TrainConfig(epochs=3, batch_size=5, lr=1e-2, seed=3, warmup_ratio=0.2)
    ds = dataset(caches, ("image_cls", "text_cls"))
    meta = {"task": "color"}
    torch.manual_seed(0)
    train(tiny_model("concat"), CE, ds, cfg, tmp_path / "a", meta, progress=False)
    torch.manual_seed(0)
    cut = TrainConfig(**{**cfg.__dict__, "max_steps": 7})  # stops mid-epoch 2 (5 steps/epoch)
    train(tiny_model("concat"), CE, ds, cut, tmp_path / "b", meta, progress=False)
    assert len(_losses(tmp_path / "b")) == 7
    torch.manual_seed(123)  # a different process state: resume must not depend on it
    train(tiny_model("concat"), CE, ds, cfg, tmp_path / "b", meta, resume=True, progress=False)
    resumed, straight = _losses(tmp_path / "b"), _losses(tmp_path / "a")
    assert [s for s, _ in resumed] == [s for s, _ in straight] == list(range(1, 16))
    assert [v for _, v in resumed] == pytest.approx([v for _, v in straight], abs=1e-7)
    assert (tmp_path / "a" / "curves.png").stat().st_size > 1000


def tiny_cross() -> TaskModel:
    """A model with dropout (0.1 in attention and FFN): resume must restore its RNG stream."""
    values = {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32}
    values.update(text_dim=DIM, visual_feat_dim=DIM)
    return TaskModel("cross", make_fusion_config("cross", values), 3)


def test_stop_resume_stop_resume_with_dropout_equals_uninterrupted(caches, tmp_path):
    # 24 questions, batch 5: 5 steps per epoch, the last one of 4 items; 3 epochs = 15 steps.
    cfg = TrainConfig(epochs=3, batch_size=5, lr=1e-2, seed=3, warmup_ratio=0.2, ckpt_every=3)
    ds = dataset(caches, tiny_cross().needs)
    val = dataset(caches, tiny_cross().needs)  # validation loaders must not shift the RNG
    meta = {"task": "color"}

    def run(out, max_steps=0, resume=False):
        cut = TrainConfig(**{**cfg.__dict__, "max_steps": max_steps})
        model = tiny_cross()
        train(model, CE, ds, cut, tmp_path / out, meta, val=val, resume=resume, progress=False)
        return model

    torch.manual_seed(0)
    straight = run("a")
    torch.manual_seed(0)
    run("b", max_steps=2)  # stops mid-epoch 1, before any periodic checkpoint
    torch.manual_seed(11)  # another process state each time: resume must not depend on it
    run("b", max_steps=7, resume=True)  # again mid-epoch (epoch 2), after a validation
    torch.manual_seed(22)
    resumed = run("b", resume=True)
    assert [s for s, _ in _losses(tmp_path / "b")] == list(range(1, 16))
    assert [v for _, v in _losses(tmp_path / "b")] == [v for _, v in _losses(tmp_path / "a")]
    final = resumed.state_dict()
    for name, value in straight.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_dropout_model_without_own_loader_generator_would_diverge(caches, tmp_path):
    """The check above can fail: drawing from the global RNG when a loader starts (what a
    DataLoader without its own generator does) changes a dropout model's losses."""
    ds = dataset(caches, tiny_cross().needs)
    cfg = TrainConfig(epochs=1, batch_size=5, lr=1e-2, seed=3)
    torch.manual_seed(0)
    train(tiny_cross(), CE, ds, cfg, tmp_path / "a", {"task": "color"}, progress=False)
    torch.manual_seed(0)
    original = TaskDataset.loader

    def drawing_loader(self, *args, **kwargs):
        torch.empty((), dtype=torch.int64).random_()  # the global draw of generator=None
        return original(self, *args, **kwargs)

    TaskDataset.loader = drawing_loader
    try:
        train(tiny_cross(), CE, ds, cfg, tmp_path / "b", {"task": "color"}, progress=False)
    finally:
        TaskDataset.loader = original
    assert [v for _, v in _losses(tmp_path / "a")] != [v for _, v in _losses(tmp_path / "b")]


def test_resume_at_the_end_of_an_epoch_share_takes_no_unshuffled_epoch(caches, tmp_path):
    """A position at the end of the epoch's share continues with the next epoch, never with a
    full unshuffled pass (an empty sampler used to fall back to range(len))."""
    from vlpipe.fusion.train import EpochOrder

    ds = dataset(caches, ("image_cls", "text_cls"))
    assert list(ds.loader(5, EpochOrder(len(ds), 0, 0, offset=len(ds)))) == []


def test_checkpoint_round_trip_and_learning(caches, tmp_path):
    ds = dataset(caches, ("image_cls", "text_cls"))
    model = tiny_model("concat")
    meta = {
        "task": "easy-vqa",
        "fusion": "concat",
        "answers": VOCAB.answers,
        "fusion_config": {"image_dim": DIM, "text_dim": DIM, "normalize": True},
        "tokenizer": {"vocab": None, "max_length": 20},
        "caches": {},
    }
    cfg = TrainConfig(epochs=15, batch_size=8, lr=3e-3, seed=0)
    train(model, CE, ds, cfg, tmp_path / "run", meta, progress=False)
    results, preds = evaluate(model, CE, ds, 8, torch.device("cpu"))
    assert results["accuracy"] == 100.0  # colours are linearly readable from the features
    loaded, loaded_meta, _ = load_run(tmp_path / "run")
    batch = ds[list(range(6))]
    model.eval()
    loaded.eval()
    torch.testing.assert_close(loaded(batch), model(batch))
    assert loaded_meta["answers"] == VOCAB.answers and loaded_meta["step"] == 15 * 3


def test_curves_show_the_validation_metric_when_there_is_one(tmp_path):
    from PIL import Image

    from vlpipe.fusion.plot import PANEL_H
    from vlpipe.fusion.train import plot_curves

    rows = [f"{s},0,{1 / s},0.001,50.0" for s in range(1, 21)]
    (tmp_path / "train_log.csv").write_text("step,epoch,loss,lr,samples_per_s\n" + "\n".join(rows))
    plot_curves(tmp_path / "train_log.csv", tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").height == 2 * PANEL_H  # loss, learning rate
    evals = [{"overall": 40.0 + s, "n": 9, "step": s} for s in (10, 20)]
    (tmp_path / "eval_log.jsonl").write_text("\n".join(json.dumps(e) for e in evals) + "\n")
    plot_curves(tmp_path / "train_log.csv", tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").height == 3 * PANEL_H


@pytest.mark.parametrize(("batch", "answers"), [(4, VOCAB.answers), (5, ["red", "green"])])
def test_grad_accum_equals_one_batch_of_its_examples(caches, tmp_path, batch, answers):
    """Two micro-batches of b per step take the steps of batch 2b (no dropout: concat). With
    "blue" outside the vocabulary a third of the targets are IGNORE, unevenly per micro-batch:
    weighing each micro-batch by its labelled examples keeps the equality (and 24 = 5+5, 5+5,
    4 gives the steps of batch 10: 10, 10, 4)."""
    vocab = AnswerVocab(answers)
    ds = dataset(caches, ("image_cls", "text_cls"), vocab=vocab)
    base = {"epochs": 2, "lr": 1e-2, "seed": 3, "warmup_ratio": 0.2}
    models = {}
    for name, cfg in (
        ("one", TrainConfig(batch_size=2 * batch, **base)),
        ("accum", TrainConfig(batch_size=batch, grad_accum=2, **base)),
    ):
        torch.manual_seed(0)
        models[name] = tiny_model("concat", n_out=len(answers))
        train(models[name], CE, ds, cfg, tmp_path / name, {"task": "color"}, progress=False)
    one, accum = _losses(tmp_path / "one"), _losses(tmp_path / "accum")
    assert [s for s, _ in accum] == [s for s, _ in one] == list(range(1, 7))
    assert [v for _, v in accum] == pytest.approx([v for _, v in one], abs=1e-6)
    for name, value in models["one"].state_dict().items():
        torch.testing.assert_close(models["accum"].state_dict()[name], value, atol=1e-6, rtol=0)


def test_grad_accum_stop_resume_with_dropout_equals_uninterrupted(caches, tmp_path):
    # 24 questions, micro-batches of 3, 2 a step: 4 steps an epoch, 8 in all; validation at
    # steps 3 and 6 (mid-epoch) and 8 (the last)
    cfg = TrainConfig(epochs=2, batch_size=3, grad_accum=2, lr=1e-2, seed=3, val_every=3)
    ds, val = dataset(caches, tiny_cross().needs), dataset(caches, tiny_cross().needs)

    def run(out, max_steps=0, resume=False):
        cut = TrainConfig(**{**cfg.__dict__, "max_steps": max_steps})
        model = tiny_cross()
        train(model, CE, ds, cut, tmp_path / out, {"task": "color"}, val=val, resume=resume,
              progress=False)  # fmt: skip
        return model

    torch.manual_seed(0)
    straight = run("a")
    torch.manual_seed(0)
    run("b", max_steps=2)  # mid-epoch, between validations
    torch.manual_seed(11)
    run("b", max_steps=5, resume=True)  # across the epoch's end, past a validation
    torch.manual_seed(22)
    resumed = run("b", resume=True)
    assert [s for s, _ in _losses(tmp_path / "b")] == list(range(1, 9))
    assert [v for _, v in _losses(tmp_path / "b")] == [v for _, v in _losses(tmp_path / "a")]
    assert _eval_steps(tmp_path / "b") == _eval_steps(tmp_path / "a") == [3, 6, 8]
    final = resumed.state_dict()
    for name, value in straight.state_dict().items():
        assert torch.equal(value, final[name]), name


def test_validating_every_step_leaves_the_dropout_trajectory_alone(caches, tmp_path):
    """Validation draws no random numbers and hands the model back in train mode: a dropout
    model validated after every step takes the steps of one never validated."""
    ds, val = dataset(caches, tiny_cross().needs), dataset(caches, tiny_cross().needs)
    cfg = TrainConfig(epochs=1, batch_size=5, lr=1e-2, seed=3)
    torch.manual_seed(0)
    plain = tiny_cross()
    train(plain, CE, ds, cfg, tmp_path / "a", {"task": "color"}, progress=False)
    torch.manual_seed(0)
    checked = tiny_cross()
    every = TrainConfig(**{**cfg.__dict__, "val_every": 1})
    train(checked, CE, ds, every, tmp_path / "b", {"task": "color"}, val=val, progress=False)
    assert _eval_steps(tmp_path / "b") == [1, 2, 3, 4, 5]
    assert [v for _, v in _losses(tmp_path / "b")] == [v for _, v in _losses(tmp_path / "a")]
    for name, value in plain.state_dict().items():
        assert torch.equal(value, checked.state_dict()[name]), name
