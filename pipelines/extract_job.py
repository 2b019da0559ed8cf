"""`vlpipe extract`: resolve a dataset into records, build the backbone, run the loop."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vlpipe.cache import build_index
from vlpipe.cache_layout import check_target, remove_cache
from vlpipe.distributed import resolve_device
from vlpipe.extract.base import parse_weights
from vlpipe.extract.runner import RunOptions, Summary, extract_images, extract_texts


@dataclass
class FrcnnOptions:
    """Options of `--backbone frcnn` only (None: the box policy's / model's default)."""

    box_policy: str | None = None
    min_boxes: int | None = None
    max_boxes: int | None = None
    conf_threshold: float | None = None
    max_size: int | None = None
    allow_pickle: bool = False
    impl: str | None = None
    config: str | None = None
    conventions: str | None = None
    frcnn_set: tuple[str, ...] = ()

    def given(self) -> dict[str, object]:
        """The options the user set, by name."""
        unset = (None, False, ())
        return {k: v for k, v in asdict(self).items() if not any(v is u for u in unset)}


@dataclass
class ResnetOptions:
    """Options of `--backbone resnet` only (None: the last stage, global average pooling)."""

    layer: str | None = None
    pool: str | None = None

    def given(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class ExtractRequest:
    backbone: str
    dataset: str
    out: Path
    split: str | None = None
    root: Path | None = None
    annotations: tuple[Path, ...] = ()
    limit: int | None = None
    weights: str | None = None
    arch: str | None = None
    model_kwargs: str = "{}"
    image_size: int | None = None
    max_length: int = 20
    vocab: str | None = None
    cls_only: bool = False
    frcnn: FrcnnOptions = field(default_factory=FrcnnOptions)
    resnet: ResnetOptions = field(default_factory=ResnetOptions)


def build_from_request(req: ExtractRequest, seed: int = 0):
    import torch

    from vlpipe.extract.registry import build_extractor

    weights = parse_weights(req.weights)
    try:
        kwargs = json.loads(req.model_kwargs)
    except json.JSONDecodeError as err:
        raise ValueError(f"--model-kwargs is not JSON: {err}") from err
    specific = {"frcnn": req.frcnn.given(), "resnet": req.resnet.given()}
    for backbone, options in specific.items():
        if options and req.backbone != backbone:
            flags = ", ".join("--" + k.replace("_", "-") for k in options)
            raise ValueError(f"{flags}: only for --backbone {backbone}, not {req.backbone!r}")
    torch.manual_seed(seed)  # random-init weights are a function of the seed
    extractor = build_extractor(
        req.backbone,
        arch=req.arch,
        weights=weights,
        image_size=req.image_size,
        max_length=req.max_length,
        model_kwargs=kwargs,
        vocab=req.vocab,
        patches=not req.cls_only,
        **specific.get(req.backbone, {}),
    )
    if weights is None:
        warn_random(req.backbone)
    return extractor


def warn_random(backbone: str) -> None:
    bar = "!" * 78
    print(
        f"{bar}\n! {backbone}: RANDOM-INIT weights (--weights random). The features carry no "
        f"pretrained\n! knowledge; provenance records weights=random-init. Pass --weights PATH "
        f"for real ones.\n{bar}",
        file=sys.stderr,
    )


def records_for(req: ExtractRequest, modality: str) -> list[Any]:
    from vlpipe.data_manifests import registry

    if modality == "image":
        return registry.list_images(req.dataset, req.root, req.split, req.limit)
    return registry.read_texts(req.dataset, list(req.annotations), req.split, req.limit)


def run_extract(req: ExtractRequest, opts: RunOptions) -> Summary:
    """Extract; under torchrun every rank takes every world-th item and writes its own shards,
    and rank 0 ties them into the index once all ranks are done."""
    from vlpipe import distributed

    check_target(Path(req.out), resume=opts.resume, overwrite=opts.overwrite)  # before any work
    dist = distributed.init(resolve_device(opts.device).type)
    extractor = build_from_request(req, opts.seed)
    records = records_for(req, extractor.modality)
    if not records:
        raise ValueError(f"dataset {req.dataset!r} split {req.split!r} has no items")
    if dist.enabled:
        records, opts = records[dist.rank :: dist.world], _rank_options(req.out, opts, dist)
    info = {"name": req.dataset, "split": req.split, "root": str(req.root) if req.root else None}
    run = extract_images if extractor.modality == "image" else extract_texts
    summary = run(extractor, records, str(req.out), opts, info)
    if dist.enabled:
        distributed.barrier(dist)
        if dist.main:
            build_index(req.out)
        distributed.barrier(dist)
    return summary


def _rank_options(out: Path, opts: RunOptions, dist) -> RunOptions:
    """Each rank writes shards "r<rank>-*" under its own lock; only rank 0 may clear an old
    cache (--overwrite: only a vlpipe cache, and only while no writer holds a lock), the others
    wait for it and then open the folder as a resume. Every rank checked the target first."""
    from vlpipe import distributed

    if dist.main and opts.overwrite and not opts.resume:
        remove_cache(out)
    distributed.barrier(dist)
    device = opts.device
    if resolve_device(device).type == "cuda":
        device = f"cuda:{dist.local_rank}"
    return replace(
        opts, writer=f"r{dist.rank}", build_index=False, resume=True, overwrite=False, device=device
    )
