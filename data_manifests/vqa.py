"""VQA v2: the official question file, plus the annotation file for train/val.

Questions, v2_OpenEnded_mscoco_{train2014,val2014,test2015}_questions.json:
    {"info", "task_type", "data_type", "data_subtype", "license",
     "questions": [{"image_id": int, "question": str, "question_id": int}, ...]}
Annotations, v2_mscoco_{train2014,val2014}_annotations.json:
    {"annotations": [{"question_id": int, "image_id": int, "question_type": str,
                      "answer_type": "yes/no" | "number" | "other",
                      "multiple_choice_answer": str,
                      "answers": [10 x {"answer": str, "answer_confidence", "answer_id"}]}]}

Records: key = str(question_id); image_keys = (str(image_id),), the `coco` listing's key;
answers = the 10 human answers as given (not normalised) or () without annotations. With
annotations, records follow the annotation file's order (the order the official evaluator sums
in), else the question file's. extra["annotators"] is set only for the rare annotation whose
answer records are not all distinct apart from their text (see metrics.vqa.VqaQuestion).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from .base import AnnotationError, TextRecord, apply_limit, get_field, load_json

_EXTRA_FIELDS = ("answer_type", "question_type", "multiple_choice_answer")


class _Annotation(NamedTuple):
    """What a record keeps of one annotation (the raw dicts hold ~40 objects each)."""

    image_id: int
    answers: tuple[str, ...]
    extra: dict[str, Any]


def read_vqa(
    questions_path: str | Path,
    annotations_path: str | Path | None = None,
    limit: int | None = None,
) -> list[TextRecord]:
    """Questions in file order, with their answers when `annotations_path` is given.

    The whole file is checked before `limit` applies, so a bad file fails the same way
    whatever the limit.
    """
    questions = _read_questions(Path(questions_path))
    annotations: dict[int, _Annotation] = {}
    if annotations_path is not None:
        annotations = _read_annotations(Path(annotations_path))
        _check_match(questions, annotations, Path(questions_path), Path(annotations_path))
    if annotations:
        records = [_record(questions[qid], ann) for qid, ann in annotations.items()]
    else:
        records = [_record(q, None) for q in questions.values()]
    return apply_limit(records, limit)


def _read_questions(path: Path) -> dict[int, dict[str, Any]]:
    """{question_id: question}, each checked for its three fields."""
    by_id: dict[int, dict[str, Any]] = {}
    for index, item in enumerate(_top_list(path, "questions")):
        record = _record_id(item, index)
        qid = get_field(item, "question_id", int, path, record)
        get_field(item, "image_id", int, path, record)
        get_field(item, "question", str, path, record)
        _add_unique(by_id, qid, item, path)
    return by_id


def _read_annotations(path: Path) -> dict[int, _Annotation]:
    """{question_id: annotation}, each checked for the fields the records use."""
    by_id: dict[int, _Annotation] = {}
    for index, item in enumerate(_top_list(path, "annotations")):
        record = _record_id(item, index)
        qid = get_field(item, "question_id", int, path, record)
        image_id = get_field(item, "image_id", int, path, record)
        extra: dict[str, Any] = {
            name: get_field(item, name, str, path, record) for name in _EXTRA_FIELDS
        }
        raw_answers = get_field(item, "answers", list, path, record)
        answers = _answers(raw_answers, path, record)
        annotators = _annotators(raw_answers)
        if annotators is not None:
            extra["annotators"] = annotators
        _add_unique(by_id, qid, _Annotation(image_id, answers, extra), path)
    return by_id


def _answers(answers: list[Any], path: Path, record: object) -> tuple[str, ...]:
    # One comprehension for the usual clean list; get_field only to word the error.
    texts = tuple(a.get("answer") if type(a) is dict else None for a in answers)
    if not all(type(text) is str for text in texts):
        for answer in answers:
            get_field(answer, "answer", str, path, record)
    return texts


def _annotators(answers: list[dict[str, Any]]) -> tuple[int, ...] | None:
    """None when the answer records are pairwise distinct apart from their text (distinct
    answer_id, as in the released files); else, per record, the index of the first record equal
    to it apart from "answer" (vqaEval.py's leave-one-out compares whole records)."""
    ids = [a.get("answer_id") for a in answers]
    try:
        if None not in ids and len(set(ids)) == len(ids):
            return None
    except TypeError:  # an unhashable answer_id: compare the records
        pass
    rests = [{k: v for k, v in a.items() if k != "answer"} for a in answers]
    labels = [next(j for j in range(i + 1) if rests[j] == rest) for i, rest in enumerate(rests)]
    return None if labels == list(range(len(labels))) else tuple(labels)


def _top_list(path: Path, name: str) -> list[Any]:
    """The list under `name` in the file's top-level object."""
    data = load_json(path)
    if not isinstance(data, dict):
        reason = f'expected an object with a "{name}" list, got {type(data).__name__}'
        raise AnnotationError(path, "top level", reason)
    return get_field(data, name, list, path, "top level")


def _record_id(item: object, index: int) -> object:
    """The question_id to name in errors, or the list index when there is none."""
    qid = item.get("question_id") if isinstance(item, dict) else None
    return qid if isinstance(qid, (int, str)) else f"index {index}"


def _add_unique(by_id: dict[int, Any], qid: int, item: Any, path: Path) -> None:
    if qid in by_id:
        raise AnnotationError(path, qid, "duplicate question_id")
    by_id[qid] = item


def _check_match(
    questions: dict[int, Any], annotations: dict[int, _Annotation], q_path: Path, a_path: Path
) -> None:
    """Every question has an annotation on the same image, and every annotation a question."""
    unanswered = sorted(questions.keys() - annotations.keys())
    if unanswered:
        reason = f"question has no annotation in {a_path.name}{_more(unanswered)}"
        raise AnnotationError(q_path, unanswered[0], reason)
    orphans = sorted(annotations.keys() - questions.keys())
    if orphans:
        reason = f"annotation has no question in {q_path.name}{_more(orphans)}"
        raise AnnotationError(a_path, orphans[0], reason)
    for qid, annotation in annotations.items():
        q_image, a_image = questions[qid]["image_id"], annotation.image_id
        if q_image != a_image:
            reason = f"image_id {a_image} differs from {q_image} in {q_path.name}"
            raise AnnotationError(a_path, qid, reason)


def _more(ids: list[int]) -> str:
    return f" (and {len(ids) - 1} more)" if len(ids) > 1 else ""


def _record(question: dict[str, Any], annotation: _Annotation | None) -> TextRecord:
    return TextRecord(
        key=str(question["question_id"]),
        text=question["question"],
        image_keys=(str(question["image_id"]),),
        answers=() if annotation is None else annotation.answers,
        extra={} if annotation is None else dict(annotation.extra),
    )
