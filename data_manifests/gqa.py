"""GQA questions: {train,val,testdev,test,challenge}_{balanced,all}_questions.json, and the
choices file of the official evaluator.

Questions, one object keyed by questionId:
    {"02930152": {"imageId": "2354786", "question": str, "answer": str, "fullAnswer": str,
                  "isBalanced": bool, "types": {"structural", "semantic", "detailed"},
                  "groups": {"global": str | null, "local": str}, "entailed": [qid, ...],
                  "semantic": [{"operation", "argument", "dependencies"}, ...], ...}, ...}
test and challenge have no "answer" / "fullAnswer". An all-questions file holds balanced and
unbalanced questions; the official eval.py scores the balanced ones only.
Choices, {split}_choices.json: {questionId: {"valid": [answer, ...], "plausible": [...]}}.

Records: key = questionId; image_keys = (imageId,), the `gqa` listing's key;
answers = (answer,) or (); extra = what eval.py reads: fullAnswer, the three question types,
"balanced" (isBalanced; True when the file has no flag), "group" (the global group), "steps"
(reasoning steps) and "entailed" (a tuple of questionIds), where the file has them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import AnnotationError, TextRecord, apply_limit, get_field, load_json

_TYPE_FIELDS = ("structural", "semantic", "detailed")
_NOT_A_STEP = ("exist", "query: name", "choose name")  # eval.py getStepsNum


def read_gqa(path: str | Path, limit: int | None = None) -> list[TextRecord]:
    """Questions in file order; the whole file is checked before `limit` applies."""
    path = Path(path)
    data = _top_object(path, "{questionId: question}")
    ids = {qid: qid for qid in data}  # entailed ids share the key strings: less memory
    return apply_limit([_record(qid, item, path, ids) for qid, item in data.items()], limit)


def read_gqa_choices(path: str | Path) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    """{questionId: (valid answers, plausible answers)} from an eval.py choices file."""
    path = Path(path)
    out = {}
    for qid, item in _top_object(path, "{questionId: {valid, plausible}}").items():
        valid, plausible = (_strings(item, name, path, qid) for name in ("valid", "plausible"))
        out[qid] = (frozenset(valid), frozenset(plausible))
    return out


def _top_object(path: Path, what: str) -> dict[str, Any]:
    data = load_json(path)
    if not isinstance(data, dict):
        raise AnnotationError(
            path, "top level", f"expected an object {what}, got {type(data).__name__}"
        )
    return data


def _record(qid: str, item: Any, path: Path, ids: dict[str, str]) -> TextRecord:
    answer = get_field(item, "answer", str, path, qid, optional=True)
    return TextRecord(
        key=qid,
        text=get_field(item, "question", str, path, qid),
        image_keys=(get_field(item, "imageId", str, path, qid),),
        answers=() if answer is None else (answer,),
        extra=_extra(item, path, qid, ids),
    )


def _extra(item: dict[str, Any], path: Path, qid: str, ids: dict[str, str]) -> dict[str, Any]:
    """What the official evaluator reads, where the file has it."""
    extra: dict[str, Any] = {}
    full_answer = get_field(item, "fullAnswer", str, path, qid, optional=True)
    if full_answer is not None:
        extra["fullAnswer"] = full_answer
    types = get_field(item, "types", dict, path, qid, optional=True) or {}
    for name in _TYPE_FIELDS:
        value = get_field(types, name, str, path, qid, optional=True)
        if value is not None:
            extra[name] = value
    balanced = get_field(item, "isBalanced", bool, path, qid, optional=True)
    extra["balanced"] = True if balanced is None else balanced
    groups = get_field(item, "groups", dict, path, qid, optional=True) or {}
    group = get_field(groups, "global", str, path, qid, optional=True)
    if group is not None:
        extra["group"] = group
    semantic = get_field(item, "semantic", list, path, qid, optional=True)
    if semantic is not None:
        extra["steps"] = _steps(semantic, path, qid)
    entailed = get_field(item, "entailed", list, path, qid, optional=True)
    if entailed:
        extra["entailed"] = tuple(ids.get(e, e) for e in _checked_ids(entailed, path, qid))
    return extra


def _steps(semantic: list[Any], path: Path, qid: str) -> int:
    """eval.py getStepsNum: program steps, not counting exist / query name / choose name."""
    steps = 0
    for step in semantic:
        op = get_field(step, "operation", str, path, qid)
        arg = get_field(step, "argument", str, path, qid)
        steps += not any(o in f"{op}: {arg}" for o in _NOT_A_STEP)
    return steps


def _checked_ids(values: list[Any], path: Path, qid: str) -> list[str]:
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise AnnotationError(path, qid, f"'entailed' holds a non-string id {bad[0]!r}")
    return values


def _strings(item: Any, name: str, path: Path, qid: str) -> list[str]:
    values = get_field(item, name, list, path, qid)
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise AnnotationError(path, qid, f"{name!r} holds a non-string answer {bad[0]!r}")
    return values
