"""`vlpipe train / evaluate / predict`: caches + annotations -> datasets -> TaskModel -> loop."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from vlpipe.distributed import resolve_device
from vlpipe.fusion import checkpoint as ckpt
from vlpipe.fusion.answers import AnswerVocab
from vlpipe.fusion.data import CacheSet, DataMismatch, TaskDataset, build_vocab
from vlpipe.fusion.model import TaskModel, fusion_inputs, fusion_needs, make_fusion_config
from vlpipe.fusion.tasks import EvalOptions, Task, get_task
from vlpipe.fusion.train import TrainConfig, evaluate, predict, train
from vlpipe.provenance import encoder_identity

if TYPE_CHECKING:
    from vlpipe.pipelines.lxmert_import import ImportOptions

# The papers' fine-tuning settings. LXMERT (run/{vqa,gqa,nlvr2}_finetune.bash): BertAdam
# (`--optim bert`: warmup_linear over 10% of the steps, weight decay 0.01 on all parameters),
# lr 5e-5 (GQA 1e-5), batch 32, 4 epochs, gradient norm clipped at 5. easy-VQA is not an LXMERT
# recipe: AdamW (its figures in docs/easy_vqa.md were measured so).
# Transformer-exclusive concat paper: lr 1e-4, linear decay with warm-up, 25 epochs.
_LXMERT = {"batch_size": 32, "epochs": 4, "grad_clip": 5.0, "optimizer": "bertadam"}
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("lxmert", "vqa"): {**_LXMERT, "lr": 5e-5},
    ("lxmert", "gqa"): {**_LXMERT, "lr": 1e-5},
    ("lxmert", "nlvr2"): {**_LXMERT, "lr": 5e-5},
    ("lxmert", "easy-vqa"): {
        "lr": 1e-4,
        "batch_size": 64,
        "epochs": 4,
        "grad_clip": 5.0,
        "optimizer": "adamw",
    },
    ("concat", "*"): {"lr": 1e-4, "batch_size": 32, "epochs": 25, "weight_decay": 0.0},
    ("lstm", "*"): {"lr": 1e-3, "batch_size": 32, "epochs": 25, "weight_decay": 0.0},
    ("cross", "*"): {"lr": 1e-4, "batch_size": 32, "epochs": 4, "grad_clip": 5.0},
}


def preset(fusion: str, task: str) -> dict[str, Any]:
    return dict(PRESETS.get((fusion, task)) or PRESETS.get((fusion, "*"), {}))


@dataclass
class DataSpec:
    """Where the examples of one split come from."""

    task: str
    features: list[Path]
    text_features: list[Path] = field(default_factory=list)
    annotations: list[Path] = field(default_factory=list)
    annotations_format: str | None = None
    split: str | None = None
    limit: int | None = None
    vqa_eval: str = EvalOptions.vqa_revision
    choices: Path | None = None  # GQA eval.py choices file (validity, plausibility)
    skip_missing: bool = False  # leave out examples whose features are not in the caches

    @property
    def format(self) -> str:
        return self.annotations_format or get_task(self.task).default_format

    def records(self):
        from vlpipe.data_manifests.registry import read_texts

        return read_texts(self.format, self.annotations, self.split, self.limit)

    def evaluation(self) -> EvalOptions:
        """How this data's predictions are scored: LXMERT json by its labels, official files
        by the official evaluator (with the chosen vqaEval.py revision)."""
        return EvalOptions(self.vqa_eval, self.format == "lxmert", self.choices)


def _tokenizer(vocab: str | None, texts: CacheSet | None):
    from vlpipe.tokenizer import bert_tokenizer

    if vocab is None and texts is not None:
        vocab = texts.provenance.get("preprocessing", {}).get("vocab")
    if vocab is None:
        from vlpipe.tokenizer import default_vocab

        vocab = default_vocab()
    if vocab is None:
        raise ValueError("this fusion tokenizes the texts: pass --vocab PATH/vocab.txt")
    return bert_tokenizer(vocab), str(vocab)


def build_dataset(
    spec: DataSpec, task: Task, vocab, needs, tokenizer, max_length: int, records=None
) -> TaskDataset:
    images = CacheSet(spec.features)
    texts = CacheSet(spec.text_features) if spec.text_features else None
    data = TaskDataset(
        task,
        records if records is not None else spec.records(),
        images,
        texts,
        vocab,
        needs,
        tokenizer,
        max_length,
        skip_missing=spec.skip_missing,
    )
    if data.skipped:
        print(skip_report(data.skipped, len(data) + len(data.skipped)), file=sys.stderr)
    return data


def skip_report(skipped: dict[str, str], total: int, examples: int = 3) -> str:
    """One line per reason: how many examples --skip-missing left out, and why."""
    by_reason: dict[str, list[str]] = {}
    for key, reason in skipped.items():
        by_reason.setdefault(reason, []).append(key)
    lines = [
        f"--skip-missing: left out {len(skipped)} of {total} examples whose features are missing:"
    ]
    for reason, keys in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        lines.append(f"  {len(keys)} x {reason} (e.g. {', '.join(keys[:examples])})")
    return "\n".join(lines)


def cache_widths(images: CacheSet, texts: CacheSet | None, vocab_size: int | None) -> dict:
    """The feature widths a fusion's config can be set from (see FusionSpec.inputs)."""
    fields = images.fields
    feat = fields.get("image_feats", fields.get("image_cls"))[0][-1]
    cls = fields.get("image_cls", fields.get("image_feats"))[0][-1]
    text = texts.fields.get("text_cls", texts.fields.get("text_feats"))[0][-1] if texts else None
    return {"image_feats": feat, "image_cls": cls, "text": text, "vocab": vocab_size}


