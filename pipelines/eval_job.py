"""`vlpipe evaluate / predict`: a trained run (or an LXMERT checkpoint from elsewhere) over the
caches of a split: the official metrics, or the official submission file."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlpipe.distributed import resolve_device
from vlpipe.errors import ConfigError, EvaluationError
from vlpipe.fusion import checkpoint as ckpt
from vlpipe.fusion.answers import AnswerVocab
from vlpipe.fusion.data import DataMismatch, TaskDataset
from vlpipe.fusion.model import TaskModel
from vlpipe.fusion.tasks import Task, get_task
from vlpipe.fusion.train import evaluate, predict
from vlpipe.pipelines.configs import DataConfig, EvalConfig, EvaluateJob, ModelSource, PredictJob
from vlpipe.pipelines.data import (
    DataSpec,
    build_dataset,
    check_tune_layers,
    fusion_dims,
    model_from_meta,
)
from vlpipe.provenance import encoder_identity

if TYPE_CHECKING:
    from vlpipe.pipelines.lxmert_import import ImportOptions


def load_run(run_dir: Path, which: str | None = None) -> tuple[TaskModel, dict[str, Any], Task]:
    """The model of one checkpoint of a run folder (`which`: see checkpoint.select_checkpoint),
    its run.json with "checkpoint": {"path", "reason"} added, and its task."""
    if ckpt.latest_checkpoint(run_dir) is None:
        raise ckpt.RunError(
            f"{run_dir}: no checkpoint: neither a `vlpipe train --out` folder nor an LXMERT "
            "checkpoint (BEST.pth / LAST.pth, a Hugging Face LxmertForQuestionAnswering folder)"
        )
    path, reason = ckpt.select_checkpoint(run_dir, which)
    meta = ckpt.load_meta(path)
    if meta.get("kind") == ckpt.PRETRAIN_KIND:
        raise ckpt.RunError(
            f"{run_dir}: a pre-training run (vlpipe pretrain) has no task head: fine-tune it "
            "with `vlpipe train --init` first"
        )
    task = get_task(meta["task"])
    model = model_from_meta(meta)
    ckpt.load_weights(path, model)
    meta["checkpoint"] = {"path": str(path), "reason": reason}
    return model, meta, task


def load_model(
    path: Path, lxmert: ImportOptions | None = None, which: str | None = None
) -> tuple[TaskModel, dict[str, Any], Task]:
    """A `vlpipe train` run folder (the checkpoint `which` names), or an LXMERT checkpoint from
    elsewhere (BEST.pth / LAST.pth of airsplay/lxmert, a Hugging Face
    LxmertForQuestionAnswering folder: a single checkpoint, so `which` must be None)."""
    from vlpipe.pipelines.lxmert_import import ImportOptions, import_task_model, is_foreign

    lxmert = lxmert or ImportOptions()
    if (Path(path) / ckpt.LATEST).exists() or not is_foreign(path):
        model, meta, task = load_run(path, which)
        if lxmert.task is not None and lxmert.task != task.name:
            raise ConfigError(f"{path}: a {task.name} run, not {lxmert.task}")
        given = [f"--{n}" for n in ("answers", "vocab") if getattr(lxmert, n) is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)}: for LXMERT checkpoints from elsewhere; {path} is a vlpipe "
                "run, which carries its answers and vocab"
            )
        return model, meta, task
    if which is not None:
        raise ConfigError(
            f"--checkpoint {which}: {path} is a single LXMERT checkpoint, not a run folder "
            "with checkpoints to choose from"
        )
    model, meta, task = import_task_model(path, lxmert)
    meta["checkpoint"] = {"path": str(path), "reason": "an LXMERT checkpoint from elsewhere"}
    return model, meta, task


def run_dataset(
    run_dir: Path, spec: DataSpec, lxmert: ImportOptions | None = None, which: str | None = None
) -> tuple[TaskModel, Task, TaskDataset, dict]:
    model, meta, task = load_model(run_dir, lxmert, which)
    spec.task = meta["task"]
    task = dataclasses.replace(task, evaluation=spec.evaluation())
    tokenizer = None
    if "text_ids" in model.needs:
        from vlpipe.tokenizer import bert_tokenizer

        vocab = Path(meta["tokenizer"]["vocab"])
        if "source" not in meta and not vocab.is_absolute():  # a vlpipe run's own copy
            vocab = Path(run_dir) / vocab
        tokenizer = bert_tokenizer(vocab, meta["tokenizer"].get("lowercase"))
    data = build_dataset(
        spec,
        task,
        AnswerVocab(meta["answers"]),
        model.needs,
        tokenizer,
        meta["tokenizer"]["max_length"],
        transform=getattr(model.tops, "transform", None),
    )
    meta["warnings"] = _check_same_features(meta, data)
    return model, task, data, meta


def _check_same_features(meta: dict, data: TaskDataset) -> list[str]:
    """Features of another size than the model's are an error; features from another encoder
    (model, weights, seed, preprocessing, ...) than training used give a loud warning each.
    An LXMERT checkpoint trained elsewhere records no caches: only the sizes are compared."""
    dims = fusion_dims(meta["fusion"], data.images, data.texts, 0)
    for key, value in dims.items():
        trained = meta["fusion_config"].get(key)
        if None not in (trained, value) and value != trained:
            caches = data.images.names if key != "text_dim" else data.texts.names
            raise DataMismatch(
                f"{caches}: features of size {value} for {key}, the model in the run was "
                f"trained on {trained}"
            )
    check_tune_layers(meta.get("tune"), data.images, data.texts)
    if meta.get("caches") is None:
        return []
    warnings = []
    live = meta.get("finetune") or {}
    for kind, caches in (("image", data.images), ("text", data.texts)):
        if caches is None and live.get("vision" if kind == "image" else "text"):
            continue  # an encoder trained end to end reads its inputs itself: no cache needed
        trained = encoder_identity((meta.get("caches") or {}).get(kind))
        now = encoder_identity(caches.provenance if caches is not None else None)
        differ = [k for k in trained.keys() | now.keys() if trained.get(k) != now.get(k)]
        names = caches.names if caches is not None else "none"
        for key in sorted(differ):
            warnings.append(
                f"{kind} features differ from the run's training caches in {key!r}: trained on "
                f"{trained.get(key)!r}, given {now.get(key)!r} ({names})"
            )
    return warnings


def run_evaluate(job: EvaluateJob) -> tuple[dict, dict]:
    """(metrics, predictions); the metrics carry "warnings" when the caches' encoder differs
    from the one the run was trained on."""
    model, task, data, meta = _job_dataset(job.model, job.data, job.eval)
    results, preds = evaluate(model, task, data, job.batch_size, resolve_device(job.device))
    if not results:
        raise EvaluationError(
            f"{', '.join(map(str, job.data.annotations)) or 'the split'}: no question has an "
            "answer to score against (use `vlpipe predict` for unlabelled splits)"
        )
    warnings = list(meta["warnings"])
    if data.skipped:
        results = dict(results, skipped=len(data.skipped))
        warnings.append(
            f"--skip-missing left out {len(data.skipped)} of {len(data) + len(data.skipped)} "
            "questions: the figures are over the others, not the official split"
        )
    if warnings:
        results = dict(results, warnings=warnings)
    return dict(results, checkpoint=meta["checkpoint"]), preds


def run_predict(job: PredictJob) -> Path:
    """The submission file of the model's predictions on the split."""
    model, task, data, meta = _job_dataset(job.model, job.data, None)
    for warning in meta["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    probs = {} if task.submission.probabilities else None
    preds = predict(
        model, task, data, job.batch_size, resolve_device(job.device), probabilities=probs
    )
    run = job.model.run
    folder = run if run.is_dir() else run.parent  # beside a BEST.pth
    out = job.out or folder / task.submission_name
    return task.write_predictions(out, probs if probs is not None else preds)


def _job_dataset(source: ModelSource, data: DataConfig, scoring: EvalConfig | None):
    from vlpipe.pipelines.lxmert_import import ImportOptions

    lxmert = ImportOptions(source.task, source.answers, source.vocab)
    found = run_dataset(source.run, DataSpec.of("", data, scoring), lxmert, source.checkpoint)
    chosen = found[-1]["checkpoint"]
    print(f"checkpoint: {chosen['path']} ({chosen['reason']})", file=sys.stderr)
    return found
