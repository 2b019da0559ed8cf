"""Small files in the VCR formats: vcr1images/<movie>/<frame>.jpg with their metadata json, and
{train,val,test}.jsonl items whose tokens refer to the frames' objects."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import write_image

MOVIES = ("lsmdc_0001_A", "lsmdc_0002_B")
OBJECTS = ["person", "person", "car", "dog"]
WORDS = ("red", "blue", "green", "small", "tall", "old", "new", "happy")


def frames(n: int = 6) -> list[str]:
    """img_fn of frame i: "<movie>/<movie>_<i>@0.jpg", alternating movies."""
    return [f"{MOVIES[i % 2]}/{MOVIES[i % 2]}_{i:02d}@0.jpg" for i in range(n)]


def write_images(root: Path, n: int = 6) -> Path:
    """vcr1images/ under `root`: n frames (40 x 30) and their metadata (a box per object)."""
    images = root / "vcr1images"
    for i, img_fn in enumerate(frames(n)):
        write_image(images / img_fn, size=(40, 30), seed=i)
        boxes = [[2.0 + j, 3.0, 20.0 + 4 * j, 25.0, 0.9] for j in range(len(OBJECTS))]
        meta = {"boxes": boxes, "segms": [[] for _ in OBJECTS], "names": OBJECTS}
        meta |= {"width": 40, "height": 30}
        (images / img_fn).with_suffix(".json").write_text(json.dumps(meta))
    return images


def item(i: int, img_fn: str, labelled: bool = True) -> dict:
    """Item i: answer i % 4 and rationale (i + 1) % 4 are the right ones."""
    word = WORDS[i % len(WORDS)]
    answers = [[[0], "is", WORDS[(i + k) % len(WORDS)], "."] for k in range(4)]
    rationales = [["because", [2, 3], "look", WORDS[(i + k) % len(WORDS)]] for k in range(4)]
    out = {
        "annot_id": f"x-{i}",
        "img_fn": img_fn,
        "metadata_fn": img_fn.replace(".jpg", ".json"),
        "objects": OBJECTS,
        "question": ["What", "is", [0, 1], f"{word}?"],
        "answer_choices": answers,
        "rationale_choices": rationales,
    }
    if labelled:
        out |= {"answer_label": i % 4, "rationale_label": (i + 1) % 4}
    return out


def write_split(path: Path, n: int, labelled: bool = True, first: int = 0) -> Path:
    imgs = frames(6)
    lines = [json.dumps(item(first + i, imgs[(first + i) % 6], labelled)) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path
