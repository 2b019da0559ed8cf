"""VCR (Visual Commonsense Reasoning): {train,val,test}.jsonl, one item per line, and the
per-image metadata json beside each image (vcr1images/<movie>/<frame>.json).

    {"annot_id": "val-0", "img_fn": "lsmdc_3005_X/3005_X_00.27.43.141-00.27.45.534@0.jpg",
     "metadata_fn": "lsmdc_3005_X/3005_X_00.27.43.141-00.27.45.534@0.json",
     "objects": ["person", "person", "car"],
     "question": ["Why", "is", [0], "smiling", "?"],
     "answer_choices": [[...], [...], [...], [...]], "rationale_choices": [4 token lists],
     "answer_label": 1, "rationale_label": 2}                  (labels absent in test)
    metadata: {"boxes": [[x1, y1, x2, y2, score], ...], "segms": [...], "names": [...],
               "width": int, "height": int}

A token is a word or a list of indices into `objects` (an object reference). References become
text (`render`): a person is called by a name of its own, one of `PERSON_NAMES` by its index in
`objects` (r2c and VL-BERT give each person a distinct gender-neutral name from this list; r2c
numbers the referenced objects only), any other object by its class name ("car"); a list of
several reads "Casey and Riley" ("A , B and C"). `refs` keeps, for each word of the rendered
text, the object it refers to (-1: none), so a model can tie the word to the object's box.

Records (multiple choice, `TextRecord.choices`), two for an item with labels:
  {annot_id}/answer          Q->A:  the question; choices "question [SEP] answer_i"; answer
                             answer_label ("0".."3")
  {annot_id}/rationale_a{j}  QA->R: the question and answer j (the right one, j =
                             answer_label); choices "question answer_j [SEP] rationale_i";
                             answer rationale_label
and five for an item without (test): the answer record and a rationale record conditioned on
each of the four answers (what the leaderboard asks for). extra: annot_id, mode ("answer" |
"rationale"), "given" (j), the objects and each choice's refs. Image key: img_fn (the `vcr`
listing's key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .base import AnnotationError, TextRecord, apply_limit, get_field, json_lines

# distinct gender-neutral names for the persons of an image (r2c's list, without its repeat)
PERSON_NAMES = (
    "Casey", "Riley", "Jessie", "Jackie", "Avery", "Jaime", "Peyton", "Kerry", "Jody",
    "Kendall", "Skyler", "Frankie", "Pat", "Quinn",
)  # fmt: skip
CHOICES = 4
SEP = "[SEP]"


def read_vcr(path: str | Path, limit: int | None = None) -> list[TextRecord]:
    """The records of every item in file order (`limit`: of the first items); errors name the
    file and line."""
    path = Path(path)
    seen: dict[str, int] = {}
    records: list[TextRecord] = []
    for lineno, raw in json_lines(path):
        item = VcrItem.parse(raw, path, lineno)
        if item.annot_id in seen:
            reason = f"annot_id {item.annot_id} repeats line {seen[item.annot_id]}"
            raise AnnotationError(path, f"line {lineno}", reason)
        seen[item.annot_id] = lineno
        records.append(item)
    return [rec for item in apply_limit(records, limit) for rec in item.records()]


def render(tokens: list, objects: list[str]) -> tuple[list[str], list[int]]:
    """VCR tokens -> (words, refs): each reference spelled out, refs[i] the object index word
    i names (-1 for the words of the sentence and the joining "and" / ",")."""
    words: list[str] = []
    refs: list[int] = []
    for token in tokens:
        if isinstance(token, str):
            words.append(token)
            refs.append(-1)
            continue
        for n, index in enumerate(token):
            if n:  # "A and B", "A , B and C"
                words.append("and" if n == len(token) - 1 else ",")
                refs.append(-1)
            words.append(object_name(objects, index))
            refs.append(index)
    return words, refs


def object_name(objects: list[str], index: int) -> str:
    name = objects[index]
    return PERSON_NAMES[index % len(PERSON_NAMES)] if name == "person" else name


class VcrItem:
    """One checked line of a VCR annotation file."""

    def __init__(self, **fields: Any):
        self.__dict__.update(fields)

    @classmethod
    def parse(cls, raw: Any, path: Path, lineno: int) -> VcrItem:
        where = f"line {lineno}"
        annot_id = get_field(raw, "annot_id", str, path, where)
        where = f"line {lineno} ({annot_id})"
        objects = get_field(raw, "objects", list, path, where)
        if not all(isinstance(o, str) for o in objects):
            raise AnnotationError(path, where, "field 'objects' should be a list of class names")
        item = cls(
            path=path,
            where=where,
            annot_id=annot_id,
            img_fn=get_field(raw, "img_fn", str, path, where),
            metadata_fn=get_field(raw, "metadata_fn", str, path, where, optional=True),
            objects=objects,
            question=_tokens(raw, "question", objects, path, where),
            answers=_choices(raw, "answer_choices", objects, path, where),
            rationales=_choices(raw, "rationale_choices", objects, path, where),
            answer_label=_label(raw, "answer_label", path, where),
            rationale_label=_label(raw, "rationale_label", path, where),
        )
        if (item.answer_label is None) != (item.rationale_label is None):
            raise AnnotationError(path, where, "has one of answer_label, rationale_label only")
        return item

    def records(self) -> list[TextRecord]:
        if self.answer_label is not None:
            return [self._answer(), self._rationale(self.answer_label)]
        return [self._answer()] + [self._rationale(j) for j in range(CHOICES)]

    def _record(self, name: str, mode: str, context: list, choices: list, label, given=None):
        words, refs = render(context, self.objects)
        texts, choice_refs = [], []
        for choice in choices:
            choice_words, choice_ref = render(choice, self.objects)
            texts.append(" ".join([*words, SEP, *choice_words]))
            choice_refs.append(tuple([*refs, -1, *choice_ref]))
        extra = {"annot_id": self.annot_id, "mode": mode, "objects": tuple(self.objects)}
        extra |= {"refs": tuple(choice_refs), "img_fn": self.img_fn}
        if given is not None:
            extra["given"] = given
        return TextRecord(
            key=f"{self.annot_id}/{name}",
            text=" ".join(words),
            image_keys=(self.img_fn,),
            answers=(str(label),) if label is not None else (),
            extra=extra,
            choices=tuple(texts),
        )

    def _answer(self) -> TextRecord:
        return self._record("answer", "answer", self.question, self.answers, self.answer_label)

    def _rationale(self, given: int) -> TextRecord:
        context = [*self.question, *self.answers[given]]
        label = self.rationale_label if given == self.answer_label else None
        name = f"rationale_a{given}"
        return self._record(name, "rationale", context, self.rationales, label, given)


def _tokens(raw: Any, name: str, objects: list[str], path: Path, where: str) -> list:
    tokens = get_field(raw, name, list, path, where)
    _check_tokens(tokens, objects, path, where, name)
    return tokens


def _choices(raw: Any, name: str, objects: list[str], path: Path, where: str) -> list[list]:
    choices = get_field(raw, name, list, path, where)
    if len(choices) != CHOICES or not all(isinstance(c, list) for c in choices):
        raise AnnotationError(path, where, f"field {name!r} should be {CHOICES} token lists")
    for i, choice in enumerate(choices):
        _check_tokens(choice, objects, path, where, f"{name}[{i}]")
    return choices


def _check_tokens(tokens: list, objects: list[str], path: Path, where: str, name: str) -> None:
    for token in tokens:
        if isinstance(token, str):
            continue
        ok = isinstance(token, list) and token and all(type(i) is int for i in token)
        if not ok:
            reason = f"{name}: token {token!r} is neither a word nor a list of object indices"
            raise AnnotationError(path, where, reason)
        bad = [i for i in token if not 0 <= i < len(objects)]
        if bad:
            reason = f"{name}: object reference {bad[0]} outside the {len(objects)} objects"
            raise AnnotationError(path, where, reason)


def _label(raw: Any, name: str, path: Path, where: str) -> int | None:
    label = get_field(raw, name, int, path, where, optional=True)
    if label is not None and not 0 <= label < CHOICES:
        raise AnnotationError(path, where, f"{name} {label} is not 0..{CHOICES - 1}")
    return label
