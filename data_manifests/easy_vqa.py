"""easy-VQA questions, read through the installed `easy_vqa` package (real data, on PyPI).

`get_{train,test}_questions()` return three parallel lists (texts, answers, image_ids):
38,575 train and 9,673 test questions on 4,000 / 1,000 64x64 PNGs, 13 possible answers.
Train and test image ids both start at 0, so keys carry the split.

Records: key = "{split}/q{index}" (index into the lists); image_keys = ("{split}/{image_id}",),
the `easy-vqa` listing's key; answers = (answer,); extra["answer_type"] = yes/no | color | shape
(the package has no types; they follow from the answer, like VQA's answer_type).
"""

from __future__ import annotations

from vlpipe.errors import ConfigError

from .base import TextRecord, apply_limit

SPLITS = ("train", "test")
SHAPES = frozenset({"circle", "rectangle", "triangle"})


def answer_type(answer: str) -> str:
    """yes/no, shape or color: the kind of question an easy-VQA answer answers."""
    if answer in ("yes", "no"):
        return "yes/no"
    return "shape" if answer in SHAPES else "color"


def read_easy_vqa(split: str = "train", limit: int | None = None) -> list[TextRecord]:
    """The split's questions in the package's order."""
    if split not in SPLITS:
        raise ConfigError(f"easy-vqa split must be 'train' or 'test', got {split!r}")
    import easy_vqa as package  # lazy: the registry (and every CLI command) imports this module

    getter = package.get_train_questions if split == "train" else package.get_test_questions
    texts, answers, image_ids = getter()
    rows = apply_limit(list(zip(texts, answers, image_ids, strict=True)), limit)
    return [
        TextRecord(
            key=f"{split}/q{index}",
            text=text,
            image_keys=(f"{split}/{image_id}",),
            answers=(answer,),
            extra={"answer_type": answer_type(answer)},
        )
        for index, (text, answer, image_id) in enumerate(rows)
    ]


def easy_vqa_answers() -> list[str]:
    """The 13 answers, in the package's order (a fixed class index for classifiers)."""
    import easy_vqa as package

    return package.get_answers()
