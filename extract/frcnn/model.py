"""The bottom-up-attention Faster R-CNN (ResNet-101 C4, Visual Genome 1600 classes / 400
attributes) that produces LXMERT-style region features.

`BUTDFasterRCNN(config, conventions)` only builds the modules (random weights); `convert.py`
reads checkpoints and `load_into` fills them. `config` is what the checkpoint fixes
(architecture, trained box geometry); `conventions` the test-time pipeline reproduced.
`model.state_dict()` uses the keys of the Hugging Face `unc-nlp/frcnn-vg-finetuned` checkpoint
(minus the frozen norms' unused `num_batches_tracked`).

Batch independence: the trunk and the RPN run one image at a time, so zero padding never reaches
a feature map; only the per-RoI res5 and predictors are batched across images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import boxes as box_ops
from .backbone import ResNetC4
from .config import FrcnnConfig
from .conventions import CAFFE, FrcnnConventions
from .roi_heads import Res5ROIHeads
from .rpn import RPN


@dataclass
class Detections:
    """Everything the box-selection policies need for one image (R proposals, C classes,
    A attributes, D feature width). Coordinates are in the preprocessed image's pixels."""

    proposals: Tensor  # R, 4 unregressed RPN boxes
    objectness: Tensor  # R  RPN logits
    features: Tensor  # R, D  mean-pooled res5 features
    class_probs: Tensor  # R, C + 1  softmax, background last
    # R, A + 1, "no attribute" last: softmax over all A + 1 (Caffe), or over the A attributes
    # with the last column 0 (HF, modeling_frcnn.py:1165), per conventions.attr_conf_with_none
    attr_probs: Tensor
    boxes: Tensor  # R, C, 4  class-specific regressed boxes, clipped to the image
    image_size: tuple[int, int]  # (h, w) of the preprocessed image

    def __len__(self) -> int:
        return self.proposals.shape[0]


class BUTDFasterRCNN(nn.Module):
    """Backbone (res2-res4) -> RPN proposals -> RoI pool + res5 -> predictors."""

    def __init__(
        self, config: FrcnnConfig | None = None, conventions: FrcnnConventions | None = None
    ) -> None:
        super().__init__()
        self.config = config or FrcnnConfig()
        self.conventions = conventions or CAFFE
        self.backbone = ResNetC4(self.config)
        self.proposal_generator = RPN(self.config, self.conventions)
        self.roi_heads = Res5ROIHeads(self.config)

    def forward(
        self, images: Sequence[Tensor], *, scales: Sequence[float] | None = None
    ) -> list[Detections]:
        """images: each (3, H_i, W_i), preprocessed (`preprocess`); scales: the resize factor of
        each (`ResizePlan.scale`: the Caffe minimum proposal size is in original pixels; 1.0
        when omitted) -> one `Detections` per image."""
        scales = [1.0] * len(images) if scales is None else list(scales)
        if len(scales) != len(images):
            raise ValueError(f"got {len(images)} images but {len(scales)} scales")
        feature_maps, proposals, objectness = [], [], []
        for image, scale in zip(images, scales, strict=True):
            fmap, boxes, logits = self._propose(image, scale)
            feature_maps.append(fmap)
            proposals.append(boxes)
            objectness.append(logits)
        features, class_logits, deltas, attr_logits = self.roi_heads(feature_maps, proposals)
        return self._per_image(
            images, proposals, objectness, features, class_logits, deltas, attr_logits
        )

    def features_at(
        self, images: Sequence[Tensor], boxes: Sequence[Tensor]
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """The region head at given boxes instead of the RPN's proposals: images preprocessed,
        boxes (N_i, 4) in their pixels -> per image (features N_i, D; class_probs N_i, C + 1;
        attr_probs N_i, A + 1), as `forward` computes them for its proposals."""
        maps = [self.backbone(image[None]) for image in images]
        features, class_logits, _, attr_logits = self.roi_heads(maps, list(boxes))
        counts = [len(b) for b in boxes]
        probs = class_logits.softmax(dim=-1).split(counts)
        attrs = self.attr_probs(attr_logits).split(counts)
        return list(zip(features.split(counts), probs, attrs, strict=True))

    def _propose(self, image: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a (3, H, W) image, got shape {tuple(image.shape)}")
        fmap = self.backbone(image[None])
        boxes, logits = self.proposal_generator(fmap, tuple(image.shape[-2:]), scale=scale)
        return fmap, boxes, logits

    def _per_image(
        self,
        images: Sequence[Tensor],
        proposals: list[Tensor],
        objectness: list[Tensor],
        features: Tensor,
        class_logits: Tensor,
        deltas: Tensor,
        attr_logits: Tensor,
    ) -> list[Detections]:
        counts = [len(p) for p in proposals]
        rows = zip(
            images,
            proposals,
            objectness,
            features.split(counts),
            class_logits.softmax(dim=-1).split(counts),
            self.attr_probs(attr_logits).split(counts),
            deltas.split(counts),
            strict=True,
        )
        out = []
        for image, props, logits, feats, probs, attrs, dlt in rows:
            size = (int(image.shape[-2]), int(image.shape[-1]))
            boxes = self.regress(props, dlt, size)
            out.append(Detections(props, logits, feats, probs, attrs, boxes, size))
        return out

    def attr_probs(self, attr_logits: Tensor) -> Tensor:
        """(R, A + 1) logits -> probabilities under the conventions' attribute rule."""
        if self.conventions.attr_conf_with_none:
            return attr_logits.softmax(dim=-1)
        probs = attr_logits[:, :-1].softmax(dim=-1)
        return torch.cat([probs, probs.new_zeros(len(probs), 1)], dim=1)

    def regress(self, proposals: Tensor, deltas: Tensor, image_size: tuple[int, int]) -> Tensor:
        """proposals (R, 4), deltas (R, C * 4) -> class-specific boxes (R, C, 4), clipped."""
        trained, c = self.config.convention, self.conventions
        boxes = box_ops.decode(
            deltas, proposals, trained.box_weights, plus_one=trained.plus_one, clamp=c.delta_clamp
        )
        boxes = boxes.reshape(len(proposals), self.config.num_classes, 4)
        return box_ops.clip(boxes, *image_size, plus_one=c.clip_minus_one)


@torch.inference_mode()
def detect(
    model: BUTDFasterRCNN, images: Sequence[Tensor], *, scales: Sequence[float] | None = None
) -> list[Detections]:
    """Run `model` for extraction: eval mode, no autograd."""
    model.eval()
    return model(images, scales=scales)
