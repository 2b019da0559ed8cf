"""`vlpipe train --finetune full`: the encoders that made a run's caches, rebuilt trainable from
the same weights (sha256 checked against the caches' provenance), read the images and texts
themselves and train end to end with the fusion and head.

The caches are the recipe: each records the resolved `vlpipe extract` config (backbone, arch,
image size, layer, pooling, ...), the transform, the weights' digest and the dataset listing
its images came from. The image encoder is rebuilt from that config exactly as extraction
built it (so, in eval mode, it gives the cached features on the same image), the text encoder
from its recorded BertConfig, tokenizing as extraction did (the cache's vocab and length).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from vlpipe.errors import ConfigError, WeightsError
from vlpipe.extract.base import Extractor, ImageTransform
from vlpipe.fusion.data import CacheSet
from vlpipe.fusion.encoder_full import LiveEncoders
from vlpipe.fusion.encoder_top import check_weights, rebuild_bert

FULL = "full"
VISION_BACKBONES = ("vit", "cnn", "resnet")  # frcnn: its regions are its own proposals'
FLAGS = {"vision": "--vision-weights", "text": "--text-weights"}


@dataclasses.dataclass
class Finetune:
    """What --finetune full trains and how the data feed it: the encoders, and the tokenizer
    (with its vocab file and length) of a live text side."""

    encoders: LiveEncoders
    tokenizer: Any = None
    vocab_path: str | None = None
    max_length: int | None = None

    def record(self) -> dict[str, Any]:
        """run.json's `finetune`: which sides train end to end, and the patch grid."""
        enc = self.encoders
        return {
            "mode": FULL,
            "vision": enc.vision is not None,
            "text": enc.text is not None,
            "grid": list(enc.grid) if enc.grid else None,
        }


def build_finetune(
    sides: dict[str, str | None], images: CacheSet, texts: CacheSet | None, reads_text: bool
) -> Finetune:
    """The live encoders of the sides whose weights are given ({"vision": ..., "text": ...}),
    rebuilt from the caches' records; `reads_text`: the fusion reads a text cache (lxmert and
    lstm tokenize for themselves: no text encoder to train)."""
    if sides["text"] is not None and not reads_text:
        raise ConfigError("--text-weights: this fusion tokenizes the text itself (no BERT)")
    if sides["text"] is not None and texts is None:
        raise ConfigError("--text-weights: --finetune full rebuilds BERT from --text-features")
    if sides["vision"] is None and sides["text"] is None:
        raise ConfigError(
            "--finetune full: pass --vision-weights and / or --text-weights, the weights the "
            "caches were made from ('random' for random-init), for the encoders to train"
        )
    vision = grid = None
    if sides["vision"] is not None:
        vision = rebuild_vision(images, sides["vision"])
        grid = image_grid(images)
    out = Finetune(LiveEncoders(vision, None, grid))
    if sides["text"] is not None:
        out.encoders.text = rebuild_text(texts, sides["text"])
        out.tokenizer, out.vocab_path, out.max_length = text_tokenizer(texts, sides["text"])
    return out


def _check_last_layer(caches: CacheSet) -> None:
    block = caches.facts.get("encoder_block")
    if block:
        raise ConfigError(
            f"--finetune full: {caches.names} holds the tokens after block {block[0]} of "
            f"{block[1]}; give a last-layer cache of the encoder (or train its top blocks with "
            "--tune-top)"
        )


def image_grid(images: CacheSet) -> tuple[int, int] | None:
    """The grid of a patch / grid cache (its regions), None for a CLS / pooled-only one."""
    from vlpipe.fusion.data import grid_of

    return grid_of(images) if "image_feats" in images.fields else None


def rebuild_vision(images: CacheSet, weights: str | None, check: bool = True) -> Extractor:
    """The image extractor that made `images`, from its recorded extract config, with
    `weights` (sha256 checked; None: the architecture only, random, for a checkpoint to
    fill), its model trainable."""
    prov, name = images.provenance, images.names
    backbone = prov.get("backbone")
    if backbone not in VISION_BACKBONES:
        raise ConfigError(
            f"--finetune full: {name} is a {backbone} cache; the image encoders trained end to "
            f"end are {' | '.join(VISION_BACKBONES)}"
        )
    config = prov.get("config")
    if not config:
        raise ConfigError(
            f"--finetune full: {name} records no extract config (an older cache): extract it "
            "again to train its encoder end to end"
        )
    _check_last_layer(images)
    path = check_weights(prov, weights, name, FLAGS["vision"]) if check else None
    from vlpipe.pipelines.extract_job import build_from_job, resolve_extract

    job = resolve_extract(config)
    if path is None:  # the architecture only: the one the weights' file fitted, no conversion
        cnn = dataclasses.replace(job.cnn, weights_layout=None)
        job = dataclasses.replace(job, arch=prov["model"]["arch"], cnn=cnn)
    job = dataclasses.replace(job, weights=path or "random")
    with torch.random.fork_rng(devices=[]):  # the seeded random init extraction used
        extractor = build_from_job(job, warn=False)
    _check_same(extractor.model_record, prov.get("model"), name, "model")
    recorded = transform_of(prov.get("preprocessing") or {})
    if check and extractor.transform != recorded:
        raise WeightsError(
            f"{name}: the rebuilt encoder transforms images as {extractor.transform}, the "
            f"cache records {recorded}"
        )
    extractor.transform = recorded  # an architecture-only rebuild has no weights' family
    return extractor


