"""The two record types every dataset reader yields, the error readers raise, and shared helpers.

Readers are plain functions returning lists of these records; extraction and training only
ever see records, never dataset-specific file layouts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from vlpipe.errors import ConfigError, InputError


class AnnotationError(InputError):
    """A malformed annotation file. The message names the file and the record."""

    def __init__(self, path: str | Path, record: object, reason: str):
        self.path, self.record, self.reason = str(path), record, reason
        super().__init__(f"{path}: record {record}: {reason}")


@dataclass(frozen=True)
class ImageRecord:
    """One image to encode. `key` is unique within a cache (e.g. "train/17", "458752")."""

    key: str
    path: str


@dataclass(frozen=True)
class TextRecord:
    """One question / statement / caption.

    key: unique id of the text (question_id, questionId, NLVR2 identifier, "train/17").
    image_keys: the cache keys of the image(s) it is about (two for NLVR2: img0, img1).
    answers: every human answer as given (VQA: 10; GQA/easy-VQA: 1; NLVR2: ["True"|"False"]).
    label: soft target scores {answer: score} where the source provides them (LXMERT json, VQA).
    extra: what the official metrics read besides the answers: VQA answer_type,
    question_type, multiple_choice_answer (and annotators, rarely); GQA the question types,
    global group, reasoning steps, balanced flag and entailed questions; easy-VQA answer_type;
    VCR its item, mode and object references.
    choices: a multiple-choice example's candidate texts (VCR: 4), each encoded with the image
    and scored; its answer is the index of the right one ("0".."3"). A text cache holds each
    candidate under `choice_key(i)`.
    """

    key: str
    text: str
    image_keys: tuple[str, ...]
    answers: tuple[str, ...] = ()
    label: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    choices: tuple[str, ...] = ()

    def choice_key(self, i: int) -> str:
        return f"{self.key}/{i}"

    @property
    def text_keys(self) -> tuple[str, ...]:
        """The text cache keys of the record: its own, or its candidates'."""
        if self.choices:
            return tuple(self.choice_key(i) for i in range(len(self.choices)))
        return (self.key,)

    @property
    def labelled(self) -> bool:
        """Whether the record can be scored: it has answers or a label, or a label field that
        is empty (LXMERT json: a question none of whose answers is in the answer table)."""
        return bool(self.answers or self.label or self.extra.get("labelled"))


T = TypeVar("T")


_DIGITS = re.compile(r"(\d+)")


def candidate_records(records: list[TextRecord]) -> list[TextRecord]:
    """The texts a text encoder caches: each record's own, or each of its candidates (under
    `choice_key(i)`) for a multiple-choice record."""
    out = []
    for rec in records:
        if not rec.choices:
            out.append(rec)
            continue
        for i, text in enumerate(rec.choices):
            out.append(TextRecord(rec.choice_key(i), text, rec.image_keys))
    return out


def natural_key(key: str) -> tuple:
    """Sort key in natural order: "train/2" before "train/10" (numbers compared as numbers).
    re.split with a group alternates text and digits, so the tuples always compare text with
    text and numbers with numbers."""
    parts = _DIGITS.split(key)
    # a number as (its length without leading zeros, its digits): numeric order for any length;
    # the key itself last, so "img01" and "img1" still have one order
    numbers = ((len(p.lstrip("0")), p.lstrip("0")) if i % 2 else p for i, p in enumerate(parts))
    return (*numbers, key)


def apply_limit(items: list[T], limit: int | None) -> list[T]:
    """The first `limit` items, or all of them when `limit` is None."""
    if limit is None:
        return items
    if limit < 0:
        raise ConfigError(f"limit must be >= 0 or None, got {limit}")
    return items[:limit]


def load_json(path: str | Path) -> Any:
    """Parse a whole JSON file; invalid JSON or text becomes an AnnotationError with the line."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise AnnotationError(path, f"line {e.lineno}", f"invalid JSON: {e.msg}") from e
    except UnicodeDecodeError as e:
        raise AnnotationError(path, f"at byte {e.start}", "not UTF-8 text") from e
    except IsADirectoryError as e:
        raise InputError(f"{path} is a folder, not an annotation file") from e
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file") from e


def json_lines(path: str | Path) -> list[tuple[int, Any]]:
    """(line number, parsed object) of every non-blank line of a JSON Lines file; a bad line
    is an AnnotationError naming it."""
    path = Path(path)
    try:
        # bytes, decoded line by line, so that a bad byte is reported on its own line
        with open(path, "rb") as f:
            return [(n, _parse_line(raw, path, n)) for n, raw in enumerate(f, 1) if raw.strip()]
    except IsADirectoryError as e:
        raise InputError(f"{path} is a folder, not an annotation file") from e
    except FileNotFoundError as e:
        raise InputError(f"{path}: no such file") from e


def _parse_line(raw: bytes, path: Path, lineno: int) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise AnnotationError(path, f"line {lineno}", "not UTF-8 text") from e
    except json.JSONDecodeError as e:
        reason = f"invalid JSON ({e.msg}); expected one JSON object per line"
        raise AnnotationError(path, f"line {lineno}", reason) from e


def get_field(
    obj: object,
    name: str,
    kind: type | tuple[type, ...],
    path: str | Path,
    record: object,
    optional: bool = False,
) -> Any:
    """`obj[name]` checked against `kind`; None for a missing or null optional field.

    bool is rejected where int is expected: JSON `true` is never a valid id.
    """
    if type(obj) is dict and type(value := obj.get(name)) is kind:
        return value  # the common case, kept cheap: VQA train calls this millions of times
    if not isinstance(obj, dict):
        raise AnnotationError(path, record, f"expected a JSON object, got {type(obj).__name__}")
    value = obj.get(name)
    if value is None:
        if optional:
            return None
        raise AnnotationError(path, record, f"missing or null field {name!r}")
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        expected = " or ".join(k.__name__ for k in _as_tuple(kind))
        raise AnnotationError(
            path, record, f"field {name!r} should be {expected}, got {type(value).__name__}"
        )
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
