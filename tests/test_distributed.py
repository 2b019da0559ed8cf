"""Training under torchrun with 2 CPU processes (gloo) equals one process with the doubled
batch: same global batches, averaged gradients, rank 0 alone writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.fusion_fixtures import gqa_color_task, logged_losses
from vlpipe.fusion.checkpoint import latest_checkpoint

# Real processes killed, stopped or starved: `pytest -m integration` (.ci/run runs them).
pytestmark = pytest.mark.integration


def _train_args(data, out, batch):
    return [
        "train",
        *data,
        "--epochs",
        2,
        "--batch-size",
        batch,
        "--lr",
        1e-2,
        "--out",
        out,
        "--no-progress",
    ]


def _run(args, torchrun=False):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    head = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            "29533",
            "-m",
            "vlpipe",
        ]
        if torchrun
        else [sys.executable, "-m", "vlpipe"]
    )
    proc = subprocess.run(
        head + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _weights(run):
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def _assert_same_run(one_dir, two_dir, steps: int = 6) -> None:
    """The same losses at every step and the same final weights."""
    one, two = logged_losses(one_dir), logged_losses(two_dir)
    assert len(one) == len(two) == steps
    assert two == pytest.approx(one, abs=1e-5)
    w1, w2 = _weights(one_dir), _weights(two_dir)
    for name in w1:
        assert (w1[name] - w2[name]).abs().max() < 1e-4, name


def test_two_ranks_equal_one_process_with_double_batch(tmp_path):
    """24 GQA-format questions about 12 images whose colour the features encode."""
    data = gqa_color_task(tmp_path)
    _run(_train_args(data, tmp_path / "one", 8))
    _run(_train_args(data, tmp_path / "two", 4), torchrun=True)
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if p.name.startswith("ckpt-"))


def test_two_ranks_accumulating_equal_one_process_with_the_whole_batch(tmp_path):
    """--grad-accum under DDP: gradients synchronised on each step's last micro-batch only."""
    data = gqa_color_task(tmp_path)
    _run(_train_args(data, tmp_path / "one", 8))
    _run([*_train_args(data, tmp_path / "two", 2), "--grad-accum", 2], torchrun=True)
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def test_two_rank_extraction_equals_a_single_process_run(tmp_path):
    """torchrun -m vlpipe extract: disjoint items per rank, own shards, one index."""
    import numpy as np

    from tests.conftest import TINY_VIT_ARGS, write_image
    from vlpipe.cache import FeatureCache

    for i in range(7):
        write_image(tmp_path / "imgs" / f"img{i}.png", size=(40, 30), seed=i)
    args = [
        "extract",
        "--dataset",
        "folder",
        "--root",
        tmp_path / "imgs",
        *TINY_VIT_ARGS,
        "--batch-size",
        2,
    ]
    _run([*args, "--out", tmp_path / "one.h5"])
    _run([*args, "--out", tmp_path / "two.h5"], torchrun=True)
    one, two = FeatureCache(tmp_path / "one.h5"), FeatureCache(tmp_path / "two.h5")
    assert sorted(two.shard_files) == ["r0-00000.h5", "r1-00000.h5"]
    keys = one.keys()
    assert sorted(two.keys()) == sorted(keys) and two.num_rows == 7
    for field in ("image_cls", "image_feats", "image_hw"):
        np.testing.assert_allclose(two.read(keys)[field], one.read(keys)[field], atol=1e-3)


def test_two_rank_extraction_never_replaces_another_file(tmp_path):
    """torchrun --overwrite onto a user's HDF5 file: every rank refuses before any work."""
    import h5py

    from tests.conftest import TINY_VIT_ARGS, write_image

    write_image(tmp_path / "imgs" / "img0.png")
    target = tmp_path / "results.h5"
    with h5py.File(target, "w") as h5:
        h5["mine"] = [1, 2, 3]
    before = target.read_bytes()
    args = ["extract", "--dataset", "folder", "--root", tmp_path / "imgs", *TINY_VIT_ARGS]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    cmd += ["-m", "vlpipe", *map(str, args)]  # --standalone: a free port of its own
    cmd += ["--out", str(target), "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "results.h5 exists and is not a vlpipe cache" in proc.stderr
    assert target.read_bytes() == before and not (tmp_path / "results.shards").exists()


def _pretrain_inputs(folder):
    """A 12-image region cache and LXMERT pre-training json: a caption and a question each."""
    import json

    from tests.fusion_fixtures import COLORS, image_cache

    image_cache(folder / "img.h5", 12, kind="regions")
    items = [
        {
            "img_id": f"img{i}",
            "sentf": {"mscoco": [f"a {COLORS[i % 3]} shape"], "vqa": ["what color is it?"]},
            "labelf": {"vqa": [{COLORS[i % 3]: 1.0}]},
        }
        for i in range(12)
    ]
    (folder / "pt.json").write_text(json.dumps(items))
    tiny = '{"hidden":32,"heads":2,"intermediate":64,"l_layers":1,"r_layers":1,"x_layers":1}'
    return ["--features", folder / "img.h5", "--data", folder / "pt.json", "--model-config", tiny]


def test_two_rank_pretraining_trains_and_validates_every_sentence(tmp_path):
    """torchrun -m vlpipe pretrain: every task's loss logged, the validation gathers every
    rank's share (24 sentences), rank 0 alone writes the run."""
    import json

    inputs = _pretrain_inputs(tmp_path)
    out = tmp_path / "two"
    args = ["pretrain", *inputs, "--val-data", tmp_path / "pt.json", "--epochs", 2]
    _run([*args, "--batch-size", 4, "--out", out, "--no-progress"], torchrun=True)
    evals = [json.loads(line) for line in (out / "eval_log.jsonl").read_text().splitlines()]
    assert [e["examples"] for e in evals] == [24, 24]
    header = (out / "train_log.csv").read_text().splitlines()[0].split(",")
    assert {f"loss_{t}" for t in ("mlm", "matched", "obj", "attr", "feat", "qa")} <= set(header)
    assert len(logged_losses(out)) == 6  # 24 sentences / (2 ranks x 4) x 2 epochs


def test_two_rank_full_finetuning_equals_one_process_with_double_batch(tmp_path):
    """--finetune full under torchrun: the ViT (no dropout) trains end to end on the decoded
    images, split across ranks; the text from its cache. Same losses and weights."""
    from tests.conftest import vlpipe
    from tests.test_encoder_top import bert_folder
    from tests.test_tune_top import EASY, VIT, vit_file

    vit, bert = vit_file(tmp_path / "vit.safetensors"), bert_folder(tmp_path / "bert")
    common = ["--split", "train", "--out"]
    vlpipe("extract", *EASY, *VIT, "--weights", vit, "--limit", 4, *common, tmp_path / "v.h5")
    text = [*EASY, "--backbone", "bert", "--weights", bert, "--limit", 32]
    vlpipe("extract", *text, *common, tmp_path / "t.h5")
    data = ["--task", "easy-vqa", "--split", "train", "--limit", 32]
    data += ["--features", tmp_path / "v.h5", "--text-features", tmp_path / "t.h5"]
    data += ["--finetune", "full", "--vision-weights", vit]
    _run([*_train_args(data, tmp_path / "one", 8), "--lr", 1e-3])
    _run([*_train_args(data, tmp_path / "two", 4), "--lr", 1e-3], torchrun=True)
    _assert_same_run(tmp_path / "one", tmp_path / "two", steps=8)
    assert any(k.startswith("tops.vision.model.blocks.") for k in _weights(tmp_path / "two"))
