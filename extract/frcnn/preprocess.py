"""Image preprocessing of the BUTD detector under a `FrcnnConventions` set.

Pixels in the set's channel order minus its mean (divided by its std), then a bilinear resize
without antialiasing, sampled at pixel centres. Subtracting the mean before or after a
bilinear resize gives the same values (up to float rounding), so the Caffe order (mean first,
test.py:35) serves both sets.

`resize_plan` is the size rule: the output size, the scale the RPN's minimum proposal size is
measured in, and the per-axis factors that map boxes back to the original image. The
`caffe` rule (BUTD lib/fast_rcnn/test.py:44-50) and the `hf` rule (HF processing_image.py:47-60)
differ in where the long-side cap is tested and how sides are rounded; see conventions.py.

`preprocess` is a plain module-level function, so it pickles into DataLoader workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional as F

from .conventions import CAFFE, PIXEL_MEAN_BGR, FrcnnConventions

__all__ = ["PIXEL_MEAN_BGR", "ResizePlan", "preprocess", "resize_image", "resize_plan"]


@dataclass(frozen=True)
class ResizePlan:
    """How one image of the original (height, width) is resized."""

    size: tuple[int, int]  # (H', W') fed to the network
    scale: float  # the resize factor (Caffe's im_scale): the RPN min-size unit, the sampling grid
    box_scale: tuple[float, float]  # (sy, sx): original box = input box / (sy, sx)


def _round(value: float, rule: str) -> int:
    # half_even: cv2.resize's saturate_cast<int>; half_up: int(x + 0.5) (processing_image.py:59)
    rounded = round(value) if rule == "half_even" else math.floor(value + 0.5)
    return max(1, int(rounded))


def resize_plan(height: int, width: int, conventions: FrcnnConventions = CAFFE) -> ResizePlan:
    """The size rule of `conventions` for an image of `height` x `width` pixels."""
    c = conventions
    short, long = min(height, width), max(height, width)
    scale = c.min_size / short
    if c.resize_cap == "rounded":
        # test.py:47: cap when the ROUNDED long side exceeds max_size; sides are side * scale
        if round(scale * long) > c.max_size:
            scale = c.max_size / long
        new_h, new_w = height * scale, width * scale
    else:
        # processing_image.py:50-58: the short side is min_size itself, the long one
        # scale * long; both shrink when the unrounded long side exceeds max_size
        if height < width:
            new_h, new_w = c.min_size, scale * width
        else:
            new_h, new_w = scale * height, c.min_size
        if max(new_h, new_w) > c.max_size:
            shrink = c.max_size / max(new_h, new_w)
            new_h, new_w, scale = new_h * shrink, new_w * shrink, scale * shrink
    size = (_round(new_h, c.size_rounding), _round(new_w, c.size_rounding))
    # generate_tsv.py:79 divides by im_scale; processing_image.py:132 by per-axis ratios
    per_axis = (size[0] / height, size[1] / width)
    box_scale = (scale, scale) if c.box_mapping == "scale" else per_axis
    return ResizePlan(size=size, scale=scale, box_scale=box_scale)


def resize_image(tensor: Tensor, plan: ResizePlan, grid: str) -> Tensor:
    """(3, H, W) float -> (3, H', W') bilinear, no antialias, pixel-centre sampling.

    grid "size": each axis' in/out ratio (F.interpolate to a size, processing_image.py:68).
    grid "scale": the exact scale on both axes, as cv2.resize(fx=fy=scale) samples
    (test.py:49). F.interpolate uses a given scale_factor for the sampling but floors the
    output size, so the image is padded by edge replication first (what cv2 does past the
    last pixel) and the result cropped to the rounded size."""
    height, width = tensor.shape[-2:]
    if grid == "size":
        if plan.size == (height, width):
            return tensor
        out = F.interpolate(
            tensor[None], size=plan.size, mode="bilinear", align_corners=False, antialias=False
        )
        return out[0]
    if plan.scale == 1.0:
        return tensor
    pad = math.ceil(1.0 / plan.scale) + 1
    padded = F.pad(tensor[None], (0, pad, 0, pad), mode="replicate")
    out = F.interpolate(
        padded,
        scale_factor=(plan.scale, plan.scale),
        mode="bilinear",
        align_corners=False,
        antialias=False,
        recompute_scale_factor=False,
    )
    return out[0, :, : plan.size[0], : plan.size[1]]


def preprocess(
    image: Image.Image, conventions: FrcnnConventions = CAFFE
) -> tuple[Tensor, ResizePlan]:
    """PIL image -> ((3, H', W') float32 network input, its ResizePlan)."""
    c = conventions
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    pixels = rgb[:, :, ::-1] if c.pixel_order == "BGR" else rgb
    normalised = (pixels - np.asarray(c.pixel_mean, dtype=np.float32)) / np.asarray(
        c.pixel_std, dtype=np.float32
    )
    tensor = torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))
    plan = resize_plan(rgb.shape[0], rgb.shape[1], c)
    return resize_image(tensor, plan, c.resize_grid).contiguous(), plan
