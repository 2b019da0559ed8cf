"""Box arithmetic: cell anchors, delta decoding, clipping, the small-box filter, NMS.

`plus_one` everywhere means Caffe's inclusive-pixel arithmetic (a box from x1 to x2 is
x2 - x1 + 1 pixels wide). Which call gets it is decided by the checkpoint's `BoxConvention`
(anchors, decoding: how the weights were trained) or by the `FrcnnConventions` set (clipping,
filter, NMS: which test-time pipeline is reproduced).

All boxes are absolute (x1, y1, x2, y2) float tensors of shape (N, 4).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from .config import BoxConvention

# detectron2 / HF keep exp() finite: no delta may grow a box more than a 16 px anchor growing
# to 1000 px. Caffe's bbox_transform_inv has no cap (conventions.delta_clamp None).
SCALE_CLAMP = math.log(1000.0 / 16)


def cell_anchors(
    sizes: Sequence[float], ratios: Sequence[float], stride: int, convention: BoxConvention
) -> Tensor:
    """Anchors of one feature-map cell, (len(sizes) * len(ratios), 4), in the order the
    checkpoint's objectness / delta channels expect."""
    if convention.anchors_caffe_rounded:
        return _caffe_cell_anchors(sizes, ratios, stride)
    return _detectron2_cell_anchors(sizes, ratios, ratio_major=convention.anchors_ratio_major)


def _detectron2_cell_anchors(
    sizes: Sequence[float], ratios: Sequence[float], *, ratio_major: bool
) -> Tensor:
    # Exact areas size**2, aspect ratio h / w, centred on the cell's top-left corner.
    pairs = (
        [(s, r) for r in ratios for s in sizes]
        if ratio_major
        else [(s, r) for s in sizes for r in ratios]
    )
    rows = []
    for size, ratio in pairs:
        w = math.sqrt(size * size / ratio)
        h = ratio * w
        rows.append([-w / 2, -h / 2, w / 2, h / 2])
    return torch.tensor(rows, dtype=torch.float32)


def _caffe_cell_anchors(sizes: Sequence[float], ratios: Sequence[float], stride: int) -> Tensor:
    # py-faster-rcnn generate_anchors: start from the stride x stride base box [0, 0, 15, 15],
    # round its width and height for each ratio, then multiply by each scale (size / stride).
    # Ratio-major; centred at (stride - 1) / 2 = 7.5 with "+1" inclusive widths.
    centre = (stride - 1) / 2.0
    rows = []
    for ratio in ratios:
        base_w = round(math.sqrt(stride * stride / ratio))
        base_h = round(base_w * ratio)
        for size in sizes:
            scale = size / stride
            w, h = base_w * scale, base_h * scale
            rows.append(
                [
                    centre - (w - 1) / 2,
                    centre - (h - 1) / 2,
                    centre + (w - 1) / 2,
                    centre + (h - 1) / 2,
                ]
            )
    return torch.tensor(rows, dtype=torch.float32)


def grid_anchors(cell: Tensor, height: int, width: int, stride: int) -> Tensor:
    """All anchors of an (height, width) feature map, (height * width * A, 4), ordered
    (row, column, anchor) to match `(A, H, W)` head outputs permuted to `(H, W, A)`."""
    ys = torch.arange(height, device=cell.device, dtype=cell.dtype) * stride
    xs = torch.arange(width, device=cell.device, dtype=cell.dtype) * stride
    shift_y, shift_x = torch.meshgrid(ys, xs, indexing="ij")
    shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
    return (shifts + cell.reshape(1, -1, 4)).reshape(-1, 4)


def decode(
    deltas: Tensor,
    boxes: Tensor,
    weights: Sequence[float],
    *,
    plus_one: bool = False,
    clamp: float | None = SCALE_CLAMP,
) -> Tensor:
    """Apply (N, k * 4) deltas (dx, dy, dw, dh per box) to (N, 4) boxes -> (N, k * 4);
    dw, dh capped at `clamp` (None: no cap)."""
    one = 1.0 if plus_one else 0.0
    boxes = boxes.to(deltas.dtype)
    widths = (boxes[:, 2] - boxes[:, 0] + one)[:, None]
    heights = (boxes[:, 3] - boxes[:, 1] + one)[:, None]
    ctr_x = boxes[:, 0:1] + 0.5 * widths
    ctr_y = boxes[:, 1:2] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
    dw, dh = deltas[:, 2::4] / ww, deltas[:, 3::4] / wh
    if clamp is not None:
        dw, dh = dw.clamp(max=clamp), dh.clamp(max=clamp)
    cx, cy = dx * widths + ctr_x, dy * heights + ctr_y
    half_w, half_h = 0.5 * torch.exp(dw) * widths, 0.5 * torch.exp(dh) * heights
    out = torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1)
    return out.reshape(deltas.shape)


def clip(boxes: Tensor, height: int, width: int, *, plus_one: bool = False) -> Tensor:
    """Clip (..., 4) boxes to the image; Caffe's inclusive pixels end at size - 1."""
    one = 1.0 if plus_one else 0.0
    x = boxes[..., 0::2].clamp(min=0, max=width - one)
    y = boxes[..., 1::2].clamp(min=0, max=height - one)
    return torch.stack([x[..., 0], y[..., 0], x[..., 1], y[..., 1]], dim=-1)


def large_enough(boxes: Tensor, min_size: float, *, plus_one: bool = False) -> Tensor:
    """Mask (N,) of boxes whose both sides pass `min_size`: Caffe w + 1 >= m
    (proposal_layer.py:180-184), detectron2 / HF w > m (modeling_frcnn.py:152-156)."""
    widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    if plus_one:
        return (widths + 1 >= min_size) & (heights + 1 >= min_size)
    return (widths > min_size) & (heights > min_size)


def _for_nms(boxes: Tensor, plus_one: bool) -> Tensor:
    # Caffe's NMS counts inclusive pixels: areas (w + 1)(h + 1). Growing x2, y2 by one makes
    # torchvision's IoU match it (199/200 random trials; the spec's measurement).
    return boxes + boxes.new_tensor([0.0, 0.0, 1.0, 1.0]) if plus_one else boxes


def nms_convention(boxes: Tensor, scores: Tensor, iou: float, *, plus_one: bool = False) -> Tensor:
    """Indices kept by NMS, in decreasing score order."""
    return nms(_for_nms(boxes, plus_one), scores, iou)


def batched_nms_convention(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou: float, *, plus_one: bool = False
) -> Tensor:
    """Per-group NMS in one torchvision call; indices kept, in decreasing score order."""
    return batched_nms(_for_nms(boxes, plus_one), scores, groups, iou)