def fusion_dims(fusion: str, images: CacheSet, texts: CacheSet | None, vocab_size: int) -> dict:
    """Config values a fusion model takes from the caches it trains on."""
    return fusion_inputs(fusion, cache_widths(images, texts, vocab_size))


@dataclass
class TrainRequest:
    fusion: str
    train: DataSpec
    out: Path
    val: DataSpec | None = None
    model_config: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    vocab: str | None = None
    max_length: int = 20
    min_answer_count: int | None = None
    init: str | None = None
    init_bert: str | None = None
    resume: bool = False
    progress: bool = True
    overwrite: bool = False
    accept_changes: bool = False  # resume although the run's identity changed
    answers: str | None = None  # fixes the answer vocabulary, e.g. LXMERT's trainval_label2ans
    answer_table: str | None = None  # what names the rows of --init's answer head (all_ans.json)
    partial_init: bool = False  # --init of another architecture loads what fits


def _check_run_dir(req: TrainRequest) -> None:
    """Never train over an earlier run by accident; --overwrite removes only what vlpipe wrote."""
    if req.out.exists() and not req.out.is_dir():
        raise ckpt.RunError(f"--out {req.out} is a file, not a run folder")
    if req.resume or not (req.out / ckpt.LATEST).exists():
        return
    if not req.overwrite:
        raise ckpt.RunError(
            f"{req.out} already holds a run: pass --resume to continue it or "
            "--overwrite to start again"
        )
    ckpt.clear_run(req.out)


