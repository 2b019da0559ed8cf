"""Bottom-up-attention Faster R-CNN (the detector behind LXMERT's 36 region features), written
as plain PyTorch modules on torchvision ops, with converters for the released checkpoints.

Typical use::

    model = build_from_checkpoint("frcnn-vg-finetuned/")  # or a MILVLG .pth
    image, scale = preprocess(pil_image)
    (det,) = detect(model, [image], scales=[scale])
    sel = select_boxes(det, scale=scale, policy="caffe",
                       plus_one=model.config.convention.plus_one)
"""

from .config import BoxConvention, FrcnnConfig
from .convert import (
    CheckpointMismatchError,
    build_from_checkpoint,
    config_from_state_dict,
    convert_caffe_state_dict,
    convert_detectron2_state_dict,
    load_checkpoint,
    load_into,
    sha256_file,
)
from .model import BUTDFasterRCNN, Detections, detect
from .preprocess import PIXEL_MEAN_BGR, preprocess, resize_scale
from .select import POLICIES, BoxSelection, per_class_max_score, select_boxes

__all__ = [
    "POLICIES",
    "PIXEL_MEAN_BGR",
    "BUTDFasterRCNN",
    "BoxConvention",
    "BoxSelection",
    "CheckpointMismatchError",
    "Detections",
    "FrcnnConfig",
    "build_from_checkpoint",
    "config_from_state_dict",
    "convert_caffe_state_dict",
    "convert_detectron2_state_dict",
    "detect",
    "load_checkpoint",
    "load_into",
    "per_class_max_score",
    "preprocess",
    "resize_scale",
    "select_boxes",
    "sha256_file",
]
