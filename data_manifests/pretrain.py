"""The sentences LXMERT pre-training reads: captions and questions, each paired with one image.

Sources are what `vlpipe pretrain --data X` names, one per flag, read in the order given:
    PATH                  a JSON file; its format is told from its content (`detect_format`)
    FORMAT:PATH           the format forced: one of FORMATS
    easy-vqa:SPLIT        the installed easy-vqa package, split train | test
A VQA questions file directly followed by its annotations file is one source (answers from the
annotations); questions alone give sentences without QA labels.

Formats:
    lxmert-pretrain  LXMERT's data/lxmert/{mscoco_train,mscoco_nominival,vgnococo,...}.json:
                     [{"img_id", "sentf": {category: [sentence, ...]},
                       "labelf": {category: [{answer: score}, ...]}}, ...]
                     labelf lists align with sentf lists; a category without labelf is captions.
    coco-captions    captions_{train,val}2014.json: {"images", "annotations": [{"id",
                     "image_id", "caption"}, ...]}
    vqa-questions, vqa-annotations, gqa, lxmert (LXMERT's preprocessed VQA / GQA question
                     json): read by the readers of `registry.TEXT_FORMATS`.

Keys: LXMERT's own uid for lxmert-pretrain ("{img_id}_{category}_{index:03d}", its make_uid),
"{category}:{id}" for the rest (annotation id, question id, easy-vqa record key), so the same
VQA question read from a VQA file and from LXMERT's json gets the same key.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpipe.errors import ConfigError, InputError
from vlpipe.fusion.answers import target_scores

from .base import AnnotationError, TextRecord, apply_limit, get_field, load_json
from .lxmert import image_key_from_lxmert_id
from .registry import read_texts

FORMATS = ("lxmert-pretrain", "lxmert", "coco-captions", "vqa-questions", "vqa-annotations", "gqa")
EASY_VQA = "easy-vqa"

# A file's first characters, enough to hold the first record of every format but COCO captions
# (whose image list comes first); detection parses the whole file only when these do not tell.
_HEAD_CHARS = 1 << 20
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_FORMAT_NAME = re.compile(r"[a-z][a-z0-9-]+")
# source format -> the registry.TEXT_FORMATS reader of its questions
_TEXT_FORMATS = {"vqa-questions": "vqa", "gqa": "gqa", "lxmert": "lxmert", EASY_VQA: EASY_VQA}


@dataclass(frozen=True)
class Sentence:
    """One pre-training text on one image.

    key: unique over all sources, stable (see the module docstring).
    image_key: the cache key of its image ("458752" for COCO, the VG / GQA id as is).
    category: the LXMERT category ("mscoco", "vg", "vqa", "gqa", "visual7w", ...), "caption" for
        COCO captions, or the question format ("vqa", "gqa", "easy-vqa").
    label: the QA answers {raw answer: soft score}; None for captions and unanswered questions.
    """

    key: str
    image_key: str
    text: str
    category: str
    label: dict[str, float] | None


@dataclass(frozen=True)
class _Source:
    """One source to read: `entry` as the user wrote it, for messages."""

    entry: str
    format: str
    paths: tuple[Path, ...] = ()
    split: str | None = None


def read_sources(entries: Sequence[str], limit: int | None = None) -> list[Sentence]:
    """The sentences of every entry, in entry order; `limit` keeps the first N of each entry
    (each file is checked whole first, so a bad file fails the same way whatever the limit)."""
    sources = _sources(entries)
    sentences: list[Sentence] = []
    owner: dict[str, int] = {}  # key -> index of the source it came from
    for number, source in enumerate(sources):
        read = _read(source)
        for sentence in read:
            first = owner.setdefault(sentence.key, number)
            if first != number:
                raise InputError(
                    f"sentence {sentence.key!r} is in both {sources[first].entry} and "
                    f"{source.entry} (the same data given twice?)"
                )
        sentences.extend(apply_limit(read, limit))
    return sentences


def detect_format(path: str | Path) -> str:
    """The format of a file (one of FORMATS), told from its content."""
    path = Path(path)
    head = _head_sample(path)
    found = _format_of(head) if head is not None else None
    if found is None:  # the head was not enough (or not JSON): look at the whole file
        found = _format_of(load_json(path))
    if found is None:
        raise InputError(
            f"{path}: not a known pre-training source ({', '.join(FORMATS)}); name the format "
            "as FORMAT:PATH if it is one of them"
        )
    return found


def read_lxmert_pretrain(path: str | Path, limit: int | None = None) -> list[Sentence]:
    """One sentence per (image, category, index), in file order."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list):
        reason = f"expected a list of images, got {type(data).__name__}"
        raise AnnotationError(path, "top level", reason)
    sentences: list[Sentence] = []
    seen: set[str] = set()
    for index, item in enumerate(data):
        img_id = get_field(item, "img_id", str, path, f"index {index}")
        where = f"index {index} (img_id {img_id})"
        if img_id in seen:
            raise AnnotationError(path, where, "duplicate img_id")
        seen.add(img_id)
        sentences.extend(_image_sentences(item, img_id, path, where))
    return apply_limit(sentences, limit)


