"""Boxes a dataset gives (`vlpipe extract --backbone frcnn --boxes FROM`), at which the detector's
region head pools features instead of at its own proposals.

FROM is `metadata` (each image's <name>.json beside it, as VCR ships them: {"boxes": [[x1, y1,
x2, y2, score], ...], ...}), or a JSON file {image key: [[x1, y1, x2, y2], ...]} (GQA / Visual
Genome scene-graph boxes, Flickr30k Entities, converted to that form). Boxes are absolute xyxy
in original-image pixels (a fifth value, a score, is ignored). Every image gets the whole
image as region 0 and its given box i as region i + 1, in the order given, so a reference to
object i (VCR's tokens) reads region i + 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlpipe.data_manifests.base import AnnotationError, ImageRecord, load_json
from vlpipe.errors import ConfigError

METADATA = "metadata"


def read_given_boxes(source: str, records: list[ImageRecord]) -> dict[str, np.ndarray]:
    """{image key: (N, 4) float32 xyxy} for every record, checked; errors name the file and
    the image."""
    if source == METADATA:
        return {r.key: _metadata_boxes(Path(r.path).with_suffix(".json"), r.key) for r in records}
    path = Path(source)
    table = load_json(path)
    if not isinstance(table, dict):
        raise AnnotationError(
            path, "top level", "expected an object {image key: [[x1, y1, x2, y2]]}"
        )
    missing = [r.key for r in records if r.key not in table]
    if missing:
        raise ConfigError(
            f"--boxes {path}: no boxes for {len(missing)} of the {len(records)} images, e.g. "
            f"{missing[:5]}"
        )
    return {r.key: _boxes(table[r.key], path, f"image {r.key}") for r in records}


def _metadata_boxes(path: Path, key: str) -> np.ndarray:
    if not path.is_file():
        raise ConfigError(f"--boxes metadata: {path} (the metadata of image {key}) does not exist")
    meta = load_json(path)
    if not isinstance(meta, dict) or "boxes" not in meta:
        raise AnnotationError(path, f"image {key}", "expected an object with 'boxes'")
    return _boxes(meta["boxes"], path, f"image {key}")


def _boxes(value, path: Path, where: str) -> np.ndarray:
    """[[x1, y1, x2, y2(, score)], ...] -> (N, 4) float32, each box well formed."""
    try:
        rows = [[float(v) for v in box] for box in value]
    except (TypeError, ValueError):
        raise AnnotationError(
            path, where, f"boxes should be lists of numbers, got {json.dumps(value)[:80]}"
        ) from None
    for i, box in enumerate(rows):
        if len(box) not in (4, 5) or not (box[0] <= box[2] and box[1] <= box[3]):
            raise AnnotationError(path, where, f"box {i} {box} is not [x1, y1, x2, y2(, score)]")
    return np.asarray([box[:4] for box in rows], dtype=np.float32).reshape(-1, 4)
