"""`vlpipe train`: caches + annotations -> datasets -> TaskModel -> the training loop.

The job's options are a TrainJob (pipelines/configs.py), resolved from its layers: defaults <
preset < --config file < --set < flags. The resolved config is saved in the run folder as
config.toml; `vlpipe train --config RUN/config.toml` trains the same run again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import torch

from vlpipe.config import merge_all, resolve, to_dict, to_toml
from vlpipe.distributed import from_env
from vlpipe.errors import ConfigError, InputError
from vlpipe.fusion import checkpoint as ckpt
from vlpipe.fusion.answers import AnswerVocab
from vlpipe.fusion.data import CacheSet, build_vocab
from vlpipe.fusion.model import TaskModel, fusion_needs, make_fusion_config, needs_with_tops
from vlpipe.fusion.tasks import Task, get_task
from vlpipe.fusion.train import TrainConfig, train
from vlpipe.io import write_bytes_atomic, write_text_atomic
from vlpipe.pipelines.configs import TrainJob, preset_layer
from vlpipe.pipelines.data import (
    DataSpec,
    _tokenizer,
    build_dataset,
    check_tune_layers,
    fusion_dims,
)
from vlpipe.provenance import encoder_identity
from vlpipe.tokenizer import BERT_VOCAB_SIZE, MAX_LENGTH

CONFIG_FILE = "config.toml"
VOCAB_FILE = "vocab.txt"  # a tokenizing fusion's WordPiece vocab, copied into the run


def resolve_train(*layers: dict, names: dict | None = None) -> TrainJob:
    """The TrainJob of the layers (file, --set, flags: later ones win) over its preset: the one
    they name, else the fusion's and task's."""
    top = merge_all(*layers)
    name, preset = preset_layer(top.get("preset"), top.get("fusion", "concat"), top.get("task", ""))
    job = resolve(TrainJob, preset, *layers, names=names)
    _check_applies(job, merge_all(preset, top), names or {})
    job = _text_length(job, merge_all(preset, top))
    return dataclasses.replace(job, preset=name) if name else job


# Options that apply only to some jobs: (field, when it applies, what to say otherwise).
_TOKENIZING = ("lxmert", "lstm")


def _text_length(job: TrainJob, given: dict) -> TrainJob:
    """A fusion that tokenizes, --max-length not given: the annotations' own length where
    their texts are long (VCR), else the default."""
    from vlpipe.data_manifests.registry import TEXT_LENGTHS

    fmt = job.data.annotations_format or get_task(job.task).default_format
    if job.fusion in _TOKENIZING and given.get("max_length") is None and fmt in TEXT_LENGTHS:
        return dataclasses.replace(job, max_length=TEXT_LENGTHS[fmt])
    return job


def _check_applies(job: TrainJob, given: dict, names: dict) -> None:
    """An option given (other than at its default) where it does nothing is an error."""
    defaults = {"vocab": None, "max_length": MAX_LENGTH, "answer_table": None}
    defaults |= {"partial_init": False, "init_bert": None, "init": None}
    defaults |= {"grad_checkpointing": False}
    rules = [
        ("vocab", job.fusion in _TOKENIZING, "only fusions that tokenize (lxmert, lstm)"),
        ("grad_checkpointing", job.finetune is not None, "only with --finetune full"),
        ("max_length", job.fusion in _TOKENIZING, "only fusions that tokenize (lxmert, lstm)"),
        ("answer_table", job.init is not None, "only with --init"),
        ("partial_init", job.init is not None, "only with --init"),
        ("init", job.fusion == "lxmert", "LXMERT checkpoints: only --fusion lxmert"),
        ("init_bert", job.fusion == "lxmert", "BERT language layers: only --fusion lxmert"),
    ]
    for name, applies, why in rules:
        if not applies and given.get(name, defaults[name]) != defaults[name]:
            raise ConfigError(f"{names.get((name,), name)}: {why}, not --fusion {job.fusion}")
    _check_validation_options(job, names)
    if job.optim.optimizer == "bertadam" and job.optim.warmup_ratio >= 1:
        raise ConfigError("--warmup-ratio must be < 1 with --optimizer bertadam (warmup_linear)")


def _check_validation_options(job: TrainJob, names: dict) -> None:
    """--val-every and --early-stop need validation, --early-stop-delta needs --early-stop."""
    optim = job.optim

    def flag(field: str) -> str:
        return names.get(("optim", field), f"--{field.replace('_', '-')}")

    for field in ("val_every", "early_stop"):
        if getattr(optim, field) and not job.validates:
            raise ConfigError(f"{flag(field)}: validation needs --val-split or --val-annotations")
    if optim.early_stop_delta and not optim.early_stop:
        raise ConfigError(f"{flag('early_stop_delta')}: only with {flag('early_stop')}")


def data_specs(job: TrainJob) -> tuple[DataSpec, DataSpec | None]:
    """The training examples, and the validation ones when the job validates (its caches
    default to the training ones)."""
    train_spec = DataSpec.of(job.task, job.data, job.eval)
    if not job.validates:
        given = [f for f, v in vars(job.val).items() if v not in (None, False, [])]
        if given:
            flags = ", ".join(f"--val-{f.replace('_', '-')}" for f in given)
            raise ConfigError(f"{flags}: validation needs --val-split or --val-annotations")
        return train_spec, None
    val = job.val
    val = dataclasses.replace(
        val,
        features=val.features or job.data.features,
        text_features=val.text_features or job.data.text_features,
        annotations_format=val.annotations_format or job.data.annotations_format,
    )
    return train_spec, dataclasses.replace(DataSpec.of(job.task, val, job.eval), role="val")


def _check_run_dir(job: TrainJob) -> bool:
    """Never train over an earlier run by accident. True when --overwrite will replace one
    (only the files vlpipe wrote, once everything else has been checked)."""
    if job.out.exists() and not job.out.is_dir():
        raise ckpt.RunError(f"--out {job.out} is a file, not a run folder")
    if job.resume or not (job.out / ckpt.LATEST).exists():
        return False
    if not job.overwrite:
        raise ckpt.RunError(
            f"{job.out} already holds a run: pass --resume to continue it or "
            "--overwrite to start again"
        )
    return True


def run_train(job: TrainJob) -> dict[str, Any]:
    """Train the job's run; returns the last validation metrics ({} without validation)."""
    replace = _check_run_dir(job)
    train_spec, val_spec = data_specs(job)
    task = get_task(job.task, (val_spec or train_spec).evaluation())
    images = CacheSet(train_spec.features)
    texts = CacheSet(train_spec.text_features) if train_spec.text_features else None
    live = _finetune(job, images, texts)
    tops = live.encoders if live else _encoder_tops(job, images, texts)
    needs = needs_with_tops(fusion_needs(job.fusion), tops)
    tokenizer, vocab_path, max_length = (None, None, job.max_length)
    init_model, init_vocab = _init_defaults(job)
    if live and live.tokenizer is not None:  # BERT trains: tokenized as its cache was
        tokenizer, vocab_path, max_length = live.tokenizer, live.vocab_path, live.max_length
        train_spec = dataclasses.replace(train_spec, text_features=[])  # a recipe, not read
        if val_spec is not None:
            val_spec = dataclasses.replace(val_spec, text_features=[])
    elif "text_ids" in needs:
        tokenizer, vocab_path = _tokenizer(job.vocab or init_vocab, texts)
    transform = getattr(tops, "transform", None)
    data = build_dataset(train_spec, task, None, needs, tokenizer, max_length, transform=transform)
    # the answers are counted over the examples that train (after --skip-missing)
    data.vocab = vocab = _answer_vocab(job, task, data.records)
    val = None
    if val_spec is not None:
        val = build_dataset(
            val_spec, task, vocab, needs, tokenizer, max_length, transform=transform
        )
        check_tune_layers(_tune_record(job, tops), val.images, val.texts, "--val-")
    vocab_size = len(tokenizer) if tokenizer is not None else BERT_VOCAB_SIZE
    fusion_config = _fusion_config(
        job, fusion_dims(job.fusion, images, texts, vocab_size), init_model
    )
    cfg = job.optim
    torch.manual_seed(cfg.seed)  # the initial weights are part of the run's recipe
    model = TaskModel(
        job.fusion, fusion_config, len(vocab), task.images_per_example, choices=task.choices
    )
    _initialise(model, job, task, vocab)
    if tops is not None:
        model.set_tops(tops)
    meta = {
        "task": task.name,
        "fusion": job.fusion,
        "fusion_config": dataclasses.asdict(fusion_config),
        "answers": vocab.answers,
        "tokenizer": _tokenizer_meta(vocab_path, tokenizer, max_length),
        "caches": {
            "image": data.images.provenance,
            "text": texts.provenance if texts else None,  # a live BERT's recipe too
        },
        "image_kind": data.images.kind,
        "evaluation": dataclasses.asdict(task.evaluation),
        "init": job.init,
        "tune": _tune_record(job, tops),
        "finetune": live.record() if live else None,
        "config": to_dict(job, saved_only=True),
        "data": _data_identity(data.records),
    }
    if job.resume:
        _check_resumable(job.out, meta, cfg, job.accept_changes)
    if from_env().main:  # rank 0 alone writes the run folder (the others wait in the trainer)
        if replace:
            ckpt.clear_run(job.out)
        job.out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(job.out / CONFIG_FILE, to_toml(job))
        if vocab_path is not None:  # the run carries its tokenizer: evaluation needs no path
            write_bytes_atomic(job.out / VOCAB_FILE, Path(vocab_path).read_bytes())
    return train(
        model, task, data, cfg, job.out, meta, val=val, resume=job.resume, progress=job.progress
    )