def transform_of(preprocessing: dict[str, Any]) -> ImageTransform:
    """The ImageTransform a cache's preprocessing record describes."""
    return ImageTransform(
        size=tuple(preprocessing["size"]),
        mean=tuple(preprocessing["mean"]),
        std=tuple(preprocessing["std"]),
        interpolation=preprocessing["interpolation"],
    )


def rebuild_text(texts: CacheSet, weights: str | None, check: bool = True) -> torch.nn.Module:
    """The BertModel that made `texts` (sha256-checked `weights`; None: random, see
    rebuild_vision)."""
    prov, name = texts.provenance, texts.names
    if prov.get("backbone") != "bert":
        raise ConfigError(f"--finetune full: {name} is a {prov.get('backbone')} cache, not bert")
    _check_last_layer(texts)
    path = check_weights(prov, weights, name, FLAGS["text"]) if check else None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(prov.get("seed") or 0)  # random-init: as extraction seeded it
        model = rebuild_bert(prov["model"], path)
    params = sum(p.numel() for p in model.parameters())
    if params != prov["model"].get("num_params", params):
        raise WeightsError(
            f"{name}: the rebuilt BERT has {params} parameters, the cache records "
            f"{prov['model'].get('num_params')}"
        )
    return model


def text_tokenizer(texts: CacheSet, weights: str):
    """The tokenizer extraction used for `texts`: the vocab.txt of the --text-weights folder,
    else the file the cache recorded, whichever has the cache's vocab sha256; that file and
    the cache's text length."""
    from vlpipe.installed import resolve
    from vlpipe.provenance import sha256_file
    from vlpipe.tokenizer import bert_tokenizer, find_vocab

    prep = texts.provenance.get("preprocessing") or {}
    declared = texts.facts.get("vocab_sha256") or prep.get("vocab_sha256")
    tried = []
    for source in (resolve(weights) if weights != "random" else None, prep.get("vocab")):
        if source is None:
            continue
        try:
            path = find_vocab(source)
        except (OSError, ValueError, WeightsError):
            continue
        if Path(path).is_file() and sha256_file(path) == declared:
            max_length = texts.facts.get("max_length") or prep.get("max_length")
            lowercase = prep.get("lowercase")
            return bert_tokenizer(path, lowercase), str(path), int(max_length)
        tried.append(str(path))
    raise ConfigError(
        f"{texts.names} was tokenized with a vocab (sha256 {str(declared)[:12]}...) that is not "
        f"at {' or '.join(tried) or 'its recorded path'}: put that vocab.txt in the "
        "--text-weights folder"
    )


def _check_same(rebuilt: dict, recorded: dict | None, name: str, what: str) -> None:
    """Another timm / transformers version may build another model from the same record."""

    def norm(value):
        return json.loads(json.dumps(value, default=str))

    if recorded is not None and norm(rebuilt) != norm(recorded):
        raise WeightsError(
            f"{name}: the rebuilt {what} is {norm(rebuilt)}, the cache records {norm(recorded)}"
        )


def live_architecture(meta: dict[str, Any]) -> LiveEncoders:
    """The (untrained) live encoders a --finetune full run.json describes, rebuilt from its
    caches' records with random weights: what its checkpoint is loaded into."""
    record, caches = meta["finetune"], meta.get("caches") or {}
    vision = text = None
    if record.get("vision"):
        vision = rebuild_vision(_Recorded(caches["image"]), None, check=False)
    if record.get("text"):
        text = rebuild_text(_Recorded(caches["text"]), None, check=False)
    grid = tuple(record["grid"]) if record.get("grid") else None
    return LiveEncoders(vision, text, grid)


class _Recorded:
    """A cache as run.json records it (its provenance), where a CacheSet is read."""

    def __init__(self, provenance: dict[str, Any]):
        self.provenance = provenance
        self.facts = {}  # a run trains on last-layer caches only (checked when it started)
        self.names = f"the run's {provenance.get('backbone')} cache"
