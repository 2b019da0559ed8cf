"""Image preprocessing the BUTD detector was trained with.

Follows the Caffe / MILVLG variant (the one LXMERT's released features were made with): BGR
float pixels, mean subtracted, then a bilinear resize without antialiasing, sampling at pixel
centres (what cv2.resize INTER_LINEAR does). The detectron2 port instead resizes uint8 RGB with
PIL and subtracts the mean inside the model; results differ slightly.

`preprocess` is a plain module-level function, so it pickles into DataLoader workers.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)


def resize_scale(height: int, width: int, *, min_size: int = 600, max_size: int = 1000) -> float:
    """Scale making the short side `min_size`, reduced so the long side stays <= `max_size`."""
    scale = min_size / min(height, width)
    if round(scale * max(height, width)) > max_size:
        scale = max_size / max(height, width)
    return scale


def preprocess(
    image: Image.Image, min_size: int = 600, max_size: int = 1000
) -> tuple[torch.Tensor, float]:
    """PIL image -> ((3, H', W') float32 BGR mean-subtracted tensor, scale = H' / H)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    height, width = pixels.shape[:2]
    bgr = pixels[:, :, ::-1] - np.asarray(PIXEL_MEAN_BGR, dtype=np.float32)
    tensor = torch.from_numpy(np.ascontiguousarray(bgr.transpose(2, 0, 1)))
    scale = resize_scale(height, width, min_size=min_size, max_size=max_size)
    # cv2 computes the output size as round(side * scale); the sampling grid then differs
    # from cv2's (which keeps the exact scale) by under one part in the output side length.
    size = (round(height * scale), round(width * scale))
    if size != (height, width):
        tensor = F.interpolate(
            tensor[None], size=size, mode="bilinear", align_corners=False, antialias=False
        )[0]
    return tensor.contiguous(), scale