def _finetune(job: TrainJob, images: CacheSet, texts: CacheSet | None):
    """--finetune full: the encoders that made the caches, rebuilt to train end to end
    (pipelines/finetune.py Finetune); None without it."""
    if job.finetune is None:
        return None
    if job.tune_top:
        raise ConfigError("--tune-top and --finetune full: one or the other")
    from vlpipe.pipelines.finetune import build_finetune

    sides = {"vision": job.vision_weights, "text": job.text_weights}
    live = build_finetune(sides, images, texts, reads_text=job.fusion not in _TOKENIZING)
    if job.grad_checkpointing:
        live.encoders.gradient_checkpointing()
    return live


def _encoder_tops(job: TrainJob, images: CacheSet, texts: CacheSet | None):
    """The encoder tops --tune-top K trains (CachedEncoders), None without it: one per cache
    that holds a middle layer (the `encoder_block` fact), rebuilt from the weights that made
    it. Weights given for a cache without one, or --tune-top with none, are errors."""
    given = {"--vision-weights": job.vision_weights, "--text-weights": job.text_weights}
    if not job.tune_top:
        wrong = [flag for flag, value in given.items() if value is not None]
        if wrong:
            raise ConfigError(f"{', '.join(wrong)}: only with --tune-top K or --finetune full")
        return None
    from vlpipe.fusion.data import grid_of
    from vlpipe.fusion.encoder_top import CachedEncoders, build_top

    reads_text = job.fusion not in _TOKENIZING  # lxmert / lstm tokenize: no text cache read
    sides = {"--vision-weights": images, "--text-weights": texts if reads_text else None}
    tops = {}
    for flag, caches in sides.items():
        middle = caches is not None and "encoder_block" in caches.facts
        if middle and given[flag] is None:
            raise ConfigError(
                f"--tune-top: {caches.names} holds the tokens after block "
                f"{caches.facts['encoder_block'][0]} of {caches.facts['encoder_block'][1]}: pass "
                f"{flag}, the weights it was made from ('random' for random-init)"
            )
        if given[flag] is not None and not middle:
            if caches is not None:
                what = f"{caches.names} holds no middle layer (extract --layer N)"
            elif reads_text:
                what = "no --text-features cache given"
            else:
                what = f"--fusion {job.fusion} reads no text cache (it tokenizes the text)"
            raise ConfigError(f"{flag}: {what}")
        if middle:
            top = build_top(
                caches.provenance,
                given[flag],
                job.tune_top,
                facts=caches.facts,
                cache=caches.names,
                flag=flag,
            )
            tops[flag] = top
    if not tops:
        raise ConfigError(
            f"--tune-top {job.tune_top}: no cache holds a middle layer; extract the encoder "
            "with --layer N (the tokens after block N) to train the blocks above it"
        )
    grid = grid_of(images) if "--vision-weights" in tops else None
    return CachedEncoders(tops.get("--vision-weights"), tops.get("--text-weights"), grid)


