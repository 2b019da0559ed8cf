"""Box-selection policies: which regions of one image become its stored features.

Each policy maps a `Detections` to a `BoxSelection` padded to a fixed number of rows, and is
recorded by name (a plain dict, since the name ends up in the cache's attributes):

- `caffe`: the original BUTD rule (peteanderson80 generate_tsv.py:84-95, LXMERT, MILVLG). For
  every class, NMS at 0.3 on the unregressed proposals with that class's scores; per proposal
  keep the best score that survived; keep proposals >= 0.2, at least 36 and at most 36 (best
  first when clamped). Boxes: proposals mapped back to the image.
- `maxnms`: the detectron2 / HF port (py-bottom-up-attention demo, HF modeling_frcnn.py:116-140
  and :1191-1203): per proposal its best class and that class's regressed box; class-agnostic
  NMS at rising thresholds until `min_boxes` survive, at most `num_boxes` kept.
- `adaptive`: the `caffe` rule with 10 to 100 boxes (UNITER, VinVL), zero padded to 100.

`scale` maps boxes back to original pixels: one factor (Caffe's im_scale) or a (sy, sx) pair
(the HF port's per-axis ratios); original = input / scale.

Class ids are 0-based over the C object classes (background dropped); attribute ids 0-based
over the A attributes ("no attribute" dropped). Confidences are the chosen ids' probabilities
in `Detections` (the attribute rule is the model's conventions.attr_conf_with_none).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
from torch import Tensor

from vlpipe.errors import ConfigError

from .boxes import batched_nms_convention, nms_convention
from .model import Detections

MAXNMS_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
Scale = float | tuple[float, float]


def to_original(boxes: Tensor, scale: Scale) -> Tensor:
    """(..., 4) boxes in network-input pixels -> original pixels: / scale, or / (sy, sx)."""
    if isinstance(scale, (int, float)):
        return boxes / scale
    sy, sx = scale
    return boxes / boxes.new_tensor([sx, sy, sx, sy])


@dataclass
class BoxSelection:
    """K = max boxes rows; rows past `num_boxes` are zero (indices -1)."""

    policy: str
    indices: Tensor  # K  int64 proposal index
    features: Tensor  # K, D float32
    boxes: Tensor  # K, 4 float32 absolute xyxy in original-image pixels
    obj_ids: Tensor  # K  int64
    obj_conf: Tensor  # K  float32
    attr_ids: Tensor  # K  int64
    attr_conf: Tensor  # K  float32
    num_boxes: int

    def as_arrays(self) -> dict[str, np.ndarray | int]:
        """NumPy copies of the per-box fields, plus `num_boxes`."""
        names = ("features", "boxes", "obj_ids", "obj_conf", "attr_ids", "attr_conf")
        out: dict[str, np.ndarray | int] = {
            n: getattr(self, n).detach().cpu().numpy() for n in names
        }
        out["num_boxes"] = self.num_boxes
        return out


def per_class_max_score(
    boxes: Tensor,
    scores: Tensor,
    *,
    iou: float,
    plus_one: bool = False,
    score_floor: float = 0.0,
) -> Tensor:
    """boxes (R, 4), scores (R, C) -> (R,): for each box, its best score among the classes in
    whose NMS it survives (0 if none), all C NMS runs in one `batched_nms` call.

    Only (box, class) pairs scoring >= `score_floor` take part. A pair's survival depends only
    on higher-scoring pairs of its class, so every result >= `score_floor` is exact; results
    below it read as 0. A floor of 0 runs all R * C pairs.
    """
    prop, cls = (scores >= score_floor).nonzero(as_tuple=True)
    cand = scores[prop, cls]
    keep = batched_nms_convention(boxes[prop], cand, cls, iou, plus_one=plus_one)
    best = scores.new_zeros(scores.shape[0])
    return best.scatter_reduce(0, prop[keep], cand[keep], reduce="amax")


def _caffe_max_conf(
    boxes: Tensor, scores: Tensor, *, iou: float, conf: float, min_boxes: int, plus_one: bool
) -> Tensor:
    # Running all R * C pairs is exact but slow (seconds on a CPU for 300 x 1600). Floors
    # first: the confidence threshold (enough when min_boxes clear it), then the scores of the
    # 2k-th, 16k-th, 128k-th best pairs; a floor is enough once min_boxes exact results clear
    # it, since then the best min_boxes are known exactly.
    needed = min(min_boxes, scores.shape[0])
    best = scores.new_zeros(scores.shape[0])
    for floor in _score_floors(scores, conf):
        best = per_class_max_score(boxes, scores, iou=iou, plus_one=plus_one, score_floor=floor)
        if floor <= 0 or int((best >= floor).sum()) >= needed:
            break
    return best


def _score_floors(
    scores: Tensor, conf: float, budgets: tuple[int, ...] = (2_048, 16_384, 131_072)
) -> list[float]:
    """Decreasing score floors ending at 0 (every pair)."""
    flat = scores.flatten()
    floors = [conf]
    for budget in budgets:
        if budget < flat.numel():
            floor = float(flat.topk(budget).values[-1])
            if 0 < floor < floors[-1]:
                floors.append(floor)
    return [*floors, 0.0]


def _caffe_keep(max_conf: Tensor, *, conf: float, min_boxes: int, max_boxes: int) -> Tensor:
    # generate_tsv.py: boxes above the threshold in proposal order when their count is within
    # bounds; otherwise the best min_boxes / max_boxes by score (stable for ties).
    above = (max_conf >= conf).nonzero().flatten()
    if min_boxes <= len(above) <= max_boxes:
        return above
    order = max_conf.sort(descending=True, stable=True).indices
    return order[: min_boxes if len(above) < min_boxes else max_boxes]


def select_caffe(
    det: Detections,
    *,
    scale: Scale,
    conf_threshold: float = 0.2,
    min_boxes: int = 36,
    max_boxes: int = 36,
    nms_threshold: float = 0.3,
    plus_one: bool = False,
    policy: str = "caffe",
) -> BoxSelection:
    """The original BUTD rule on unregressed proposals (see the module docstring)."""
    scores = det.class_probs[:, :-1]
    boxes = to_original(det.proposals, scale)
    max_conf = _caffe_max_conf(
        boxes,
        scores,
        iou=nms_threshold,
        conf=conf_threshold,
        min_boxes=min_boxes,
        plus_one=plus_one,
    )
    keep = _caffe_keep(max_conf, conf=conf_threshold, min_boxes=min_boxes, max_boxes=max_boxes)
    return _gather(det, keep, boxes, policy=policy, rows=max_boxes)


def select_maxnms(
    det: Detections,
    *,
    scale: Scale,
    num_boxes: int = 36,
    min_boxes: int | None = None,
    thresholds: tuple[float, ...] = MAXNMS_THRESHOLDS,
    plus_one: bool = False,
) -> BoxSelection:
    """Best class per proposal, its regressed box, class-agnostic NMS at each threshold in turn,
    keeping at most `num_boxes`, until `min_boxes` (default `num_boxes`) survive; the last
    threshold's survivors otherwise (where the HF port fails: modeling_frcnn.py:1191-1203)."""
    needed = num_boxes if min_boxes is None else min_boxes
    max_scores, max_classes = det.class_probs[:, :-1].max(dim=1)
    boxes = det.boxes[torch.arange(len(det), device=det.boxes.device), max_classes]
    keep = max_scores.new_zeros(0, dtype=torch.int64)
    for threshold in thresholds:
        keep = nms_convention(boxes, max_scores, threshold, plus_one=plus_one)[:num_boxes]
        if len(keep) >= needed:
            break
    return _gather(det, keep, to_original(boxes, scale), policy="maxnms", rows=num_boxes)


