"""`vlpipe extract`: resolve a dataset into records, build the backbone, run the loop."""

from __future__ import annotations

import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from vlpipe.cache import build_index
from vlpipe.cache_layout import check_target, remove_cache
from vlpipe.config import merge_all, resolve, to_dict
from vlpipe.distributed import resolve_device
from vlpipe.errors import ConfigError
from vlpipe.extract.base import parse_weights
from vlpipe.extract.runner import RunOptions, Summary, extract_images, extract_texts
from vlpipe.pipelines.configs import APPLIES, ExtractJob

CNN_BACKBONES = ("resnet", "cnn")  # where `layer` names a stage (the old [cnn] section's)


def resolve_extract(*layers: dict, names: dict | None = None) -> ExtractJob:
    """The ExtractJob of the layers (file, --set, flags); an option given for a backbone it
    does not apply to is an error naming it (defaults never are)."""
    section_layer = _layer_from_section(layers)
    layers = tuple(_legacy_sections(layer) for layer in layers)
    given = merge_all(*layers)
    job = resolve(ExtractJob, *layers, names=names)
    job = _text_length(job, given)
    if section_layer and job.backbone not in CNN_BACKBONES:  # a CNN stage, as it always was
        raise ConfigError(
            f"cnn.layer: only for --backbone {' | '.join(CNN_BACKBONES)}, not {job.backbone!r} "
            "(vit / bert: the top-level `layer`, --layer N)"
        )
    defaults = _defaults()
    for name, backbones in APPLIES.items():
        value = given.get(name)
        if isinstance(value, dict):  # a section: the options set to other than their default
            value = {k: v for k, v in value.items() if v != defaults[name].get(k)}
        elif value == defaults.get(name):
            value = None  # a replayed config holds every default: not "given"
        if value not in (None, False, {}, []) and job.backbone not in backbones:
            flag = (names or {}).get((name,), name) if not isinstance(value, dict) else None
            flags = flag or ", ".join(
                (names or {}).get((name, k), f"{name}.{k}") for k in sorted(value)
            )
            raise ConfigError(
                f"{flags}: only for --backbone {' | '.join(backbones)}, not {job.backbone!r}"
            )
    return job


def _text_length(job: ExtractJob, given: dict) -> ExtractJob:
    """--max-length not given: the dataset's own (VCR's candidates are long), else the
    default."""
    from vlpipe.data_manifests.registry import TEXT_LENGTHS

    if job.backbone == "bert" and given.get("max_length") is None and job.dataset in TEXT_LENGTHS:
        return replace(job, max_length=TEXT_LENGTHS[job.dataset])
    return job


def _legacy_sections(layer: dict) -> dict:
    """A layer as configs are written now: the section configs written before `--backbone cnn`
    call `resnet` (every extract config a cache recorded until then) read as the `cnn` section,
    which it became (where a layer has both, `cnn` wins), and that section's `layer` (before
    `--layer` applied to vit / bert too) read as the job's own (where a layer has both, the
    top-level one wins)."""
    if not isinstance(layer, dict) or not {"resnet", "cnn"} & layer.keys():
        return layer
    layer = dict(layer)
    if "resnet" in layer:
        old = layer.pop("resnet")
        both = isinstance(old, dict) and isinstance(layer.get("cnn"), dict)
        layer["cnn"] = merge_all(old, layer["cnn"]) if both else layer.get("cnn", old)
    if isinstance(layer["cnn"], dict) and "layer" in layer["cnn"]:
        layer["cnn"] = dict(layer["cnn"])
        stage = layer["cnn"].pop("layer")
        if stage is not None and layer.get("layer") is None:  # None: a replayed default
            layer["layer"] = stage
    return layer


def _layer_from_section(layers: tuple[dict, ...]) -> bool:
    """Whether the layer that sets `layer` last sets it in an old `[cnn]` / `[resnet]`
    section (None, as replayed configs hold it, sets nothing)."""
    from_section = False
    for layer in layers:
        if not isinstance(layer, dict):
            continue
        if layer.get("layer") is not None:
            from_section = False
        elif any(
            isinstance(layer.get(name), dict) and layer[name].get("layer") is not None
            for name in ("resnet", "cnn")
        ):
            from_section = True
    return from_section