def _tune_record(job: TrainJob, tops) -> dict[str, Any] | None:
    """run.json's record of the tops: k, each side's [N, L] block and the patch grid."""
    if tops is None or not job.tune_top:
        return None
    return {
        "k": job.tune_top,
        "vision": [tops.vision.first, tops.vision.total] if tops.vision else None,
        "text": [tops.text.first, tops.text.total] if tops.text else None,
        "grid": list(tops.grid) if tops.grid else None,
    }


def _tokenizer_meta(vocab_path: str | None, tokenizer, max_length: int) -> dict[str, Any]:
    """How the run tokenizes: its own copy of the vocab (RUN/vocab.txt), that file's sha256 and
    the lower-casing, so the run neither depends on nor records a path of the machine it was
    trained on."""
    if vocab_path is None:
        return {"vocab": None, "max_length": max_length}
    from vlpipe.provenance import sha256_file

    return {
        "vocab": VOCAB_FILE,
        "vocab_sha256": sha256_file(vocab_path),
        "lowercase": bool(getattr(tokenizer, "do_lower_case", True)),
        "max_length": max_length,
    }


def _init_defaults(job: TrainJob) -> tuple[dict, str | None]:
    if job.init is None or job.fusion != "lxmert":
        return {}, None
    from vlpipe.pipelines.lxmert_import import init_defaults

    return init_defaults(job.init)