def run_train(req: TrainRequest) -> dict[str, Any]:
    _check_run_dir(req)
    task = get_task(req.train.task, (req.val or req.train).evaluation())
    needs = fusion_needs(req.fusion)
    train_recs = req.train.records()
    val_recs = req.val.records() if req.val else None
    vocab = _answer_vocab(req, task, train_recs)
    texts = CacheSet(req.train.text_features) if req.train.text_features else None
    tokenizer, vocab_path = (None, None)
    if "text_ids" in needs:
        tokenizer, vocab_path = _tokenizer(req.vocab, texts)
    data = build_dataset(req.train, task, vocab, needs, tokenizer, req.max_length, train_recs)
    val = (
        build_dataset(req.val, task, vocab, needs, tokenizer, req.max_length, val_recs)
        if req.val
        else None
    )
    vocab_size = len(tokenizer) if tokenizer is not None else 30522
    config_values = {
        **fusion_dims(req.fusion, data.images, data.texts, vocab_size),
        **req.model_config,
    }
    fusion_config = make_fusion_config(req.fusion, config_values)
    cfg = TrainConfig(**{**preset(req.fusion, task.name), **req.train_overrides})
    torch.manual_seed(cfg.seed)  # the initial weights are part of the run's recipe
    model = TaskModel(req.fusion, fusion_config, len(vocab), task.images_per_example)
    _initialise(model, req, task, vocab)
    meta = {
        "task": task.name,
        "fusion": req.fusion,
        "fusion_config": dataclasses.asdict(fusion_config),
        "answers": vocab.answers,
        "tokenizer": {"vocab": vocab_path, "max_length": req.max_length},
        "caches": {
            "image": data.images.provenance,
            "text": data.texts.provenance if data.texts else None,
        },
        "image_kind": data.images.kind,
        "evaluation": dataclasses.asdict(task.evaluation),
        "init": req.init,
    }
    meta["data"] = _data_identity(data.records)
    if req.resume:
        _check_resumable(req.out, meta, cfg, req.accept_changes)
    req.out.mkdir(parents=True, exist_ok=True)
    return train(
        model, task, data, cfg, req.out, meta, val=val, resume=req.resume, progress=req.progress
    )


# TrainConfig fields a resumed run may change: where and how fast it runs, and when it stops.
# Everything else of the run (model, answers, data, features, optimisation) is its identity.
RESUMABLE = ("max_steps", "ckpt_every", "log_every", "num_workers", "device")


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
        "tokenizer": meta.get("tokenizer"),
        "image features": encoder_identity(caches.get("image")),
        "text features": encoder_identity(caches.get("text")),
        "training data": meta.get("data"),
        "train": {k: v for k, v in train_config.items() if k not in RESUMABLE},
    }
    return _flatten(json.loads(json.dumps(identity, default=str)))


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
    changed = {k: (was.get(k), now.get(k)) for k in sorted(was.keys() | now.keys())}
    changed = {k: v for k, v in changed.items() if v[0] != v[1]}
    if not changed:
        return
    listing = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(changed.items())[:8])
    more = f" (+{len(changed) - 8} more)" if len(changed) > 8 else ""
    sizes = [k for k in changed if k.startswith("fusion_config.")]
    if sizes or not accept:
        hint = "" if sizes else "; pass --accept-changes to continue anyway"
        raise ckpt.RunError(f"{latest}: cannot resume, the run differs: {listing}{more}{hint}")
    print(f"WARNING: resuming {run_dir} with changes: {listing}{more}", file=sys.stderr)


def _answer_vocab(req: TrainRequest, task: Task, records) -> AnswerVocab:
    """--answers as given, else the vocabulary counted from the training records."""
    if req.answers is None:
        return build_vocab(task, records, req.min_answer_count or task.min_count)
    from vlpipe.fusion.answer_tables import read_answer_list

    answers = read_answer_list(req.answers).answers
    if task.fixed_answers is not None and answers != list(task.fixed_answers):
        raise ValueError(f"{req.answers}: task {task.name} answers {list(task.fixed_answers)}")
    return AnswerVocab(answers)


def _initialise(model: TaskModel, req: TrainRequest, task: Task, vocab: AnswerVocab) -> None:
    if req.init:
        if req.fusion != "lxmert":
            raise ValueError(f"--init loads LXMERT checkpoints; the fusion is {req.fusion!r}")
        from vlpipe.pipelines.lxmert_import import initialise_from

        lines = initialise_from(
            model,
            req.init,
            task,
            vocab.answers,
            answer_table=req.answer_table,
            answers_file=req.answers,
            partial=req.partial_init,
        )
        print("\n".join(lines))
    if req.init_bert:
        from vlpipe.fusion.lxmert import load_bert_language

        print(load_bert_language(model.fusion, req.init_bert))


