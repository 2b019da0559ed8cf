"""What the stage-two jobs share: the examples of a split (DataSpec) read into a TaskDataset
over its caches, and the feature widths a fusion's config takes from them."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from vlpipe.errors import ConfigError
from vlpipe.fusion.data import CacheSet, DataMismatch, TaskDataset
from vlpipe.fusion.model import TaskModel, fusion_inputs, make_fusion_config
from vlpipe.fusion.tasks import EvalOptions, Task, get_task
from vlpipe.pipelines.configs import AnnotationConfig, EvalConfig


@dataclass
class DataSpec:
    """Where the examples of one split come from, for one task (a DataConfig section with the
    task and scoring options it is read and evaluated with)."""

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
    role: str = "train"  # or "val", "eval": what errors call its flags

    @classmethod
    def of(cls, task: str, data: AnnotationConfig, scoring: EvalConfig | None = None) -> DataSpec:
        """From a config section (an AnnotationConfig has no caches: `vlpipe score`)."""
        scoring = scoring or EvalConfig()
        return cls(
            task,
            list(getattr(data, "features", [])),
            list(getattr(data, "text_features", [])),
            list(data.annotations),
            data.annotations_format,
            data.split,
            data.limit,
            scoring.vqa_eval,
            scoring.gqa_choices,
            getattr(data, "skip_missing", False),
        )

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
    """The WordPiece tokenizer of a fusion that tokenizes: --vocab, else the one the text cache
    declares (when its file is still there with the declared sha256), else the packaged one."""
    from vlpipe.provenance import sha256_file
    from vlpipe.tokenizer import bert_tokenizer, default_vocab, find_vocab

    if vocab is None and texts is not None:
        vocab = texts.provenance.get("preprocessing", {}).get("vocab")
        declared = texts.facts.get("vocab_sha256")
        if vocab is not None and declared is not None:
            path = Path(vocab) / "vocab.txt" if Path(vocab).is_dir() else Path(vocab)
            if not path.is_file() or sha256_file(path) != declared:
                raise ConfigError(
                    f"{texts.names} was tokenized with a vocab (sha256 {declared[:12]}...) that "
                    f"is not at {path} on this machine: pass --vocab PATH/vocab.txt"
                )
    if vocab is None:
        vocab = default_vocab()
        if vocab is not None:
            print(f"note: tokenizing with the packaged uncased BERT vocab {vocab}", file=sys.stderr)
    if vocab is None:
        raise ConfigError("this fusion tokenizes the texts: pass --vocab PATH/vocab.txt")
    return bert_tokenizer(vocab), str(find_vocab(vocab))


def build_dataset(
    spec: DataSpec,
    task: Task,
    vocab,
    needs,
    tokenizer,
    max_length: int,
    records=None,
    transform=None,
) -> TaskDataset:
    """The examples of `spec` over its caches; a model that reads `pixels` (an image encoder
    trained end to end) gets the images of the caches' listings, decoded for `transform`."""
    images = CacheSet(spec.features)
    if "pixels" in needs:
        from vlpipe.fusion.image_files import ImageFiles

        images = ImageFiles(images, transform)
    texts = CacheSet(spec.text_features) if spec.text_features else None
    prefix = "--val-" if spec.role == "val" else "--"
    _check_modality(images, "image", f"{prefix}features")
    _check_modality(texts, "text", f"{prefix}text-features")
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


def _check_modality(caches: CacheSet | None, expected: str, flag: str) -> None:
    if caches is not None and caches.modality != expected:
        raise DataMismatch(
            f"{flag} takes {expected} caches; {caches.names} is a {caches.kind!r} cache "
            f"({caches.modality} features)"
        )


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
    """The feature widths a fusion's config can be set from (see FusionSpec.inputs); images
    decoded from files (ImageFiles) have those of the caches that list them."""
    images = getattr(images, "recipe", images)
    fields = images.fields
    feat = fields.get("image_feats", fields.get("image_cls"))[0][-1]
    cls = fields.get("image_cls", fields.get("image_feats"))[0][-1]
    text = texts.fields.get("text_cls", texts.fields.get("text_feats"))[0][-1] if texts else None
    return {"image_feats": feat, "image_cls": cls, "text": text, "vocab": vocab_size}


def fusion_dims(fusion: str, images: CacheSet, texts: CacheSet | None, vocab_size: int) -> dict:
    """Config values a fusion model takes from the caches it trains on."""
    return fusion_inputs(fusion, cache_widths(images, texts, vocab_size))


def check_tune_layers(
    tune: dict | None, images: CacheSet, texts: CacheSet | None, prefix: str = "--"
) -> None:
    """A --tune-top run's encoder tops continue from the layer they were trained on: caches of
    another layer (the last one included) would go through them without a word, so they are
    an error, not one of the warnings about another encoder."""
    for side, caches, flag in (("vision", images, "features"), ("text", texts, "text-features")):
        block = (tune or {}).get(side)
        given = caches.facts.get("encoder_block") if caches is not None else None
        if block and list(given or []) != list(block):
            what = f"the tokens after block {given[0]}" if given else "the last layer's output"
            raise DataMismatch(
                f"{prefix}{flag} {caches.names if caches is not None else '(none)'}: holds {what}, "
                f"but the run's {side} top continues from block {block[0]} of {block[1]}: "
                f"give caches extracted with --layer {block[0]}"
            )


def model_from_meta(meta: dict) -> TaskModel:
    """The (untrained) TaskModel a run.json describes: fusion, head and, for a --tune-top run,
    the encoder tops, rebuilt from the caches' provenance with their architecture only (the
    checkpoint holds their weights)."""
    task = get_task(meta["task"])
    config = make_fusion_config(meta["fusion"], meta["fusion_config"])
    model = TaskModel(
        meta["fusion"], config, len(meta["answers"]), task.images_per_example, choices=task.choices
    )
    if meta.get("finetune"):
        from vlpipe.pipelines.finetune import live_architecture

        model.set_tops(live_architecture(meta))
    tune = meta.get("tune")
    if tune:
        from vlpipe.fusion.encoder_top import CachedEncoders, rebuild_architecture

        caches = meta.get("caches") or {}
        parts = {
            side: rebuild_architecture(caches[source], tune[side], tune["k"])
            for side, source in (("vision", "image"), ("text", "text"))
            if tune.get(side)
        }
        grid = tuple(tune["grid"]) if tune.get("grid") else None
        model.set_tops(CachedEncoders(parts.get("vision"), parts.get("text"), grid))
    return model
