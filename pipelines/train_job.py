"""`vlpipe train / evaluate / predict`: caches + annotations -> datasets -> TaskModel -> loop."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlpipe.distributed import resolve_device
from vlpipe.fusion import checkpoint as ckpt
from vlpipe.fusion.data import CacheSet, TaskDataset, build_vocab
from vlpipe.fusion.model import TaskModel, fusion_needs, make_fusion_config
from vlpipe.fusion.tasks import EvalOptions, Task, get_task
from vlpipe.fusion.train import TrainConfig, evaluate, predict, train

# The papers' fine-tuning settings. LXMERT: lr 5e-5 (GQA 1e-5), batch 32, 4 epochs, clip 5.
# Transformer-exclusive concat paper: lr 1e-4, linear decay with warm-up, 25 epochs.
PRESETS: dict[tuple[str, str], dict[str, Any]] = {
    ("lxmert", "vqa"): {"lr": 5e-5, "batch_size": 32, "epochs": 4, "grad_clip": 5.0},
    ("lxmert", "gqa"): {"lr": 1e-5, "batch_size": 32, "epochs": 4, "grad_clip": 5.0},
    ("lxmert", "nlvr2"): {"lr": 5e-5, "batch_size": 32, "epochs": 4, "grad_clip": 5.0},
    ("lxmert", "easy-vqa"): {"lr": 1e-4, "batch_size": 64, "epochs": 4, "grad_clip": 5.0},
    ("concat", "*"): {"lr": 1e-4, "batch_size": 32, "epochs": 25, "weight_decay": 0.0},
    ("lstm", "*"): {"lr": 1e-3, "batch_size": 32, "epochs": 25, "weight_decay": 0.0},
    ("cross", "*"): {"lr": 1e-4, "batch_size": 32, "epochs": 4, "grad_clip": 5.0},
}
DEFAULT_FORMAT = {"vqa": "vqa", "gqa": "gqa", "nlvr2": "nlvr2", "easy-vqa": "easy-vqa"}


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

    @property
    def format(self) -> str:
        return self.annotations_format or DEFAULT_FORMAT[self.task]

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
    return TaskDataset(
        task,
        records if records is not None else spec.records(),
        images,
        texts,
        vocab,
        needs,
        tokenizer,
        max_length,
    )


def fusion_dims(fusion: str, images: CacheSet, texts: CacheSet | None, vocab_size: int) -> dict:
    """Config values a fusion model takes from the caches it trains on."""
    feat = images.fields.get("image_feats", images.fields.get("image_cls"))[0][-1]
    cls = images.fields.get("image_cls", images.fields.get("image_feats"))[0][-1]
    text = texts.fields.get("text_cls", texts.fields.get("text_feats"))[0][-1] if texts else None
    return {
        "concat": {"image_dim": cls, "text_dim": text},
        "lstm": {"image_dim": cls, "vocab_size": vocab_size},
        "lxmert": {"visual_feat_dim": feat, "vocab_size": vocab_size},
        "cross": {"visual_feat_dim": feat, "text_dim": text},
    }[fusion]


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


def _check_run_dir(req: TrainRequest) -> None:
    """Never train over an earlier run by accident."""
    if req.resume or not (req.out / ckpt.LATEST).exists():
        return
    if not req.overwrite:
        raise ckpt.RunError(
            f"{req.out} already holds a run: pass --resume to continue it or "
            "--overwrite to start again"
        )
    import shutil

    shutil.rmtree(req.out)


def run_train(req: TrainRequest) -> dict[str, Any]:
    _check_run_dir(req)
    task = get_task(req.train.task, (req.val or req.train).evaluation())
    needs = fusion_needs(req.fusion)
    train_recs = req.train.records()
    val_recs = req.val.records() if req.val else None
    vocab = build_vocab(task, train_recs, req.min_answer_count or task.min_count)
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
    _initialise(model, req)
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
    }
    req.out.mkdir(parents=True, exist_ok=True)
    return train(
        model, task, data, cfg, req.out, meta, val=val, resume=req.resume, progress=req.progress
    )


def _initialise(model: TaskModel, req: TrainRequest) -> None:
    if req.init:
        from vlpipe.fusion.lxmert import load_lxmert_weights

        print(load_lxmert_weights(model.fusion, req.init))
    if req.init_bert:
        from vlpipe.fusion.lxmert import load_bert_language

        print(load_bert_language(model.fusion, req.init_bert))


def load_run(run_dir: Path) -> tuple[TaskModel, dict[str, Any], Task]:
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise ckpt.RunError(f"{run_dir}: no checkpoint (is this a `vlpipe train --out` folder?)")
    meta = ckpt.load_meta(latest)
    task = get_task(meta["task"])
    config = make_fusion_config(meta["fusion"], meta["fusion_config"])
    model = TaskModel(meta["fusion"], config, len(meta["answers"]), task.images_per_example)
    ckpt.load_weights(latest, model)
    return model, meta, task


def run_dataset(run_dir: Path, spec: DataSpec) -> tuple[TaskModel, Task, TaskDataset, dict]:
    from vlpipe.fusion.answers import AnswerVocab

    model, meta, task = load_run(run_dir)
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
    _check_same_features(meta, data)
    return model, task, data, meta


def _check_same_features(meta: dict, data: TaskDataset) -> None:
    """Evaluating on features from another encoder than training used is almost always a
    mistake: refuse it, naming both."""
    trained = meta["caches"]["image"]
    now = data.images.provenance
    for key in ("backbone", "weights_sha256", "preprocessing"):
        if json.dumps(trained.get(key), sort_keys=True) != json.dumps(now.get(key), sort_keys=True):
            raise ValueError(
                f"image features differ from training in {key!r}: trained on "
                f"{trained.get(key)}, given {now.get(key)}"
            )


def run_evaluate(run_dir: Path, spec: DataSpec, batch_size: int = 256, device: str = "auto"):
    model, task, data, _ = run_dataset(run_dir, spec)
    return evaluate(model, task, data, batch_size, resolve_device(device))


def run_predict(
    run_dir: Path, spec: DataSpec, out: Path | None, batch_size: int = 256, device: str = "auto"
) -> Path:
    model, task, data, _ = run_dataset(run_dir, spec)
    preds = predict(model, task, data, batch_size, resolve_device(device))
    return task.write_predictions(out or run_dir / task.submission_name, preds)