def read_coco_captions(path: str | Path, limit: int | None = None) -> list[Sentence]:
    """One sentence per caption annotation, in file order."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict):
        reason = f'expected an object with an "annotations" list, got {type(data).__name__}'
        raise AnnotationError(path, "top level", reason)
    sentences: list[Sentence] = []
    seen: set[int] = set()
    for index, item in enumerate(get_field(data, "annotations", list, path, "top level")):
        ann_id = get_field(item, "id", int, path, f"index {index}")
        where = f"index {index} (id {ann_id})"
        if ann_id in seen:
            raise AnnotationError(path, where, "duplicate annotation id")
        seen.add(ann_id)
        sentences.append(
            Sentence(
                key=f"caption:{ann_id}",
                # vlpipe's `coco` image listing keys an image by its integer id
                image_key=str(get_field(item, "image_id", int, path, where)),
                text=get_field(item, "caption", str, path, where),
                category="caption",
                label=None,
            )
        )
    return apply_limit(sentences, limit)


# --- entries -----------------------------------------------------------------------------


def _sources(entries: Sequence[str]) -> list[_Source]:
    """The entries parsed, a VQA annotations file joined to the questions file before it."""
    sources: list[_Source] = []
    for entry in entries:
        source = _parse_entry(entry)
        if source.format == "vqa-annotations":
            previous = sources[-1] if sources else None
            if previous is None or previous.format != "vqa-questions" or len(previous.paths) > 1:
                raise ConfigError(
                    f"{entry}: a VQA annotations file must directly follow its questions file "
                    "in the sources (--data QUESTIONS --data ANNOTATIONS)"
                )
            joined = f"{previous.entry} + {entry}"
            source = _Source(joined, "vqa-questions", previous.paths + source.paths)
            sources[-1] = source
            continue
        sources.append(source)
    return sources


def _parse_entry(entry: str) -> _Source:
    """PATH, FORMAT:PATH or easy-vqa:SPLIT."""
    prefix, sep, rest = entry.partition(":")
    if sep and prefix == EASY_VQA:
        return _Source(entry, EASY_VQA, split=rest)
    if sep and prefix in FORMATS:
        return _Source(entry, prefix, (Path(rest),))
    path = Path(entry)
    if sep and _FORMAT_NAME.fullmatch(prefix) and not path.exists():
        known = ", ".join((*FORMATS, EASY_VQA))
        raise ConfigError(f"{entry}: unknown source format {prefix!r}; known: {known}")
    return _Source(entry, detect_format(path), (path,))


def _read(source: _Source) -> list[Sentence]:
    """Every sentence of one source (no limit: duplicates are checked on all of them)."""
    if source.format == "lxmert-pretrain":
        return read_lxmert_pretrain(source.paths[0])
    if source.format == "coco-captions":
        return read_coco_captions(source.paths[0])
    text_format = _TEXT_FORMATS[source.format]
    records = read_texts(text_format, source.paths, source.split)
    return [_from_record(record, text_format) for record in records]


# --- question files ------------------------------------------------------------------------


def _from_record(record: TextRecord, text_format: str) -> Sentence:
    """A question of a TEXT_FORMATS reader as a sentence with its soft answer scores."""
    category = text_format
    if text_format == "lxmert":  # LXMERT's VQA json carries the VQA types, its GQA json not
        category = "vqa" if "answer_type" in record.extra else "gqa"
    return Sentence(
        key=f"{category}:{record.key}",
        image_key=record.image_keys[0],
        text=record.text,
        category=category,
        label=_record_label(record, category),
    )


def _record_label(record: TextRecord, category: str) -> dict[str, float] | None:
    if record.label:
        return dict(record.label)
    if not record.answers:
        return None
    if category == "vqa":  # 10 human answers: BUTD / LXMERT soft scores
        return target_scores(record.answers)
    return {answer: 1.0 for answer in record.answers}  # GQA, easy-VQA: the one answer


# --- lxmert-pretrain -----------------------------------------------------------------------


def _image_sentences(item: dict, img_id: str, path: Path, where: str) -> Iterator[Sentence]:
    """The sentences of one image, category by category in the file's order."""
    sentf = get_field(item, "sentf", dict, path, where)
    labelf = get_field(item, "labelf", dict, path, where)
    unmatched = sorted(labelf.keys() - sentf.keys())
    if unmatched:
        raise AnnotationError(path, where, f"labelf category {unmatched[0]!r} is not in sentf")
    image_key = image_key_from_lxmert_id(img_id)
    for category, sents in sentf.items():
        texts = _texts(sents, path, where, category)
        labels = _labels(labelf.get(category), len(texts), path, where, category)
        for index, text in enumerate(texts):
            yield Sentence(
                key=f"{img_id}_{category}_{index:03d}",  # LXMERT's make_uid
                image_key=image_key,
                text=text,
                category=category,
                label=None if labels is None else labels[index],
            )


