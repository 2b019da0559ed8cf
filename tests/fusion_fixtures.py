"""Tiny caches written by the real writer, and records whose answers the features determine,
so a model can actually learn them."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from vlpipe.cache import CacheWriter, Schema, region_shapes
from vlpipe.data_manifests.base import TextRecord

PROV = {"backbone": "vit", "weights_sha256": "x", "preprocessing": {"grid": [2, 2]}}
COLORS = ("red", "green", "blue")
DIM = 16


def image_cache(
    path: Path,
    n: int,
    *,
    kind: str = "patches",
    seed: int = 0,
    dim: int = DIM,
    prov: dict | None = None,
) -> list[str]:
    """n images; image i has colour i % 3 written into its features."""
    rng = np.random.default_rng(seed)
    keys = [f"img{i}" for i in range(n)]
    feats = rng.normal(size=(n, 4, dim)).astype(np.float32) * 0.1
    for i in range(n):
        feats[i, :, i % 3] += 2.0
    if kind == "regions":
        shapes = region_shapes(4, dim)
        arrays = {
            "image_feats": feats,
            "image_hw": np.tile([[30, 40]], (n, 1)),
            "image_boxes": np.tile([[0, 0, 20, 15]], (n, 4, 1)).astype(np.float32),
            "image_mask": np.ones((n, 4), bool),
            "obj_ids": np.zeros((n, 4)),
            "obj_conf": np.ones((n, 4)),
            "attr_ids": np.zeros((n, 4)),
            "attr_conf": np.ones((n, 4)),
        }
        prov = dict(prov or PROV, backbone="frcnn")
    else:
        shapes = {"image_cls": (dim,), "image_hw": (2,), "image_feats": (4, dim)}
        arrays = {
            "image_cls": feats.mean(1),
            "image_hw": np.tile([[30, 40]], (n, 1)),
            "image_feats": feats,
        }
        prov = prov or PROV
    with CacheWriter(path, Schema.build(kind, shapes, "float32"), prov) as writer:
        writer.add(keys, arrays)
    return keys


QUESTIONS = ("what color is the shape?", "which colour is shown?")


def color_records(n_images: int, per_image: int = 2, offset: int = 0) -> list[TextRecord]:
    recs = []
    for i in range(n_images):
        for q in range(per_image):
            recs.append(
                TextRecord(
                    key=f"q{offset + i}_{q}",
                    text=QUESTIONS[q % 2],
                    image_keys=(f"img{i}",),
                    answers=(COLORS[i % 3],),
                )
            )
    return recs


def text_cache(path: Path, records: list[TextRecord], length: int = 6) -> None:
    """tokens cache: the text features encode which question it is (no answer leak)."""
    n = len(records)
    which = np.array([QUESTIONS.index(r.text) for r in records])
    cls = np.zeros((n, DIM), np.float32)
    cls[np.arange(n), 8 + which] = 1.0
    ids = np.zeros((n, length), np.int32)
    ids[:, 0], ids[:, 1], ids[:, 2] = 101, 2000 + which, 102
    mask = ids != 0
    feats = np.repeat(cls[:, None], length, 1) * mask[..., None]
    shapes = {
        "text_cls": (DIM,),
        "text_ids": (length,),
        "text_mask": (length,),
        "text": (),
        "text_feats": (length, DIM),
    }
    arrays = {
        "text_cls": cls,
        "text_ids": ids,
        "text_mask": mask,
        "text_feats": feats,
        "text": np.array([r.text for r in records], dtype=object),
    }
    prov = {"backbone": "bert", "weights_sha256": "y", "preprocessing": {}}
    with CacheWriter(path, Schema.build("tokens", shapes, "float32"), prov) as writer:
        writer.add([r.key for r in records], arrays)


def gqa_color_task(folder: Path, n_images: int = 12, dim: int = DIM) -> list[str]:
    """Image and text caches plus a GQA-format question file (two questions per image whose
    colour the features encode) in `folder`; returns the `vlpipe train` data arguments."""
    image_cache(folder / "img.h5", n_images, dim=dim)
    recs = color_records(n_images)
    text_cache(folder / "txt.h5", recs)
    questions = {
        r.key: {"imageId": r.image_keys[0], "question": r.text, "answer": r.answers[0]}
        for r in recs
    }
    (folder / "q.json").write_text(json.dumps(questions))
    return [
        "--features",
        str(folder / "img.h5"),
        "--text-features",
        str(folder / "txt.h5"),
        "--task",
        "gqa",
        "--annotations",
        str(folder / "q.json"),
    ]


def logged_losses(run_dir: Path) -> list[float]:
    """The per-step losses a run wrote to its train_log.csv."""
    with open(run_dir / "train_log.csv") as fh:
        return [float(r["loss"]) for r in csv.DictReader(fh)]


def assert_fits_one_batch(model, batch: dict, steps: int = 15) -> None:
    """A few AdamW steps on one batch must halve the loss: the model can learn at all."""
    import torch
    from torch import nn

    head = nn.Linear(model.output_dim, 3)
    target = torch.tensor([0, 1, 2])
    params = [p for p in [*model.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(steps):
        loss = nn.functional.cross_entropy(head(model(**batch)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def region_cache(
    path: Path,
    n: int,
    *,
    regions: int = 8,
    min_real: int = 3,
    dim: int = DIM,
    labels: tuple[int, int] = (5, 5),
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """n region images (keys img0..) with a random number (>= min_real) of real regions each;
    the padding rows (image_mask False) hold features too (9.0), so a masking that used them
    would show. Detector ids are below `labels` (objects, attributes). Returns the arrays."""
    rng = np.random.default_rng(seed)
    real = np.arange(regions)[None] < rng.integers(min_real, regions + 1, n)[:, None]
    xy = rng.uniform(0, 15, (n, regions, 2))
    arrays = {
        "image_feats": np.where(real[..., None], rng.normal(size=(n, regions, dim)), 9.0),
        "image_hw": np.tile([[30, 40]], (n, 1)),
        "image_boxes": np.concatenate([xy, xy + rng.uniform(1, 15, (n, regions, 2))], -1),
        "image_mask": real,
        "obj_ids": rng.integers(0, labels[0], (n, regions)),
        "obj_conf": rng.uniform(0.2, 1.0, (n, regions)),
        "attr_ids": rng.integers(0, labels[1], (n, regions)),
        "attr_conf": rng.uniform(0.2, 1.0, (n, regions)),
    }
    arrays = {k: v.astype(np.float32) if v.dtype == np.float64 else v for k, v in arrays.items()}
    schema = Schema.build("regions", region_shapes(regions, dim), "float32")
    with CacheWriter(path, schema, dict(PROV, backbone="frcnn")) as writer:
        writer.add([f"img{i}" for i in range(n)], arrays)
    return arrays
