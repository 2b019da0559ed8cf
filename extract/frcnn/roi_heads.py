"""Region head: RoI max-pooling, res5, mean-pooled feature, class / box / attribute predictors.

Names mirror detectron2's AttributeRes5ROIHeads (`res5.*`, `box_predictor.cls_score`,
`box_predictor.bbox_pred`, `box_predictor.cls_embedding`, `box_predictor.fc_attr`,
`box_predictor.attr_score`). Each RoI is computed on its own, so RoIs of several images can
share one res5 batch without changing any result.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import roi_pool

from .backbone import make_res5
from .config import FrcnnConfig


class BoxPredictor(nn.Module):
    """Per-region class logits (background last), class-specific deltas and attribute logits.

    The attribute head embeds the region's arg-max class (background included, as trained),
    concatenates it to the feature and applies two linear layers.
    """

    def __init__(self, config: FrcnnConfig) -> None:
        super().__init__()
        dim, classes = config.feature_dim, config.num_classes
        self.cls_score = nn.Linear(dim, classes + 1)
        self.bbox_pred = nn.Linear(dim, classes * 4)
        self.cls_embedding = nn.Embedding(classes + 1, config.class_embed_dim)
        self.fc_attr = nn.Linear(dim + config.class_embed_dim, config.attr_hidden_dim)
        self.attr_score = nn.Linear(config.attr_hidden_dim, config.num_attributes + 1)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """features: (R, D) -> class logits (R, C + 1), deltas (R, C * 4),
        attribute logits (R, A + 1)."""
        class_logits = self.cls_score(features)
        deltas = self.bbox_pred(features)
        embedded = self.cls_embedding(class_logits.argmax(dim=-1))
        hidden = F.relu(self.fc_attr(torch.cat([features, embedded], dim=-1)))
        return class_logits, deltas, self.attr_score(hidden)


class Res5ROIHeads(nn.Module):
    """Pool each proposal to 14x14 on the stride-16 map, run res5, average to one vector."""

    def __init__(self, config: FrcnnConfig) -> None:
        super().__init__()
        self.config = config
        self.res5 = make_res5(config)
        self.box_predictor = BoxPredictor(config)

    def pool(self, feature_maps: list[Tensor], proposals: list[Tensor]) -> Tensor:
        """feature_maps: per image (1, C, h, w); proposals: per image (R_i, 4) -> (sum R_i, C,
        14, 14). Pooled image by image: maps of different sizes need no padding."""
        size = self.config.pooler_resolution
        pooled = [
            roi_pool(fmap, [boxes.to(fmap.dtype)], size, self.config.pooler_scale)
            for fmap, boxes in zip(feature_maps, proposals, strict=True)
        ]
        return torch.cat(pooled, dim=0)

    def region_features(self, pooled: Tensor) -> Tensor:
        """pooled: (R, C, 14, 14) -> (R, D) mean of res5 over the 14x14 grid, in chunks of
        `roi_chunk_size` RoIs to bound activation memory."""
        chunks = pooled.split(max(1, self.config.roi_chunk_size))
        outs = [self.res5(chunk).mean(dim=(2, 3)) for chunk in chunks]
        if not outs:
            return pooled.new_zeros(0, self.config.feature_dim)
        return torch.cat(outs, dim=0)

    def forward(
        self, feature_maps: list[Tensor], proposals: list[Tensor]
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """-> features (R, D), class logits (R, C + 1), deltas (R, C * 4), attr logits (R, A + 1),
        rows in image order then proposal order (R = sum of R_i)."""
        features = self.region_features(self.pool(feature_maps, proposals))
        return (features, *self.box_predictor(features))
