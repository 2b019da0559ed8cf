"""`--impl detectron2`: run a detectron2 model config through vlpipe's box policies and cache.

For users who already have a detectron2 C4 detector set up (e.g. py-bottom-up-attention's
`faster_rcnn_R_101_C4_attr_caffemaxpool.yaml` and its weights). The detectron2 model proposes
and classifies; pooling is its `Res5ROIHeads` res5 averaged over the RoI grid; box selection,
padding, provenance and the cache writer are vlpipe's, exactly as for `--impl native`: this
module only builds the detector, and `extractor.build_frcnn` puts it into a `FrcnnExtractor`.

detectron2 is not on PyPI, so it is imported only here and only when asked for. Untested in CI
(no detectron2 there): only the "not installed" path is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlpipe.errors import ConfigError, VlpipeError
from vlpipe.io import refuse_pickle

from .conventions import FrcnnConventions
from .model import Detections

INSTALL_HELP = (
    "--impl detectron2 needs the `detectron2` package, which is not on PyPI and is not "
    "installed here. Install it from source: "
    "pip install 'git+https://github.com/facebookresearch/detectron2.git' "
    "(needs network access to GitHub and a compiler), or from a local clone: "
    "git clone https://github.com/facebookresearch/detectron2.git && pip install -e detectron2/ . "
    "`--impl native` (the default) runs the same BUTD model with nothing extra to install."
)


class BackendUnavailable(VlpipeError, RuntimeError):
    """An optional backend the user asked for is not installed; the message says how to get it."""


def require_detectron2() -> None:
    try:
        import detectron2  # noqa: F401
    except ImportError as err:
        raise BackendUnavailable(INSTALL_HELP) from err


def build_detectron2(
    config, weights, conventions: FrcnnConventions, *, allow_pickle: bool
) -> tuple[Detectron2Detector, dict[str, Any], int]:
    """The detector of the detectron2 model of `config` (for a `FrcnnExtractor`), its model
    record and its region feature width."""
    require_detectron2()
    if config is None:
        raise ConfigError("--impl detectron2 needs --d2-config FILE (a detectron2 yaml config)")
    if weights is not None:
        refuse_pickle(weights, allow_pickle=allow_pickle)
    cfg = _config(Path(config), weights)
    detector = Detectron2Detector(_model(cfg), conventions, input_format=str(cfg.INPUT.FORMAT))
    return detector, _record(cfg, config), int(cfg.MODEL.RESNETS.RES2_OUT_CHANNELS) * 8


def _config(path: Path, weights: str | None):
    from detectron2.config import get_cfg

    cfg = get_cfg()
    cfg.set_new_allowed(True)  # forks (py-bottom-up-attention) add keys of their own
    cfg.merge_from_file(str(path))
    cfg.MODEL.DEVICE = "cpu"  # the extraction loop moves the model to --device
    # --weights is the only source of weights, so provenance never claims random init wrongly
    cfg.MODEL.WEIGHTS = str(weights) if weights is not None else ""
    cfg.freeze()
    return cfg


def _model(cfg):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg)
    if cfg.MODEL.WEIGHTS:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def _record(cfg, config) -> dict[str, Any]:
    return {"arch": cfg.MODEL.META_ARCHITECTURE, "impl": "detectron2", "config_file": str(config)}


class Detectron2Detector(nn.Module):
    """A detectron2 `GeneralizedRCNN` called as vlpipe's detector: (images, scales) -> one
    `Detections` per image."""

    def __init__(self, model: nn.Module, conventions: FrcnnConventions, input_format: str = "BGR"):
        super().__init__()
        self.model, self.conventions, self.input_format = model, conventions, input_format

    @torch.inference_mode()
    def forward(self, images: list[Tensor], scales=None) -> list[Detections]:
        c = self.conventions
        mean = torch.tensor(c.pixel_mean, device=images[0].device).view(3, 1, 1)
        std = torch.tensor(c.pixel_std, device=images[0].device).view(3, 1, 1)
        # vlpipe's transform normalised with the conventions' mean / std; detectron2 does its
        # own inside, on pixels in its INPUT.FORMAT order.
        raw = [img * std + mean for img in images]
        if self.input_format != c.pixel_order:
            raw = [img.flip(0) for img in raw]
        return [_detections(self.model, img) for img in raw]


def _detections(model, image: Tensor) -> Detections:
    """One image through backbone, RPN and Res5 RoI head -> vlpipe `Detections`."""
    batched = model.preprocess_image([{"image": image}])
    features = model.backbone(batched.tensor)
    proposals, _ = model.proposal_generator(batched, features, None)
    heads, props = model.roi_heads, proposals[0]
    pooled = heads._shared_roi_transform(
        [features[f] for f in heads.in_features], [props.proposal_boxes]
    ).mean(dim=(2, 3))
    outputs = heads.box_predictor(pooled)
    logits, deltas = outputs[0], outputs[1]
    n = len(props)
    if len(outputs) > 2:
        attr_probs = outputs[2].softmax(-1)
    else:  # no attribute head: every region reads "no attribute" (id 0, confidence 0)
        attr_probs = torch.cat([logits.new_zeros(n, 1), logits.new_ones(n, 1)], dim=1)
    boxes = heads.box_predictor.box2box_transform.apply_deltas(deltas, props.proposal_boxes.tensor)
    height, width = image.shape[-2:]
    limits = boxes.new_tensor([width, height, width, height])
    boxes = torch.minimum(boxes.reshape(n, -1, 4).clamp(min=0), limits)  # clip to the image
    classes = logits.shape[1] - 1
    return Detections(
        proposals=props.proposal_boxes.tensor,
        objectness=props.objectness_logits,
        features=pooled,
        class_probs=logits.softmax(-1),
        attr_probs=attr_probs,
        boxes=boxes.expand(n, classes, 4) if boxes.shape[1] == 1 else boxes,
        image_size=(int(height), int(width)),
    )
