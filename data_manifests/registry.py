"""Dataset names as the CLI and the cache spell them, mapped to their readers.

IMAGE_DATASETS: name -> listing `(root, split, limit) -> list[ImageRecord]`.
TEXT_FORMATS:   name -> reader `(paths, split, limit) -> list[TextRecord]`, one signature for all:
    vqa       [questions.json] or [questions.json, annotations.json]
    gqa       [*_balanced_questions.json]
    nlvr2     [train.json | dev.json | test1.json]      (JSON Lines)
    lxmert    [LXMERT's preprocessed *.json]
    easy-vqa  [] with split "train" or "test"
    vcr       [train.jsonl | val.jsonl | test.jsonl]               (JSON Lines, multiple choice)
Splits that a format does not need are ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from vlpipe.errors import ConfigError

from . import images
from .base import ImageRecord, TextRecord
from .easy_vqa import read_easy_vqa
from .gqa import read_gqa
from .lxmert import read_lxmert
from .nlvr2 import read_nlvr2
from .vcr import read_vcr
from .vqa import read_vqa

ImageListing = Callable[[Path, str | None, int | None], list[ImageRecord]]
TextReader = Callable[[Sequence[Path], str | None, int | None], list[TextRecord]]


def _one_path(name: str, paths: Sequence[Path]) -> Path:
    if len(paths) != 1:
        raise ConfigError(f"text format {name!r} takes exactly one file, got {len(paths)}")
    return Path(paths[0])


def _vqa(paths: Sequence[Path], split: str | None, limit: int | None) -> list[TextRecord]:
    if len(paths) not in (1, 2):
        reason = "[questions.json] or [questions.json, annotations.json]"
        raise ConfigError(f"text format 'vqa' takes {reason}, got {len(paths)} files")
    annotations = paths[1] if len(paths) == 2 else None
    return read_vqa(paths[0], annotations, limit)


def _gqa(paths: Sequence[Path], split: str | None, limit: int | None) -> list[TextRecord]:
    return read_gqa(_one_path("gqa", paths), limit)


def _nlvr2(paths: Sequence[Path], split: str | None, limit: int | None) -> list[TextRecord]:
    return read_nlvr2(_one_path("nlvr2", paths), limit)


def _lxmert(paths: Sequence[Path], split: str | None, limit: int | None) -> list[TextRecord]:
    return read_lxmert(_one_path("lxmert", paths), limit)


def _easy_vqa(paths: Sequence[Path], split: str | None, limit: int | None) -> list[TextRecord]:
    if paths:
        raise ConfigError("text format 'easy-vqa' reads the installed package: pass no files")
    if split is None:
        raise ConfigError("text format 'easy-vqa' needs split 'train' or 'test'")
    return read_easy_vqa(split, limit)


def _vcr(paths: Sequence[Path], split: str | None, limit: int | None) -> list[TextRecord]:
    return read_vcr(_one_path("vcr", paths), limit)


# Text formats whose texts need more tokens than the default (vlpipe.tokenizer.MAX_LENGTH):
# a VCR QA->R candidate is a question, an answer and a rationale (~40-60 word pieces).
TEXT_LENGTHS = {"vcr": 128}

IMAGE_DATASETS: dict[str, ImageListing] = {
    "folder": images.folder,
    "coco": images.coco,
    "vg": images.vg,
    "gqa": images.gqa,
    "nlvr2": images.nlvr2,
    "easy-vqa": images.easy_vqa,
    "vcr": images.vcr,
}

TEXT_FORMATS: dict[str, TextReader] = {
    "vqa": _vqa,
    "gqa": _gqa,
    "nlvr2": _nlvr2,
    "lxmert": _lxmert,
    "easy-vqa": _easy_vqa,
    "vcr": _vcr,
}


def list_images(
    name: str, root: Path | str | None, split: str | None = None, limit: int | None = None
) -> list[ImageRecord]:
    """The images of dataset `name` (a key of IMAGE_DATASETS); only easy-vqa needs no root."""
    listing = _lookup(IMAGE_DATASETS, name, "image dataset")
    if root is None and name != "easy-vqa":
        raise ConfigError(f"image dataset {name!r} needs a root folder")
    return listing(Path() if root is None else Path(root), split, limit)  # easy-vqa ignores it


def read_texts(
    name: str, paths: Sequence[Path], split: str | None = None, limit: int | None = None
) -> list[TextRecord]:
    """The questions / statements of text format `name` (a key of TEXT_FORMATS)."""
    return _lookup(TEXT_FORMATS, name, "text format")([Path(p) for p in paths], split, limit)


def _lookup(table: dict[str, Callable], name: str, what: str) -> Callable:
    if name not in table:
        raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]
