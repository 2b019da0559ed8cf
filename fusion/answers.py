"""Answer vocabularies and soft training targets (BUTD / LXMERT convention).

Follows hengyuan-hu/bottom-up-attention-vqa, tools/compute_softscore.py: answers are normalised
with `preprocess_answer`, each candidate scores soft_score(#annotators who gave it), and the VQA
vocabulary is every normalised `multiple_choice_answer` seen on at least 9 questions over
train+val (3,129 answers). The loss is binary cross-entropy against these scores.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from vlpipe.errors import InputError

from .metrics import process_digit_article, process_punctuation

# soft_score for 1, 2, 3 annotators; 4 or more give full credit. These equal the official VQA
# accuracy of an answer given by that many of 10 annotators.
_PARTIAL_SCORES = (0.0, 0.3, 0.6, 0.9)


def preprocess_answer(answer: str) -> str:
    """compute_softscore.preprocess_answer: the VQA eval normalisation, then commas removed.

    Unlike vqaEval.py it does not strip the text or turn tabs/newlines into spaces first, which
    can change how a punctuation mark next to them is treated.
    """
    return process_digit_article(process_punctuation(answer)).replace(",", "")


def soft_score(count: int) -> float:
    """Target score of an answer given by `count` annotators: 0, 0.3, 0.6, 0.9, then 1.0."""
    if count < 0:
        raise ValueError(f"annotator count must be >= 0, got {count}")
    return _PARTIAL_SCORES[count] if count < len(_PARTIAL_SCORES) else 1.0


def target_scores(answers: Sequence[str]) -> dict[str, float]:
    """Soft scores of the normalised human answers of one question, {answer: score}."""
    counts = Counter(preprocess_answer(ans) for ans in answers)
    return {ans: soft_score(count) for ans, count in counts.items()}


class AnswerVocab:
    """An ordered answer list with its reverse index; position i is classifier output i."""

    def __init__(self, answers: Sequence[str]) -> None:
        self.answers = list(answers)
        self._index = {ans: i for i, ans in enumerate(self.answers)}
        if len(self._index) != len(self.answers):
            dupes = sorted(ans for ans, n in Counter(self.answers).items() if n > 1)
            raise InputError(f"duplicate answers in vocabulary: {dupes[:5]}")

    @classmethod
    def build(cls, answers_per_question: Iterable[str], min_count: int) -> AnswerVocab:
        """Answers given for at least `min_count` questions, most frequent first.

        Pass one answer per question, already in its final form (VQA: preprocess_answer of
        multiple_choice_answer; GQA / easy-VQA: the answer as is). Ties are broken
        alphabetically so the order, and hence the classifier layout, is reproducible.
        """
        counts = Counter(answers_per_question)
        kept = [ans for ans, n in counts.items() if n >= min_count]
        return cls(sorted(kept, key=lambda ans: (-counts[ans], ans)))

    def __len__(self) -> int:
        return len(self.answers)

    def __contains__(self, ans: object) -> bool:
        return ans in self._index

    def index(self, ans: str) -> int | None:
        """Class index of `ans`, or None when it is not in the vocabulary."""
        return self._index.get(ans)

    def answer(self, i: int) -> str:
        return self.answers[i]

    def to_json(self) -> list[str]:
        """A plain list of answers, in class order."""
        return list(self.answers)

    @classmethod
    def from_json(cls, data: Sequence[str]) -> AnswerVocab:
        if not isinstance(data, list) or not all(isinstance(ans, str) for ans in data):
            raise InputError("an answer vocabulary is stored as a JSON list of strings")
        return cls(data)

    def encode_scores(self, scores: Mapping[str, float]) -> np.ndarray:
        """Dense float32 target [len(self)] from {answer: score}; unknown answers are dropped
        (BUTD drops them too, so some questions get an all-zero target)."""
        target = np.zeros(len(self), dtype=np.float32)
        for ans, score in scores.items():
            i = self._index.get(ans)
            if i is not None:
                target[i] = score
        return target
