"""NLVR2 statements: {train,dev,test1}.json, one JSON object per line (JSON Lines).

    {"identifier": "dev-850-0-0", "sentence": str, "label": "True" | "False",
     "directory": 51 (train only), "left_url", "right_url", "synset", "query", ...}

The identifier is split-set-pair-sentence; the pair's two images are split-set-pair-img0 and
split-set-pair-img1, the `nlvr2` listing's keys. Records: key = identifier;
answers = (label,) or () when the file has no labels; extra = {"directory"} when present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlpipe.errors import InputError

from .base import AnnotationError, TextRecord, apply_limit, get_field, json_lines

LABELS = ("True", "False")


def image_keys_from_identifier(identifier: str) -> tuple[str, str]:
    """The pair's image keys: "dev-850-0-0" -> ("dev-850-0-img0", "dev-850-0-img1").

    ValueError unless the identifier has the four fields split-set-pair-sentence.
    """
    parts = identifier.split("-")
    if len(parts) != 4 or not all(parts):
        raise InputError(f"NLVR2 identifier {identifier!r} is not split-set-pair-sentence")
    pair = "-".join(parts[:3])
    return (f"{pair}-img0", f"{pair}-img1")


def read_nlvr2(path: str | Path, limit: int | None = None) -> list[TextRecord]:
    """Statements in file order, blank lines skipped; errors name the line number.

    The whole file is checked before `limit` applies.
    """
    path = Path(path)
    records: list[TextRecord] = []
    first_line: dict[str, int] = {}
    for lineno, item in json_lines(path):
        record = _record(item, path, lineno)
        if record.key in first_line:
            reason = f"identifier {record.key} repeats line {first_line[record.key]}"
            raise AnnotationError(path, f"line {lineno}", reason)
        first_line[record.key] = lineno
        records.append(record)
    return apply_limit(records, limit)


def _record(item: Any, path: Path, lineno: int) -> TextRecord:
    where = f"line {lineno}"
    identifier = get_field(item, "identifier", str, path, where)
    where = f"line {lineno} ({identifier})"
    try:
        image_keys = image_keys_from_identifier(identifier)
    except ValueError as e:
        raise AnnotationError(path, where, str(e)) from None
    label = get_field(item, "label", str, path, where, optional=True)
    if label is not None and label not in LABELS:
        raise AnnotationError(path, where, f"label {label!r} is not 'True' or 'False'")
    directory = get_field(item, "directory", (int, str), path, where, optional=True)
    return TextRecord(
        key=identifier,
        text=get_field(item, "sentence", str, path, where),
        image_keys=image_keys,
        answers=() if label is None else (label,),
        extra={} if directory is None else {"directory": str(directory)},
    )
