"""ResNet "C4" trunk in the Caffe (MSRA) flavour, with detectron2 parameter names.

Caffe flavour: the stride sits in each stage's first 1x1 conv (not the 3x3), the stem max-pool
has no padding and rounds up (ceil mode), every norm is a frozen batch norm (eps 1e-5). Names
follow detectron2 so checkpoints load unchanged: `stem.conv1.norm.running_var`,
`res4.22.conv3.weight`, `res2.0.shortcut.norm.bias`, ...
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import FrozenBatchNorm2d

from .config import FrcnnConfig


class ConvNorm(nn.Conv2d):
    """Bias-free convolution followed by its frozen batch norm, stored as `.norm`."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, bias=False, **kwargs)
        self.norm = FrozenBatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(super().forward(x))


class Bottleneck(nn.Module):
    """1x1 (stride) -> 3x3 (dilation) -> 1x1, plus a projected shortcut where widths differ."""

    def __init__(
        self,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        *,
        stride: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.shortcut = (
            ConvNorm(in_channels, out_channels, 1, stride=stride)
            if in_channels != out_channels
            else None
        )
        self.conv1 = ConvNorm(in_channels, mid_channels, 1, stride=stride)
        self.conv2 = ConvNorm(mid_channels, mid_channels, 3, padding=dilation, dilation=dilation)
        self.conv3 = ConvNorm(mid_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C_in, H, W) -> (N, C_out, H / stride, W / stride)."""
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        residual = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + residual)


def make_stage(
    num_blocks: int,
    in_channels: int,
    mid_channels: int,
    out_channels: int,
    *,
    stride: int,
    dilation: int = 1,
) -> nn.Sequential:
    """A ResNet stage: the first block changes width and stride, the rest keep them."""
    blocks = [Bottleneck(in_channels, mid_channels, out_channels, stride=stride, dilation=dilation)]
    for _ in range(num_blocks - 1):
        blocks.append(Bottleneck(out_channels, mid_channels, out_channels, dilation=dilation))
    return nn.Sequential(*blocks)


class Stem(nn.Module):
    """7x7/2 conv + norm + ReLU, then Caffe's 3x3/2 max-pool (padding 0, ceil mode)."""

    def __init__(self, out_channels: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(3, out_channels, 7, stride=2, padding=3)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) -> (N, C, ~H / 4, ~W / 4)."""
        x = F.relu(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=0, ceil_mode=True)


class ResNetC4(nn.Module):
    """Stem and res2..res4: images to the stride-16 map the RPN and RoI pooling read."""

    def __init__(self, config: FrcnnConfig) -> None:
        super().__init__()
        c = config
        self.stem = Stem(c.stem_channels)
        in_ch, mid, out = c.stem_channels, c.bottleneck_channels, c.res2_channels
        for index, num_blocks in enumerate(c.stage_blocks):
            stride = 1 if index == 0 else 2
            self.add_module(
                f"res{index + 2}", make_stage(num_blocks, in_ch, mid, out, stride=stride)
            )
            in_ch, mid, out = out, mid * 2, out * 2

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) preprocessed images -> (N, res4 channels, ~H / 16, ~W / 16)."""
        x = self.stem(x)
        return self.res4(self.res3(self.res2(x)))


def make_res5(config: FrcnnConfig) -> nn.Sequential:
    """The res5 stage BUTD applies to each pooled 14x14 region: stride 1 and dilation 2 so the
    14x14 grid is kept (Caffe's VG model), 1024 -> 2048 channels at full size."""
    c = config
    return make_stage(
        c.res5_blocks,
        c.res4_channels,
        c.bottleneck_channels * 8,
        c.feature_dim,
        stride=1,
        dilation=c.res5_dilation,
    )
