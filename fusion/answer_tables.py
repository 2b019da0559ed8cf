"""Answer lists written by LXMERT, and moving an answer head's rows from one list to another.

Formats (`read_answer_list`):
- a JSON list of answers, index = class: LXMERT's data/{vqa,gqa}/trainval_label2ans.json;
- a JSON object {answer: class}: trainval_ans2label.json;
- LXMERT's pre-training answer table, data/lxmert/all_ans.json: a list of
  {"ans": answer, "dsets": [datasets]}, whose index is the row of the pre-trained QA head
  (9,500 answers). Answers are looked up in it after `lxmert_convert_answer`, as
  src/pretrain/qa_answer_table.py (`AnswerTable.convert_ans`, `load_lxmert_qa`) does.

`build_pretrain_table` builds such a table from the pre-training labels themselves, and
`qa_label_ids` turns one sentence's {answer: score} into the rows of a table.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from vlpipe.errors import ConfigError, InputError

# AnswerTable.ANS_CONVERT: the spellings the pre-training table merged
_CONVERT = {
    "a man": "man",
    "the man": "man",
    "a woman": "woman",
    "the woman": "woman",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "grey": "gray",
}


@dataclass
class AnswerList:
    """Answers in class order; `pretraining` marks LXMERT's all_ans.json table."""

    source: str
    answers: list[str]
    pretraining: bool = False

    def key(self, answer: str) -> str:
        """How an answer of another list is looked up in this one."""
        return lxmert_convert_answer(answer) if self.pretraining else answer

    @cached_property
    def positions(self) -> dict[str, int]:
        """{answer: class}, the first one for an answer listed twice; built on first use, so
        `answers` must not change after it."""
        return {answer: i for i, answer in reversed(list(enumerate(self.answers)))}


def lxmert_convert_answer(answer: str) -> str:
    """AnswerTable.convert_ans: lower case, one trailing '.' and a leading article dropped, then
    the table's merged spellings ('two' -> '2', 'grey' -> 'gray', ...)."""
    if not answer:
        return ""
    answer = answer.lower()
    if answer[-1] == ".":
        answer = answer[:-1].strip()
    for article in ("a ", "an ", "the "):
        if answer.startswith(article):
            answer = answer[len(article) :].strip()
    return _CONVERT.get(answer, answer)


def read_answer_list(path: str | Path) -> AnswerList:
    """Any of the formats above; an unreadable or malformed file is a ValueError naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: cannot read an answer list ({err})") from err
    if isinstance(data, dict):
        return AnswerList(str(path), _from_ans2label(data, path))
    if isinstance(data, list) and all(isinstance(a, str) for a in data):
        return AnswerList(str(path), list(data))
    if isinstance(data, list) and all(isinstance(a, dict) and "ans" in a for a in data):
        return AnswerList(str(path), [str(a["ans"]) for a in data], pretraining=True)
    raise InputError(
        f"{path}: not an answer list (a JSON list of answers, an {{answer: index}} object, or "
        "LXMERT's all_ans.json)"
    )


def build_pretrain_table(
    labels: Iterable[dict[str, float] | None], min_count: int = 1
) -> AnswerList:
    """A pre-training answer table from the data's QA labels: answers normalised with
    `lxmert_convert_answer`, counted once per sentence they appear in, kept when seen in at
    least `min_count` sentences, most frequent first (ties alphabetical, so the head's rows are
    reproducible). None labels (captions) count for nothing."""
    if min_count < 1:
        raise ConfigError(f"min_count must be >= 1, got {min_count}")
    counts: Counter[str] = Counter()
    for label in labels:
        if label:
            counts.update({lxmert_convert_answer(answer) for answer in label})
    kept = [answer for answer, n in counts.items() if n >= min_count]
    kept.sort(key=lambda answer: (-counts[answer], answer))
    return AnswerList("built from the data", kept, pretraining=True)


def qa_label_ids(
    label: dict[str, float] | None, table: AnswerList
) -> tuple[list[int], list[float]]:
    """The classes of `table` a label's answers map to (after `table.key`), and their scores.

    Answers not in the table are dropped, as LXMERT's LXMERTDataset drops them; two answers that
    normalise to one class keep the higher score. A caption (None) has no classes.
    """
    scores: dict[int, float] = {}
    for answer, score in (label or {}).items():
        row = table.positions.get(table.key(answer))
        if row is not None:
            scores[row] = max(score, scores.get(row, score))
    return list(scores), list(scores.values())


def _from_ans2label(data: dict, path: Path) -> list[str]:
    if sorted(data.values()) != list(range(len(data))):
        raise InputError(
            f"{path}: an {{answer: index}} object needs the indices 0..{len(data) - 1}"
        )
    return sorted(data, key=data.__getitem__)


@dataclass
class RowTransfer:
    """How many of the new answers found a row in the old head."""

    source: str
    found: int = 0
    not_found: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        total = self.found + len(self.not_found)
        text = f"answer head: {self.found} of {total} answers transferred from {self.source}"
        if self.not_found:
            more = f" (+{len(self.not_found) - 8} more)" if len(self.not_found) > 8 else ""
            text += (
                f"; {len(self.not_found)} not found start at zero weight and bias: "
                f"{', '.join(map(repr, self.not_found[:8]))}{more}"
            )
        return text


def transfer_rows(
    weight: torch.Tensor, bias: torch.Tensor, old: AnswerList, new: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor, RowTransfer]:
    """The last Linear of an answer head for the answers `new`, from one over `old.answers`:
    row i is the old row of new[i] (looked up with `old.key`), zero weight and bias when the old
    list lacks it (LXMERT's load_lxmert_qa)."""
    if weight.shape[0] != len(old.answers):
        raise InputError(
            f"{old.source} lists {len(old.answers)} answers, the checkpoint's answer head has "
            f"{weight.shape[0]}"
        )
    index = {answer: i for i, answer in reversed(list(enumerate(old.answers)))}
    new_weight = weight.new_zeros(len(new), weight.shape[1])
    new_bias = bias.new_zeros(len(new))
    report = RowTransfer(old.source)
    for i, answer in enumerate(new):
        row = index.get(old.key(answer))
        if row is None:
            report.not_found.append(answer)
            continue
        new_weight[i], new_bias[i] = weight[row], bias[row]
        report.found += 1
    return new_weight, new_bias, report
