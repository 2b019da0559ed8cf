"""Configuration of the bottom-up-attention (BUTD) Faster R-CNN: what a checkpoint fixes.

Two dataclasses: `BoxConvention` (how a checkpoint was trained to read anchors and box deltas;
it travels with the weights) and `FrcnnConfig` (the architecture). Which test-time pipeline is
reproduced (resize, proposal filter, NMS, box policy, ...) is a separate, user-chosen
`FrcnnConventions` set (conventions.py).

Whatever the source checkpoint, the converters in `convert.py` bring the class layouts to one
runtime layout: background is the LAST of the `num_classes + 1` class scores and "no attribute"
the LAST of the `num_attributes + 1` attribute scores (the detectron2 / Hugging Face layout). So
the runtime convention only has to describe geometry, not class order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from vlpipe.errors import ConfigError

ConventionName = Literal["detectron2", "caffe"]


@dataclass(frozen=True)
class BoxConvention:
    """Box geometry a checkpoint was trained with (what its deltas and anchor channels mean).

    detectron2 (py-bottom-up-attention, HF `unc-nlp/frcnn-vg-finetuned`): anchors size-major,
    centred on 0, not rounded; decoded widths are `x2 - x1`; box-head deltas weighted
    (10, 10, 5, 5).

    caffe (original BUTD, MILVLG): anchors ratio-major, rounded, centred at (stride - 1) / 2 =
    7.5; decoded widths are `x2 - x1 + 1` (`plus_one`, BUTD bbox_transform.py:35-36); deltas
    unweighted (1, 1, 1, 1).

    Test-time rules (clipping, proposal filter, NMS areas) are not here: they belong to the
    pipeline being reproduced, `FrcnnConventions`.
    """

    name: ConventionName = "detectron2"
    anchors_ratio_major: bool = False
    anchors_caffe_rounded: bool = False
    plus_one: bool = False
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    rpn_weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)

    @classmethod
    def detectron2(cls) -> BoxConvention:
        return cls()

    @classmethod
    def caffe(cls) -> BoxConvention:
        return cls(
            name="caffe",
            anchors_ratio_major=True,
            anchors_caffe_rounded=True,
            plus_one=True,
            box_weights=(1.0, 1.0, 1.0, 1.0),
        )

    @classmethod
    def named(cls, name: str) -> BoxConvention:
        """The convention recorded under `name` (as stored in a cache's attributes)."""
        makers = {"detectron2": cls.detectron2, "caffe": cls.caffe}
        if name not in makers:
            raise ConfigError(f"unknown box convention {name!r}; expected one of {sorted(makers)}")
        return makers[name]()


@dataclass(frozen=True)
class FrcnnConfig:
    """ResNet-101 C4 BUTD detector: the architecture and the box geometry it was trained with.

    Channel widths follow ResNet: res2 outputs `res2_channels`, each later stage doubles it, the
    bottleneck width starts at `bottleneck_channels` and doubles too; res4 (1024 at full size)
    feeds the RPN and RoI pooling, res5 (2048) gives the region feature.
    """

    stage_blocks: tuple[int, int, int] = (3, 4, 23)  # res2, res3, res4
    res5_blocks: int = 3
    stem_channels: int = 64
    res2_channels: int = 256
    bottleneck_channels: int = 64
    res5_dilation: int = 2  # BUTD keeps 14x14 in res5: stride 1, dilation 2 in every conv2
    rpn_channels: int = 512
    num_classes: int = 1600
    num_attributes: int = 400
    class_embed_dim: int = 256
    attr_hidden_dim: int = 512
    anchor_sizes: tuple[float, ...] = (64.0, 128.0, 256.0, 512.0)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    stride: int = 16
    pooler_resolution: int = 14
    roi_chunk_size: int = 512  # RoIs per res5 call: bounds memory, results do not depend on it
    convention: BoxConvention = field(default_factory=BoxConvention.detectron2)

    @property
    def res4_channels(self) -> int:
        return self.res2_channels * 4

    @property
    def feature_dim(self) -> int:
        """Width of the pooled region feature (2048 at full size)."""
        return self.res2_channels * 8

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_sizes) * len(self.anchor_ratios)

    @property
    def pooler_scale(self) -> float:
        return 1.0 / self.stride

    def with_convention(self, convention: BoxConvention) -> FrcnnConfig:
        return replace(self, convention=convention)

    @classmethod
    def tiny(cls, **overrides) -> FrcnnConfig:
        """A few-channel model for tests: a 64x96 forward takes milliseconds on a CPU (pair it
        with `conventions.TINY_SETTINGS`: fewer proposals, a 2 px minimum size)."""
        settings = dict(
            stage_blocks=(1, 1, 1),
            res5_blocks=1,
            stem_channels=8,
            res2_channels=16,
            bottleneck_channels=4,
            rpn_channels=16,
            num_classes=7,
            num_attributes=5,
            class_embed_dim=8,
            attr_hidden_dim=16,
            anchor_sizes=(16.0, 32.0),
        )
        settings.update(overrides)
        return cls(**settings)