def _fusion_config(job: TrainJob, widths: dict[str, int], init: dict | None = None):
    return fusion_config(job.fusion, widths, job.model, init)


def fusion_config(fusion: str, widths: dict[str, int], fields: dict, init: dict | None = None):
    """The fusion's config: `init` (an --init pre-training run's), the widths the caches give,
    then the --model-config `fields`, each value checked against the fusion's config class;
    a field that contradicts a cache's width is an error."""
    for key, width in widths.items():
        if key in fields and fields[key] != width:
            raise ConfigError(
                f"--model-config {key}={fields[key]}: the caches give {width}; the fusion "
                "takes its input widths from them"
            )
    where = f"--model-config ({fusion})"
    return make_fusion_config(fusion, init or {}, widths, fields, where=where)


# TrainConfig fields a resumed run may change: where and how fast it runs, when it stops, and
# when it validates (validation draws no random numbers: the weights take the same steps).
# Everything else of the run (model, answers, data, features, optimisation, grad_accum) is its
# identity.
RESUMABLE = ("max_steps", "ckpt_every", "log_every", "num_workers", "device")
RESUMABLE += ("val_every", "early_stop", "early_stop_delta")


def _data_identity(records) -> dict:
    """The training examples in order: the data order of every epoch is a permutation of them."""
    digest = hashlib.sha256("\n".join(r.key for r in records).encode()).hexdigest()
    return {"examples": len(records), "keys_sha256": digest}


def run_identity(meta: dict, train_config: dict) -> dict:
    """What a resumed run must share with the run it continues, as flat "a.b" -> value."""
    caches = meta.get("caches") or {}
    identity = {
        "task": meta.get("task"),
        "fusion": meta.get("fusion"),
        "fusion_config": meta.get("fusion_config"),
        "answers": meta.get("answers"),
        "tokenizer": _tokenizer_identity(meta.get("tokenizer")),
        "image features": encoder_identity(caches.get("image")),
        "text features": encoder_identity(caches.get("text")),
        "training data": meta.get("data"),
        "tune": meta.get("tune"),
        "finetune": meta.get("finetune"),
        "train": {k: v for k, v in train_config.items() if k not in RESUMABLE},
    }
    return _flatten(json.loads(json.dumps(identity, default=str)))


