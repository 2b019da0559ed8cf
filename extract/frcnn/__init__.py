"""Bottom-up-attention Faster R-CNN (the detector behind LXMERT's 36 region features), written
as plain PyTorch modules on torchvision ops, with converters for the released checkpoints.

Typical use::

    model = build_from_checkpoint("frcnn-vg-finetuned/")  # test-time set: hf + config.yaml
    image, plan = preprocess(pil_image, model.conventions)
    (det,) = detect(model, [image], scales=[plan.scale])
    sel = select_boxes(det, scale=plan.box_scale, policy="maxnms",
                       thresholds=model.conventions.maxnms_thresholds)

`BoxConvention` is how a checkpoint was trained (travels with it); `FrcnnConventions` is which
test-time pipeline is reproduced (`caffe`: generate_tsv.py, LXMERT's features; `hf`: the
Hugging Face port), chosen by the user with a default per checkpoint.
"""

from .config import BoxConvention, FrcnnConfig
from .conventions import (
    CONVENTION_SETS,
    FrcnnConventions,
    conventions_named,
    parse_overrides,
    read_hf_config,
    resolve_conventions,
)
from .convert import (
    build_from_checkpoint,
    config_from_state_dict,
    convert_caffe_state_dict,
    convert_detectron2_state_dict,
    default_conventions,
    load_checkpoint,
    load_frcnn_state,
)
from .model import BUTDFasterRCNN, Detections, detect
from .preprocess import PIXEL_MEAN_BGR, ResizePlan, preprocess, resize_plan
from .select import POLICIES, BoxSelection, per_class_max_score, select_boxes

__all__ = [
    "CONVENTION_SETS",
    "POLICIES",
    "PIXEL_MEAN_BGR",
    "BUTDFasterRCNN",
    "BoxConvention",
    "BoxSelection",
    "Detections",
    "FrcnnConfig",
    "FrcnnConventions",
    "ResizePlan",
    "build_from_checkpoint",
    "config_from_state_dict",
    "conventions_named",
    "convert_caffe_state_dict",
    "convert_detectron2_state_dict",
    "default_conventions",
    "detect",
    "load_checkpoint",
    "load_frcnn_state",
    "parse_overrides",
    "per_class_max_score",
    "preprocess",
    "read_hf_config",
    "resize_plan",
    "resolve_conventions",
    "select_boxes",
]