def load_run(run_dir: Path) -> tuple[TaskModel, dict[str, Any], Task]:
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise ckpt.RunError(
            f"{run_dir}: no checkpoint: neither a `vlpipe train --out` folder nor an LXMERT "
            "checkpoint (BEST.pth / LAST.pth, a Hugging Face LxmertForQuestionAnswering folder)"
        )
    meta = ckpt.load_meta(latest)
    task = get_task(meta["task"])
    config = make_fusion_config(meta["fusion"], meta["fusion_config"])
    model = TaskModel(meta["fusion"], config, len(meta["answers"]), task.images_per_example)
    ckpt.load_weights(latest, model)
    return model, meta, task


def load_model(
    path: Path, lxmert: ImportOptions | None = None
) -> tuple[TaskModel, dict[str, Any], Task]:
    """A `vlpipe train` run folder, or an LXMERT checkpoint from elsewhere (BEST.pth / LAST.pth
    of airsplay/lxmert, a Hugging Face LxmertForQuestionAnswering folder)."""
    from vlpipe.pipelines.lxmert_import import ImportOptions, import_task_model, is_foreign

    lxmert = lxmert or ImportOptions()
    if (Path(path) / ckpt.LATEST).exists() or not is_foreign(path):
        model, meta, task = load_run(path)
        if lxmert.task is not None and lxmert.task != task.name:
            raise ValueError(f"{path}: a {task.name} run, not {lxmert.task}")
        return model, meta, task
    return import_task_model(path, lxmert)


def run_dataset(
    run_dir: Path, spec: DataSpec, lxmert: ImportOptions | None = None
) -> tuple[TaskModel, Task, TaskDataset, dict]:
    model, meta, task = load_model(run_dir, lxmert)
    spec.task = meta["task"]
    task = dataclasses.replace(task, evaluation=spec.evaluation())
    tokenizer = None
    if "text_ids" in model.needs:
        from vlpipe.tokenizer import bert_tokenizer

        tokenizer = bert_tokenizer(meta["tokenizer"]["vocab"])
    data = build_dataset(
        spec,
        task,
        AnswerVocab(meta["answers"]),
        model.needs,
        tokenizer,
        meta["tokenizer"]["max_length"],
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
        if key != "vocab_size" and None not in (trained, value) and value != trained:
            caches = data.images.names if key != "text_dim" else data.texts.names
            raise DataMismatch(
                f"{caches}: features of size {value} for {key}, the model in the run was "
                f"trained on {trained}"
            )
    if meta.get("caches") is None:
        return []
    warnings = []
    for kind, caches in (("image", data.images), ("text", data.texts)):
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


def run_evaluate(
    run_dir: Path,
    spec: DataSpec,
    batch_size: int = 256,
    device: str = "auto",
    lxmert: ImportOptions | None = None,
):
    """(metrics, predictions); the metrics carry "warnings" when the caches' encoder differs
    from the one the run was trained on."""
    model, task, data, meta = run_dataset(run_dir, spec, lxmert)
    results, preds = evaluate(model, task, data, batch_size, resolve_device(device))
    if meta["warnings"]:
        results = dict(results, warnings=meta["warnings"])
    return results, preds


def run_predict(
    run_dir: Path,
    spec: DataSpec,
    out: Path | None,
    batch_size: int = 256,
    device: str = "auto",
    lxmert: ImportOptions | None = None,
) -> Path:
    model, task, data, meta = run_dataset(run_dir, spec, lxmert)
    for warning in meta["warnings"]:
        print(f"WARNING: {warning}", file=sys.stderr)
    preds = predict(model, task, data, batch_size, resolve_device(device))
    folder = run_dir if run_dir.is_dir() else run_dir.parent  # beside a BEST.pth
    return task.write_predictions(out or folder / task.submission_name, preds)