def _defaults() -> dict[str, Any]:
    """Every ExtractJob field's default, sections as dicts."""
    import dataclasses

    out: dict[str, Any] = {}
    for f in dataclasses.fields(ExtractJob):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
            out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def build_from_job(job: ExtractJob, warn: bool = True):
    """The frozen extractor of the job, its random-init weights seeded by --seed (`warn`: say
    so loudly; not for a model whose weights are loaded next)."""
    import torch

    weights = parse_weights(job.weights)
    layer = {"layer": job.layer} if job.layer is not None else {}
    cnn = {**_given(job.cnn), **layer}
    specific = {"frcnn": _frcnn_options(job.frcnn), "resnet": cnn, "cnn": cnn}
    specific |= {"vit": layer, "bert": layer}
    torch.manual_seed(job.run.seed)  # random-init weights are a function of the seed
    try:
        extractor = _build(job, weights, specific)
    except (TypeError, AssertionError) as err:  # a model config the architecture does not take
        raise ConfigError(f"--model-config {job.model}: {err}") from err
    if weights is None and warn:
        warn_random(job.backbone)
    return extractor


def _build(job: ExtractJob, weights: str | None, specific: dict):
    from vlpipe.extract.registry import build_extractor

    return build_extractor(
        job.backbone,
        arch=job.arch,
        weights=weights,
        image_size=job.image_size,
        max_length=job.max_length,
        model_kwargs=job.model,
        vocab=job.vocab,
        patches=not job.cls_only,
        **specific.get(job.backbone, {}),
    )


def _given(section) -> dict[str, Any]:
    """A section's options that are set (None / False / empty: the model's own default)."""
    return {k: v for k, v in asdict(section).items() if v not in (None, False, [], ())}


def _frcnn_options(frcnn) -> dict[str, Any]:
    options = _given(frcnn)
    if "d2_config" in options:  # the detectron2 backend calls it config
        options["config"] = str(options.pop("d2_config"))
    if "frcnn_set" in options:
        options["frcnn_set"] = tuple(options["frcnn_set"])
    return options


def run_options(job: ExtractJob) -> RunOptions:
    return RunOptions(**asdict(job.run))


def warn_random(backbone: str) -> None:
    bar = "!" * 78
    print(
        f"{bar}\n! {backbone}: RANDOM-INIT weights (--weights random). The features carry no "
        f"pretrained\n! knowledge; provenance records weights=random-init. Pass --weights PATH "
        f"for real ones.\n{bar}",
        file=sys.stderr,
    )


def records_for(job: ExtractJob, modality: str) -> list[Any]:
    from vlpipe.data_manifests import registry

    if modality == "image":
        if job.annotations:
            raise ConfigError("--annotations: image backbones read --root, not annotation files")
        return registry.list_images(job.dataset, job.root, job.split, job.limit)
    if job.root is not None:
        raise ConfigError("--root: text backbones read --annotations, not an image folder")
    from vlpipe.data_manifests.base import candidate_records

    # a multiple-choice record's candidates are cached one by one
    return candidate_records(
        registry.read_texts(job.dataset, list(job.annotations), job.split, job.limit)
    )


def run_extract(job: ExtractJob, opts: RunOptions | None = None) -> Summary:
    """Extract; under torchrun every rank takes every world-th item and writes its own shards,
    and rank 0 ties them into the index once all ranks are done. The resolved job is recorded
    in the cache's provenance ("config")."""
    from vlpipe import distributed

    opts = opts or run_options(job)
    check_target(Path(job.out), resume=opts.resume, overwrite=opts.overwrite)  # before any work
    dist = distributed.init(resolve_device(opts.device).type)
    extractor = build_from_job(job)
    records = records_for(job, extractor.modality)
    if not records:
        raise ConfigError(f"dataset {job.dataset!r} split {job.split!r} has no items")
    extractor.prepare(records)  # e.g. the given boxes, read and checked before any work
    if dist.enabled:
        records, opts = records[dist.rank :: dist.world], _rank_options(job.out, opts, dist)
    root = str(Path(job.root).resolve()) if job.root else None  # training may read the images
    info = {"name": job.dataset, "split": job.split, "root": root}
    info["config"] = to_dict(job, saved_only=True)
    run = extract_images if extractor.modality == "image" else extract_texts
    summary = run(extractor, records, str(job.out), opts, info)
    if dist.enabled:
        distributed.barrier(dist)
        if dist.main:
            build_index(job.out)
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