select_adaptive = partial(select_caffe, min_boxes=10, max_boxes=100, policy="adaptive")

POLICIES: dict[str, Callable[..., BoxSelection]] = {
    "caffe": select_caffe,
    "maxnms": select_maxnms,
    "adaptive": select_adaptive,
}


def select_boxes(
    det: Detections, *, scale: Scale, policy: str = "caffe", **options
) -> BoxSelection:
    """Apply the policy named `policy` (a key of `POLICIES`) to one image's detections."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown box policy {policy!r}; expected one of {sorted(POLICIES)}")
    return POLICIES[policy](det, scale=scale, **options)


def select_given(det: Detections, boxes: Tensor, *, rows: int) -> BoxSelection:
    """Every region of `det` in order (the head run at given boxes, `boxes` in original
    pixels), zero padded to `rows`."""
    keep = torch.arange(len(det), device=det.features.device)
    return _gather(det, keep, boxes, policy="given", rows=rows)


def _gather(
    det: Detections, keep: Tensor, boxes: Tensor, *, policy: str, rows: int
) -> BoxSelection:
    """Per-box fields of the kept proposals, zero padded to `rows`."""
    obj_conf, obj_ids = _best(det.class_probs[keep, :-1])
    attr_conf, attr_ids = _best(det.attr_probs[keep, :-1])
    fields = dict(
        indices=keep,
        features=det.features[keep].float(),
        boxes=boxes[keep].float(),
        obj_ids=obj_ids,
        obj_conf=obj_conf.float(),
        attr_ids=attr_ids,
        attr_conf=attr_conf.float(),
    )
    padded = {name: _pad(value, rows) for name, value in fields.items()}
    padded["indices"][len(keep) :] = -1
    return BoxSelection(policy=policy, num_boxes=len(keep), **padded)


def _best(probs: Tensor) -> tuple[Tensor, Tensor]:
    if probs.shape[0] == 0:
        return probs.new_zeros(0), torch.zeros(0, dtype=torch.int64, device=probs.device)
    return probs.max(dim=1)


def _pad(value: Tensor, rows: int) -> Tensor:
    out = value.new_zeros((rows, *value.shape[1:]))
    out[: len(value)] = value[:rows]
    return out