def _texts(sents: Any, path: Path, where: str, category: str) -> list[str]:
    if not isinstance(sents, list) or not all(isinstance(s, str) for s in sents):
        raise AnnotationError(path, where, f"sentf[{category!r}] should be a list of strings")
    return sents


def _labels(
    raw: Any, count: int, path: Path, where: str, category: str
) -> list[dict[str, float]] | None:
    """labelf[category] checked: one {answer: score} per sentence; None for captions."""
    if raw is None:
        return None
    name = f"labelf[{category!r}]"
    if not isinstance(raw, list):
        raise AnnotationError(path, where, f"{name} should be a list, got {type(raw).__name__}")
    if len(raw) != count:
        reason = f"{name} has {len(raw)} labels for {count} sentences in sentf"
        raise AnnotationError(path, where, reason)
    return [_scores(label, path, f"{where} {name}[{i}]") for i, label in enumerate(raw)]


def _scores(label: Any, path: Path, where: str) -> dict[str, float]:
    """{answer: score} with float scores; bool is no score (JSON true is not 1.0)."""
    if not isinstance(label, dict):
        raise AnnotationError(path, where, f"expected {{answer: score}}, got {label!r}")
    for answer, score in label.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            raise AnnotationError(path, where, f"score of {answer!r} is not a number: {score!r}")
    return {answer: float(score) for answer, score in label.items()}


# --- detection -----------------------------------------------------------------------------


def _format_of(data: Any) -> str | None:
    """The format of a parsed file (or of its head, lists cut short); None when unknown."""
    if isinstance(data, list):
        first = data[0] if data else None
        if isinstance(first, dict) and "sentf" in first:
            return "lxmert-pretrain"
        if isinstance(first, dict) and "sent" in first and "question_id" in first:
            return "lxmert"
        return None
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("questions"), list):
        return "vqa-questions"
    annotations = data.get("annotations")
    if isinstance(annotations, list) and annotations and isinstance(annotations[0], dict):
        if "caption" in annotations[0]:
            return "coco-captions"
        if "answers" in annotations[0]:
            return "vqa-annotations"
    first_value = next(iter(data.values()), None)
    if isinstance(first_value, dict) and {"imageId", "question"} <= first_value.keys():
        return "gqa"
    return None


def _head_sample(path: Path) -> Any:
    """The start of a JSON file as a value whose lists stop at the elements decoded so far, so
    that multi-GB question files are not parsed twice; None when the head does not decode."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(_HEAD_CHARS)
    except (OSError, UnicodeDecodeError):
        return None  # load_json then names the problem
    decoder = json.JSONDecoder()
    try:
        pos = _skip(text, 0)
        if text.startswith("[", pos):
            return _list_head(decoder, text, pos)
        if text.startswith("{", pos):
            return _object_head(decoder, text, pos)
    except (ValueError, IndexError):
        pass
    return None


def _list_head(decoder: json.JSONDecoder, text: str, pos: int) -> list[Any]:
    """The list starting at text[pos] ('['), or its first element alone when it runs on."""
    try:
        return decoder.raw_decode(text, pos)[0]
    except ValueError:
        pos = _skip(text, pos + 1)
        return [decoder.raw_decode(text, pos)[0]]


def _object_head(decoder: json.JSONDecoder, text: str, pos: int) -> dict[str, Any]:
    """The object starting at text[pos] ('{'), up to the first value that runs on; a list that
    runs on keeps its first element."""
    out: dict[str, Any] = {}
    while True:
        pos = _skip(text, pos + 1)  # past '{' or ','
        if text.startswith("}", pos):
            return out
        key, pos = decoder.raw_decode(text, pos)
        pos = _skip(text, pos)
        if not isinstance(key, str) or not text.startswith(":", pos):
            raise ValueError("not a JSON object")
        pos = _skip(text, pos + 1)
        try:
            out[key], pos = decoder.raw_decode(text, pos)
        except ValueError:
            if text.startswith("[", pos):
                out[key] = _list_head(decoder, text, pos)
            return out
        pos = _skip(text, pos)
        if not text.startswith(",", pos):
            return out


def _skip(text: str, pos: int) -> int:
    match = _WHITESPACE.match(text, pos)
    return match.end() if match else pos
