"""`vlpipe pretrain`: sentence sources + image caches -> PretrainDataset -> LxmertPretraining ->
the training loop (fusion/train.py, with the pre-training objective).

The job's options are a PretrainJob (pipelines/configs.py) over the `lxmert-pretrain` preset
(the released recipe); the resolved config is saved as RUN/config.toml, the tokenizer as
RUN/vocab.txt. Checkpoints hold the model under LxmertForPreTraining's names, and run.json says
what it is ("kind": "pretrain"), the tasks, the answer table and the model config, so that
`vlpipe train --init RUN` and `vlpipe export-lxmert RUN` need nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from vlpipe.config import resolve, to_dict, to_toml
from vlpipe.distributed import from_env
from vlpipe.errors import ConfigError
from vlpipe.fusion import checkpoint as ckpt
from vlpipe.fusion.answer_tables import AnswerList, build_pretrain_table, qa_label_ids
from vlpipe.fusion.data import CacheSet
from vlpipe.fusion.train import train
from vlpipe.io import write_bytes_atomic, write_text_atomic
from vlpipe.pipelines.configs import PretrainJob, preset_layer
from vlpipe.pipelines.data import _check_modality, _tokenizer
from vlpipe.pipelines.train_job import (
    CONFIG_FILE,
    RESUMABLE,
    VOCAB_FILE,
    _check_run_dir,
    _flatten,
    _tokenizer_meta,
    fusion_config,
)
from vlpipe.provenance import encoder_identity

KIND = ckpt.PRETRAIN_KIND
HEAD_SIZES = ("num_objects", "num_attrs")  # --model-config keys that size heads, not the backbone


def resolve_pretrain(*layers: dict, names: dict | None = None) -> PretrainJob:
    """The PretrainJob of the layers over its preset (the released recipe unless named)."""
    from vlpipe.config import merge_all

    top = merge_all(*layers)
    name, preset = preset_layer(top.get("preset", "lxmert-pretrain"), "", "")
    job = resolve(PretrainJob, preset, *layers, names=names)
    return dataclasses.replace(job, preset=name)


def run_pretrain(job: PretrainJob) -> dict[str, Any]:
    """Pre-train the job's run; returns the last validation's losses ({} without one)."""
    from vlpipe.fusion.pretrain import PretrainObjective
    from vlpipe.fusion.pretrain_data import Masking, PretrainDataset, available_tasks
    from vlpipe.fusion.pretrain_model import LxmertPretraining

    replace = _check_run_dir(job)
    if not job.features or not job.data:
        raise ConfigError("pretrain needs --features (image caches) and --data (sentences)")
    sentences, val_sentences = _sentences(job)
    images = _caches(job.features, "--features")
    table = _answer_table(job, sentences)
    qa = [qa_label_ids(s.label, table) for s in sentences]
    tasks, off = available_tasks(images, job.tasks, any(ids for ids, _ in qa))
    _say_off(off)
    tokenizer, vocab_path = _tokenizer(job.vocab, None)
    config = _model_config(job, images, len(tokenizer), tasks, len(table.answers))
    masking = Masking(job.word_mask_rate, job.obj_mask_rate)
    common = dict(
        max_length=job.max_length,
        masking=masking,
        seed=job.optim.seed,
        num_labels=(config.num_objects, config.num_attrs),
    )
    data = PretrainDataset(sentences, images, tokenizer, qa, tasks, **common)
    val = None
    if val_sentences:
        val_images = _caches(job.val_features, "--val-features") if job.val_features else images
        val_qa = [qa_label_ids(s.label, table) for s in val_sentences]
        val = PretrainDataset(
            val_sentences, val_images, tokenizer, val_qa, tasks, stream=1, **common
        )
    torch.manual_seed(job.optim.seed)  # the initial weights are part of the run's recipe
    model = LxmertPretraining(config)
    if job.init_bert:
        from vlpipe.fusion.lxmert import load_bert_language

        print(load_bert_language(model, job.init_bert))
    meta = _meta(job, config, table, tokenizer, vocab_path, images, sentences, off)
    if job.resume:
        _check_resumable(job, meta)
    if from_env().main:
        if replace:
            ckpt.clear_run(job.out)
        job.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(job.out / CONFIG_FILE, to_toml(job))
        write_bytes_atomic(job.out / VOCAB_FILE, Path(vocab_path).read_bytes())
    results = train(
        model,
        PretrainObjective(tasks),
        data,
        job.optim,
        job.out,
        meta,
        val=val,
        resume=job.resume,
        progress=job.progress,
    )
    if from_env().main:
        plot_task_curves(job.out, tasks)
    return results


def _sentences(job: PretrainJob):
    from vlpipe.data_manifests.pretrain import read_sources

    train_part = read_sources(job.data, job.limit)
    val_part = read_sources(job.val_data, job.limit) if job.val_data else []
    return train_part, val_part


def _caches(paths: list[Path], flag: str) -> CacheSet:
    images = CacheSet(paths)
    _check_modality(images, "image", flag)
    return images


def _answer_table(job: PretrainJob, sentences) -> AnswerList:
    """--answer-table as given (all_ans.json), else the answers of the training sentences."""
    if job.answer_table is not None:
        from vlpipe.fusion.answer_tables import read_answer_list

        return read_answer_list(job.answer_table)
    return build_pretrain_table((s.label for s in sentences), job.min_answer_count)


def _say_off(off: dict[str, str]) -> None:
    for task, why in off.items():
        print(f"pretrain: task {task} is off: {why}", file=sys.stderr)


def _model_config(job: PretrainJob, images: CacheSet, vocab_size: int, tasks, answers: int):
    """The model: the backbone from the caches' width, the tokenizer's size and --model-config;
    the detector's class counts from --model-config, else the cache's detector, else 1600 /
    400."""
    from vlpipe.fusion.pretrain_model import PretrainModelConfig
    from vlpipe.pipelines.data import fusion_dims

    backbone_fields = {k: v for k, v in job.model.items() if k not in HEAD_SIZES}
    widths = fusion_dims("lxmert", images, None, vocab_size)
    backbone = fusion_config("lxmert", widths, backbone_fields)
    detector = images.provenance.get("model") or {}
    sizes = {
        "num_objects": job.model.get("num_objects", detector.get("num_classes", 1600)),
        "num_attrs": job.model.get("num_attrs", detector.get("num_attributes", 400)),
    }
    return PretrainModelConfig(backbone, tuple(tasks), max(answers, 1), **sizes)


def _meta(job, config, table, tokenizer, vocab_path, images, sentences, off) -> dict[str, Any]:
    digest = hashlib.sha256("\n".join(s.key for s in sentences).encode()).hexdigest()
    return {
        "kind": KIND,
        "fusion": "lxmert",
        "model_config": config.to_dict(),
        "tasks": list(config.tasks),
        "tasks_off": off,
        "answers": table.answers,
        "answer_table": table.source,
        "tokenizer": _tokenizer_meta(vocab_path, tokenizer, job.max_length),
        "caches": {"image": images.provenance},
        "image_kind": images.kind,
        "masking": {"word_rate": job.word_mask_rate, "obj_rate": job.obj_mask_rate},
        "data": {"sentences": len(sentences), "keys_sha256": digest},
        "config": to_dict(job, saved_only=True),
    }


def _identity(meta: dict) -> dict[str, Any]:
    """What a resumed pre-training run must share with the run it continues."""
    train_config = meta.get("train", {})
    identity = {
        "model": meta.get("model_config"),
        "answers": meta.get("answers"),
        "tokenizer": {k: v for k, v in (meta.get("tokenizer") or {}).items() if k != "vocab"},
        "image features": encoder_identity((meta.get("caches") or {}).get("image")),
        "masking": meta.get("masking"),
        "training data": meta.get("data"),
        "train": {k: v for k, v in train_config.items() if k not in RESUMABLE},
    }
    return _flatten(json.loads(json.dumps(identity, default=str)))  # as run.json holds it


def _check_resumable(job: PretrainJob, meta: dict) -> None:
    latest = ckpt.latest_checkpoint(job.out)
    if latest is None:
        raise ckpt.RunError(f"{job.out}: nothing to resume (no checkpoint)")
    saved = ckpt.load_meta(latest)
    if saved.get("kind") != KIND:
        raise ckpt.RunError(f"{job.out}: not a pre-training run (train it with vlpipe train)")
    now = dict(meta, train=dataclasses.asdict(job.optim))
    was, now_id = _identity(saved), _identity(now)
    changed = [
        f"{k}: {was[k]!r} -> {now_id.get(k)!r}" for k in sorted(was) if was[k] != now_id.get(k)
    ]
    if not changed:
        return
    listing = "; ".join(changed[:8]) + (f" (+{len(changed) - 8} more)" if len(changed) > 8 else "")
    if not job.accept_changes or any(c.startswith("model.") for c in changed):
        hint = "" if job.accept_changes else "; pass --accept-changes to continue anyway"
        raise ckpt.RunError(f"{latest}: cannot resume, the run differs: {listing}{hint}")
    print(f"WARNING: resuming {job.out} with changes: {listing}", file=sys.stderr)


def plot_task_curves(run_dir: Path, tasks) -> Path | None:
    """RUN/task_curves.png: one panel per task, its training loss per step and its validation
    loss at each validation."""
    import csv

    from vlpipe.fusion.plot import panel_plots
    from vlpipe.fusion.train import _read_jsonl

    log = run_dir / "train_log.csv"
    if not log.exists():
        return None
    with open(log) as fh:
        rows = list(csv.DictReader(fh))
    evals = _read_jsonl(run_dir / "eval_log.jsonl")
    panels = {}
    for task in (*tasks, "total"):
        column = "loss" if task == "total" else f"loss_{task}"
        curves = {"train": ([int(r["step"]) for r in rows], [float(r[column]) for r in rows])}
        points = [(e["step"], e[task]) for e in evals if task in e]
        if points:
            curves["validation"] = ([p[0] for p in points], [p[1] for p in points])
        panels[task] = curves
    return panel_plots(run_dir / "task_curves.png", panels)