def _tokenizer_identity(tokenizer: dict | None) -> dict | None:
    """How a run tokenizes, without the path its vocab was read from (runs record the vocab's
    sha256; earlier runs recorded a path, which is not compared)."""
    if tokenizer is None:
        return None
    return {
        k: tokenizer.get(k) for k in ("vocab_sha256", "lowercase", "max_length") if k in tokenizer
    }


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _check_resumable(run_dir: Path, meta: dict, cfg: TrainConfig, accept: bool) -> None:
    """Refuse to continue a run with other settings or features (its loss trajectory would no
    longer be the original run's), unless `accept`; a feature-size change is refused always."""
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise ckpt.RunError(f"{run_dir}: nothing to resume (no checkpoint)")
    saved = ckpt.load_meta(latest)
    # a field added to TrainConfig after the run was written had its default then
    was = run_identity(saved, {**dataclasses.asdict(TrainConfig()), **saved.get("train", {})})
    now = run_identity(meta, dataclasses.asdict(cfg))
    # what the saved run does not record (it predates that part of the identity) is not compared
    changed = {k: (was[k], now.get(k)) for k in sorted(was) if was[k] != now.get(k)}
    for key in ("tune", "finetune"):  # frozen then, encoders trained now
        if key not in was or was[key] is not None:
            continue
        section = {n[len(key) + 1 :]: v for n, v in now.items() if n.startswith(f"{key}.")}
        if section:
            changed[key] = (None, section)
    if not changed:
        return
    listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:8])
    more = f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""
    shapes = _shape_changes(saved, meta)
    if shapes:
        raise ckpt.RunError(
            f"{latest}: cannot resume: the model's parameters change shape ({shapes}); the run "
            f"differs: {listing}{more}"
        )
    if not accept:
        hint = "; pass --accept-changes to continue anyway"
        raise ckpt.RunError(f"{latest}: cannot resume, the run differs: {listing}{more}{hint}")
    print(f"WARNING: resuming {run_dir} with changes: {listing}{more}", file=sys.stderr)


def _shape_changes(saved: dict, meta: dict) -> str:
    """The parameters whose shapes differ between the saved run's model and this one (built
    on the meta device: no memory, no time); '' when the weights still fit."""
    import torch

    from vlpipe.pipelines.data import model_from_meta

    def shapes(m: dict) -> dict[str, tuple]:
        with torch.device("meta"):
            model = model_from_meta(m)
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    a, b = shapes(saved), shapes(meta)
    differ = [k for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
    return ", ".join(sorted(differ)[:3]) + (
        f" (+{len(differ) - 3} more)" if len(differ) > 3 else ""
    )


def _answer_vocab(job: TrainJob, task: Task, records) -> AnswerVocab:
    """--answers as given, else the vocabulary counted from the training records."""
    if job.answers is None:
        return build_vocab(task, records, job.min_answer_count or task.min_count)
    from vlpipe.fusion.answer_tables import read_answer_list

    answers = read_answer_list(job.answers).answers
    if task.fixed_answers is not None and answers != list(task.fixed_answers):
        raise InputError(f"{job.answers}: task {task.name} answers {list(task.fixed_answers)}")
    return AnswerVocab(answers)


def _initialise(model: TaskModel, job: TrainJob, task: Task, vocab: AnswerVocab) -> None:
    if job.init:
        from vlpipe.pipelines.lxmert_import import initialise_from

        lines = initialise_from(
            model,
            job.init,
            task,
            vocab.answers,
            answer_table=job.answer_table,
            answers_file=job.answers,
            partial=job.partial_init,
        )
        print("\n".join(lines))
    if job.init_bert:
        from vlpipe.fusion.lxmert import load_bert_language

        print(load_bert_language(model.fusion, job.init_bert))
