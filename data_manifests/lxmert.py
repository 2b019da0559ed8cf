"""LXMERT's preprocessed question files (VQA train/nominival/minival/test, GQA train/valid/testdev).

A JSON list:
    [{"question_id": 262148000 | "201307251", "img_id": "COCO_val2014_000000262148" | "2354786",
      "sent": str, "label": {answer: soft score}, "answer_type": str, "question_type": str}, ...]
"label" is absent in test files; "answer_type" / "question_type" exist for VQA only.

Records: key = str(question_id); image_keys = (image_key_from_lxmert_id(img_id),);
label = the soft scores; answers = the label's answers; extra = the two types when present,
and "labelled" when the item has a label (possibly empty: it still counts, scoring 0).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import AnnotationError, TextRecord, apply_limit, get_field, load_json
from .images import coco_image_id

_EXTRA_FIELDS = ("answer_type", "question_type")


def image_key_from_lxmert_id(img_id: str) -> str:
    """Cache key of an LXMERT img_id: "COCO_train2014_000000458752" -> "458752".

    COCO ids lose their prefix and zero padding, as in the `coco` image listing; anything else
    (GQA "2370799" / "n161313", NLVR2 "dev-850-0-img0") is already a key and is returned as is.
    """
    image_id = coco_image_id(img_id, prefixed=True)
    return str(image_id) if image_id is not None else img_id


def read_lxmert(path: str | Path, limit: int | None = None) -> list[TextRecord]:
    """Questions in file order; the whole file is checked before `limit` applies."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, list):
        reason = f"expected a list of questions, got {type(data).__name__}"
        raise AnnotationError(path, "top level", reason)
    records: list[TextRecord] = []
    seen: set[str] = set()
    for index, item in enumerate(data):
        record = _record(item, path, index)
        if record.key in seen:
            raise AnnotationError(path, record.key, "duplicate question_id")
        seen.add(record.key)
        records.append(record)
    return apply_limit(records, limit)


def _record(item: Any, path: Path, index: int) -> TextRecord:
    where = f"index {index}"
    qid = str(get_field(item, "question_id", (int, str), path, where))
    raw_label = get_field(item, "label", dict, path, qid, optional=True)
    label = _label(raw_label or {}, path, qid)
    extra: dict[str, Any] = {"labelled": True} if raw_label is not None else {}
    for name in _EXTRA_FIELDS:
        value = get_field(item, name, str, path, qid, optional=True)
        if value is not None:
            extra[name] = value
    return TextRecord(
        key=qid,
        text=get_field(item, "sent", str, path, qid),
        image_keys=(image_key_from_lxmert_id(get_field(item, "img_id", str, path, qid)),),
        answers=tuple(label),
        label=label,
        extra=extra,
    )


def _label(raw: dict[str, Any], path: Path, qid: str) -> dict[str, float]:
    """{answer: score} with float scores; a non-numeric score is an error."""
    for answer, score in raw.items():
        if isinstance(score, bool) or not isinstance(score, (int, float)):
            reason = f"label score for {answer!r} should be a number, got {score!r}"
            raise AnnotationError(path, qid, reason)
    return {answer: float(score) for answer, score in raw.items()}
