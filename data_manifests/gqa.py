"""GQA balanced questions: {train,val,testdev,test,challenge}_balanced_questions.json.

One object keyed by questionId:
    {"02930152": {"imageId": "2354786", "question": str, "answer": str, "fullAnswer": str,
                  "types": {"structural": str, "semantic": str, "detailed": str},
                  "semantic": [...], "groups": {...}, "isBalanced": bool, ...}, ...}
test and challenge have no "answer" / "fullAnswer".

Records: key = questionId; image_keys = (imageId,), the `gqa` listing's key;
answers = (answer,) or (); extra = fullAnswer and the three question types when present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import AnnotationError, TextRecord, apply_limit, get_field, load_json

_TYPE_FIELDS = ("structural", "semantic", "detailed")


def read_gqa(path: str | Path, limit: int | None = None) -> list[TextRecord]:
    """Questions in file order; the whole file is checked before `limit` applies."""
    path = Path(path)
    data = load_json(path)
    if not isinstance(data, dict):
        reason = f"expected an object {{questionId: question}}, got {type(data).__name__}"
        raise AnnotationError(path, "top level", reason)
    return apply_limit([_record(qid, item, path) for qid, item in data.items()], limit)


def _record(qid: str, item: Any, path: Path) -> TextRecord:
    answer = get_field(item, "answer", str, path, qid, optional=True)
    return TextRecord(
        key=qid,
        text=get_field(item, "question", str, path, qid),
        image_keys=(get_field(item, "imageId", str, path, qid),),
        answers=() if answer is None else (answer,),
        extra=_extra(item, path, qid),
    )


def _extra(item: dict[str, Any], path: Path, qid: str) -> dict[str, str]:
    """fullAnswer and the structural / semantic / detailed types, where the file has them."""
    extra = {}
    full_answer = get_field(item, "fullAnswer", str, path, qid, optional=True)
    if full_answer is not None:
        extra["fullAnswer"] = full_answer
    types = get_field(item, "types", dict, path, qid, optional=True) or {}
    for name in _TYPE_FIELDS:
        value = get_field(types, name, str, path, qid, optional=True)
        if value is not None:
            extra[name] = value
    return extra
