"""Region proposal network: anchors, the RPN head and test-time proposal selection.

Module names mirror detectron2 (`rpn_head.conv`, `rpn_head.objectness_logits`,
`rpn_head.anchor_deltas`, `anchor_generator.cell_anchors.0`) so checkpoints load as they are.
Proposals are computed one image at a time: nothing here depends on the other images.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

from . import boxes as box_ops
from .config import FrcnnConfig
from .conventions import CAFFE, FrcnnConventions


class CellAnchors(nn.Module):
    """Holds the cell anchors as buffer "0", i.e. detectron2's `cell_anchors.0` key."""

    def __init__(self, anchors: Tensor) -> None:
        super().__init__()
        self.register_buffer("0", anchors)

    def forward(self) -> Tensor:
        return self.get_buffer("0")


class AnchorGenerator(nn.Module):
    """Cell anchors (from the box convention, or from the checkpoint) tiled over a feature map."""

    def __init__(self, config: FrcnnConfig) -> None:
        super().__init__()
        anchors = box_ops.cell_anchors(
            config.anchor_sizes, config.anchor_ratios, config.stride, config.convention
        )
        self.cell_anchors = CellAnchors(anchors)
        self.stride = config.stride

    def forward(self, height: int, width: int) -> Tensor:
        """-> (height * width * A, 4) anchors in input-image pixels."""
        return box_ops.grid_anchors(self.cell_anchors(), height, width, self.stride)


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs for A objectness logits and A * 4 anchor deltas."""

    def __init__(self, in_channels: int, hidden_channels: int, num_anchors: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        self.objectness_logits = nn.Conv2d(hidden_channels, num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(hidden_channels, num_anchors * 4, 1)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """features: (1, C, H, W) -> logits (H * W * A,), deltas (H * W * A, 4)."""
        hidden = F.relu(self.conv(features))
        logits = self.objectness_logits(hidden)[0]  # A, H, W
        deltas = self.anchor_deltas(hidden)[0]  # A * 4, H, W
        num_anchors, height, width = logits.shape
        logits = logits.permute(1, 2, 0).reshape(-1)
        deltas = deltas.reshape(num_anchors, 4, height, width).permute(2, 3, 0, 1).reshape(-1, 4)
        return logits, deltas


class RPN(nn.Module):
    """Proposals for one image: decode, clip, drop small boxes, top-k, NMS, keep the best.

    Decoding follows the checkpoint's `BoxConvention`; everything after it follows the
    `FrcnnConventions` set (Caffe proposal_layer.py:126-152 or HF modeling_frcnn.py:287-327).
    """

    def __init__(self, config: FrcnnConfig, conventions: FrcnnConventions = CAFFE) -> None:
        super().__init__()
        self.config, self.conventions = config, conventions
        self.anchor_generator = AnchorGenerator(config)
        self.rpn_head = RPNHead(config.res4_channels, config.rpn_channels, config.num_anchors)

    def forward(
        self, features: Tensor, image_size: tuple[int, int], *, scale: float = 1.0
    ) -> tuple[Tensor, Tensor]:
        """features: (1, C, H/16, W/16) of one image of `image_size` (h, w) pixels, resized by
        `scale` from the original -> proposals (R, 4) and their objectness logits (R,), sorted
        by decreasing logit, R <= rpn_post_nms_topk."""
        c = self.conventions
        logits, deltas = self.rpn_head(features)
        anchors = self.anchor_generator(features.shape[-2], features.shape[-1])
        # Caffe measures the minimum side in original pixels: RPN_MIN_SIZE * im_scale
        min_size = c.rpn_min_size * (scale if c.rpn_min_size_unit == "original" else 1.0)
        candidates = self._filter_then_topk if c.rpn_filter_before_topk else self._topk_then_filter
        boxes, logits = candidates(logits, deltas, anchors, image_size, min_size)
        keep = box_ops.nms_convention(
            boxes, logits, c.rpn_nms_threshold, plus_one=c.rpn_nms_plus_one
        )
        keep = keep[: c.rpn_post_nms_topk]
        return boxes[keep], logits[keep]

    def _decode(self, deltas: Tensor, anchors: Tensor, image_size: tuple[int, int]) -> Tensor:
        trained, c = self.config.convention, self.conventions
        boxes = box_ops.decode(
            deltas, anchors, trained.rpn_weights, plus_one=trained.plus_one, clamp=c.delta_clamp
        )
        return box_ops.clip(boxes, *image_size, plus_one=c.clip_minus_one)

    def _large_enough(self, boxes: Tensor, min_size: float) -> Tensor:
        return box_ops.large_enough(
            boxes, min_size, plus_one=self.conventions.rpn_min_size_inclusive
        )

    def _topk_then_filter(
        self,
        logits: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        image_size: tuple[int, int],
        min_size: float,
    ) -> tuple[Tensor, Tensor]:
        # HF / detectron2: best pre_nms_topk anchors first, then decode, clip, drop small boxes.
        logits, order = logits.sort(descending=True, stable=True)
        order = order[: self.conventions.rpn_pre_nms_topk]
        boxes = self._decode(deltas[order], anchors[order], image_size)
        keep = self._large_enough(boxes, min_size)
        return boxes[keep], logits[: len(order)][keep]

    def _filter_then_topk(
        self,
        logits: Tensor,
        deltas: Tensor,
        anchors: Tensor,
        image_size: tuple[int, int],
        min_size: float,
    ) -> tuple[Tensor, Tensor]:
        # Caffe proposal layer: decode and clip every anchor, drop small boxes, then keep the
        # best pre_nms_topk.
        boxes = self._decode(deltas, anchors, image_size)
        keep = self._large_enough(boxes, min_size)
        boxes, logits = boxes[keep], logits[keep]
        logits, order = logits.sort(descending=True, stable=True)
        order = order[: self.conventions.rpn_pre_nms_topk]
        return boxes[order], logits[: len(order)]
