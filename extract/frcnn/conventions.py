"""Test-time conventions: which extraction pipeline's rules the detector reproduces.

Two things decide the regions a BUTD checkpoint gives, and vlpipe keeps them apart:

- `BoxConvention` (config.py): how the weights were TRAINED to read anchors and box deltas.
  It travels with the checkpoint; the converters set it.
- `FrcnnConventions` (here): which TEST-TIME pipeline to reproduce: resize, proposal filtering,
  NMS arithmetic, attribute confidence, mapping boxes back to the image, the box policy. The
  user chooses; each checkpoint has a default.

Named sets (`CONVENTION_SETS`):

- `caffe`: the original pipeline LXMERT's released features came from:
  peteanderson80/bottom-up-attention tools/generate_tsv.py + lib/fast_rcnn/test.py +
  lib/rpn/proposal_layer.py, with lib/fast_rcnn/config.py defaults (TEST.SCALES 600,
  MAX_SIZE 1000, RPN_MIN_SIZE 16, RPN_NMS_THRESH 0.7, 6000 -> 300, TEST.NMS 0.3) and
  MIN_BOXES = MAX_BOXES = 36 (generate_tsv.py:38 defaults to 10..100; LXMERT set 36).
- `hf`: the Hugging Face LXMERT demo port run one image at a time
  (huggingface/transformers-research-projects lxmert/{processing_image,modeling_frcnn,utils}.py,
  formerly transformers/examples/research_projects/lxmert). Its numbers come from its
  `config.yaml`; the fallbacks below are the port author's config in the same format
  (eltoto1219/vltk frcnn/tests/config.yaml), because the hub file could not be read here.
  A folder's own config.yaml replaces them (`hf_config_overrides`).

Resolution order: named set -> the HF folder's config.yaml (only when the set is `hf`) ->
explicit overrides (`--frcnn-set key=value`, `--image-size`, ...). `resolve_conventions`
returns the resolved set and a record of where each value came from, for provenance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vlpipe.errors import ConfigError, InputError

PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)  # BUTD lib/fast_rcnn/config.py:206
BOX_POLICIES = ("caffe", "maxnms", "adaptive")
DETECTRON2_SCALE_CLAMP = math.log(1000.0 / 16)  # HF modeling_frcnn.py:447 (detectron2)

PixelOrder = Literal["BGR", "RGB"]
ResizeCap = Literal["rounded", "exact"]
SizeRounding = Literal["half_even", "half_up"]
ResizeGrid = Literal["scale", "size"]
SizeUnit = Literal["original", "input"]
BoxMapping = Literal["scale", "per_axis"]


@dataclass(frozen=True)
class FrcnnConventions:
    """Every test-time rule on which the two reference pipelines differ (defaults: `caffe`).

    Image: `pixel_order` of the channels fed to the network, `pixel_mean` / `pixel_std` in that
    channel order. Resize so the short side is `min_size`, capped so the long side stays
    <= `max_size`; `resize_cap` "rounded" caps when round(scale * long) > max_size (Caffe
    test.py:47), "exact" when the unrounded long side exceeds it (HF processing_image.py:55);
    output sides are rounded `size_rounding` "half_even" (cv2.resize's saturate_cast) or
    "half_up" (int(x + 0.5), processing_image.py:59-60); `resize_grid` "scale" samples at the
    exact scale (cv2.resize with fx = fy = scale), "size" at each axis' in/out ratio
    (F.interpolate to a size, processing_image.py:68).

    Proposals: `rpn_min_size` in "original" pixels (multiplied by the resize scale,
    proposal_layer.py:133) or "input" pixels; `rpn_min_size_inclusive` w + 1 >= m
    (proposal_layer.py:180-184) vs w > m (modeling_frcnn.py:152-156); `rpn_filter_before_topk`
    (Caffe filters every anchor, then sorts; HF sorts, keeps the top-k, then filters);
    `rpn_nms_plus_one` / `class_nms_plus_one` count areas as (w + 1)(h + 1) (py_cpu_nms.py:18);
    `clip_minus_one` clips to size - 1 (bbox_transform.py:62-75) instead of size
    (modeling_frcnn.py:143-149); `delta_clamp` caps dw, dh before exp (None: no cap, as
    bbox_transform.py:47; HF log(1000 / 16)).

    Regions: `attr_conf_with_none` takes the attribute confidence from the softmax over all
    A + 1 outputs incl. "no attribute" (generate_tsv.py via the attr_prob Softmax) instead of
    over the A attributes only (modeling_frcnn.py:1165); `box_mapping` divides boxes by the one
    resize scale (generate_tsv.py:79) or by each axis' ratio (processing_image.py:132,
    modeling_frcnn.py:1207); `box_policy` with `min_boxes`..`max_boxes` regions is the
    reference's selection; `class_nms_threshold` is the caffe rule's per-class NMS
    (cfg.TEST.NMS, generate_tsv.py:88); `maxnms_thresholds` the max-class NMS thresholds tried
    in turn (HF ROI_HEADS.NMS_THRESH_TEST, modeling_frcnn.py:1191).
    """

    name: str = "caffe"
    pixel_order: PixelOrder = "BGR"
    pixel_mean: tuple[float, float, float] = PIXEL_MEAN_BGR
    pixel_std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    min_size: int = 600
    max_size: int = 1000
    resize_cap: ResizeCap = "rounded"
    size_rounding: SizeRounding = "half_even"
    resize_grid: ResizeGrid = "scale"
    rpn_pre_nms_topk: int = 6000
    rpn_post_nms_topk: int = 300
    rpn_nms_threshold: float = 0.7
    rpn_min_size: float = 16.0
    rpn_min_size_unit: SizeUnit = "original"
    rpn_min_size_inclusive: bool = True
    rpn_filter_before_topk: bool = True
    rpn_nms_plus_one: bool = True
    clip_minus_one: bool = True
    delta_clamp: float | None = None
    attr_conf_with_none: bool = True
    box_mapping: BoxMapping = "scale"
    box_policy: str = "caffe"
    min_boxes: int = 36
    max_boxes: int = 36
    class_nms_threshold: float = 0.3
    class_nms_plus_one: bool = True
    maxnms_thresholds: tuple[float, ...] = field(
        default=(0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # py-bottom-up-attention's maxnms script
    )

    def __post_init__(self) -> None:
        for name, allowed in _choices().items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected one of {allowed}")
        if not 1 <= self.min_size <= self.max_size:
            raise ConfigError(
                f"need 1 <= min_size <= max_size, got {self.min_size}, {self.max_size}"
            )
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ConfigError(
                f"need 1 <= min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}"
            )
        if self.rpn_pre_nms_topk < 1 or self.rpn_post_nms_topk < 1 or self.rpn_min_size < 0:
            raise ConfigError("rpn_pre_nms_topk, rpn_post_nms_topk must be >= 1, rpn_min_size >= 0")
        thresholds = (self.rpn_nms_threshold, self.class_nms_threshold, *self.maxnms_thresholds)
        if not self.maxnms_thresholds or not all(0 < t <= 1 for t in thresholds):
            raise ConfigError("NMS thresholds must be in (0, 1] and maxnms_thresholds non-empty")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ConfigError("pixel_mean and pixel_std need 3 values, std > 0")

    def replace(self, **changes: Any) -> FrcnnConventions:
        """A copy with `changes` (field names checked, values validated)."""
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise ConfigError(f"unknown convention fields {unknown}; known: {field_names()}")
        return dataclasses.replace(self, **changes)

    def record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.cache
def _choices() -> dict[str, tuple[str, ...]]:
    hints = typing.get_type_hints(FrcnnConventions)
    out = {n: typing.get_args(t) for n, t in hints.items() if typing.get_origin(t) is Literal}
    out["box_policy"] = BOX_POLICIES
    return out


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(FrcnnConventions)]


CAFFE = FrcnnConventions()
HF = FrcnnConventions(
    name="hf",
    # utils.py:547-549 turns cv2's BGR into RGB and flips back only for FORMAT "RGB"; the
    # config says "BGR", so the port feeds RGB to the BGR-trained network (transformers#19601).
    pixel_order="RGB",
    min_size=800,  # vltk config.yaml input.min_size_test / max_size_test
    max_size=1333,
    resize_cap="exact",
    size_rounding="half_up",
    resize_grid="size",
    rpn_min_size=0.0,  # proposal_generator.min_size
    rpn_min_size_unit="input",
    rpn_min_size_inclusive=False,
    rpn_filter_before_topk=False,
    rpn_nms_plus_one=False,
    clip_minus_one=False,
    delta_clamp=DETECTRON2_SCALE_CLAMP,
    attr_conf_with_none=False,
    box_mapping="per_axis",
    box_policy="maxnms",
    class_nms_plus_one=False,
    maxnms_thresholds=(0.5, 0.6, 0.7),  # roi_heads.nms_thresh_test; min/max_detections 36
)
CONVENTION_SETS: dict[str, FrcnnConventions] = {"caffe": CAFFE, "hf": HF}
# `--model-kwargs '{"tiny": true}'`: a 64-px test image has no 16 px * scale proposals
TINY_SETTINGS = {"rpn_pre_nms_topk": 200, "rpn_post_nms_topk": 50, "rpn_min_size": 2.0}


def conventions_named(name: str) -> FrcnnConventions:
    if name not in CONVENTION_SETS:
        raise ConfigError(f"unknown conventions {name!r}; expected one of {list(CONVENTION_SETS)}")
    return CONVENTION_SETS[name]


# ---- overrides from text (--frcnn-set key=value) ----------------------------------------------


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """["rpn_min_size=0", "maxnms_thresholds=0.3,0.5"] -> typed values by field type."""
    hints = typing.get_type_hints(FrcnnConventions)
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep:
            raise ConfigError(f"--frcnn-set {item!r}: expected KEY=VALUE")
        if key not in hints or key == "name":
            raise ConfigError(
                f"--frcnn-set {key!r}: unknown convention field; known: "
                f"{[n for n in field_names() if n != 'name']}"
            )
        out[key] = _parse_value(key, hints[key], text.strip())
    return out


def _parse_value(key: str, hint: Any, text: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    try:
        if hint is bool:
            return _parse_bool(text)
        if hint in (int, float, str):
            return hint(text)
        if origin is Literal:
            return text
        if origin is tuple:
            return tuple(float(part) for part in text.split(",") if part.strip())
        if type(None) in args:  # float | None
            return None if text.lower() in ("none", "null", "") else float(text)
    except ValueError as err:
        raise ConfigError(f"--frcnn-set {key}={text!r}: {err}") from err
    raise TypeError(f"no parser for {key}: {hint}")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


# ---- the HF port's config.yaml ----------------------------------------------------------------

# config.yaml key (dotted, case-insensitive; detectron2 files nest the same under MODEL.) ->
# convention field. The port reads these at modeling_frcnn.py:1505 (min size), :1141-1144
# (detections, NMS), processing_image.py:78-86 (sizes, mean, std), utils.py:547 (format).
HF_CONFIG_KEYS: dict[str, tuple[str, ...]] = {
    "min_size": ("input.min_size_test",),
    "max_size": ("input.max_size_test",),
    "pixel_mean": ("model.pixel_mean", "pixel_mean"),
    "pixel_std": ("model.pixel_std", "pixel_std"),
    "rpn_min_size": ("proposal_generator.min_size", "rpn.min_size"),
    "rpn_pre_nms_topk": ("rpn.pre_nms_topk_test",),
    "rpn_post_nms_topk": ("rpn.post_nms_topk_test",),
    "rpn_nms_threshold": ("rpn.nms_thresh",),
    "maxnms_thresholds": ("roi_heads.nms_thresh_test",),
    "min_boxes": ("min_detections",),
    "max_boxes": ("max_detections", "test.detections_per_image"),
}


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """Parse a config.yaml with yaml.safe_load (never runs code); {} for an empty file."""
    import yaml

    try:
        with open(path) as handle:
            data = yaml.safe_load(handle) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({err})") from err
    if not isinstance(data, Mapping):
        raise InputError(f"{path}: expected a mapping at the top level")
    if set(data) == {"config"} and isinstance(data["config"], Mapping):
        data = data["config"]  # some copies wrap everything in `config:`
    return _lower_keys(data)


def _lower_keys(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k).lower(): _lower_keys(v) for k, v in node.items()}
    return node


def _lookup(config: Mapping[str, Any], dotted: str) -> Any:
    for root in (config, config.get("model")):
        node: Any = root
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    return None


def hf_config_overrides(config: Mapping[str, Any]) -> dict[str, Any]:
    """The convention fields a parsed HF config.yaml sets, typed like the fields."""
    out: dict[str, Any] = {}
    for name, keys in HF_CONFIG_KEYS.items():
        value = next((v for v in (_lookup(config, k) for k in keys) if v is not None), None)
        if value is None:
            continue
        try:
            if name in ("pixel_mean", "pixel_std", "maxnms_thresholds"):
                value = tuple(float(v) for v in (value if isinstance(value, list) else [value]))
            elif name in ("rpn_min_size", "rpn_nms_threshold"):
                value = float(value)
            else:
                value = int(value)
        except (TypeError, ValueError) as err:
            raise InputError(f"config.yaml {keys[0]}: {value!r} is not a number ({err})") from err
        out[name] = value
    fmt = _lookup(config, "input.format")
    if isinstance(fmt, str) and fmt.upper() in ("BGR", "RGB"):
        # utils.py:547-549: the port feeds the opposite of what the config names
        out["pixel_order"] = "RGB" if fmt.upper() == "BGR" else "BGR"
    if "min_boxes" in out and "max_boxes" in out:
        out["min_boxes"] = min(out["min_boxes"], out["max_boxes"])
    return out


def hf_config_box_weights(config: Mapping[str, Any]) -> dict[str, tuple[float, ...]]:
    """Delta weights the config states (trained geometry: they go to the BoxConvention)."""
    out = {}
    for name, key in (("box_weights", "roi_box_head.bbox_reg_weights"),
                      ("rpn_weights", "rpn.bbox_reg_weights")):  # fmt: skip
        value = _lookup(config, key)
        if isinstance(value, list) and len(value) == 4:
            out[name] = tuple(float(v) for v in value)
    return out


# ---- resolution -------------------------------------------------------------------------------


def resolve_conventions(
    name: str | None,
    *,
    default: str,
    hf_config: Mapping[str, Any] | None = None,
    hf_config_path: str | None = None,
    base_overrides: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[FrcnnConventions, dict[str, Any]]:
    """Named set (or `default`) -> config.yaml values (set `hf` only) -> `base_overrides`
    (e.g. the tiny test model's RPN sizes) -> `overrides` (the user's). Returns the resolved
    set and a provenance record of the sources."""
    chosen = name or default
    conventions = conventions_named(chosen)
    from_config: dict[str, Any] = {}
    if hf_config is not None and chosen == "hf":
        from_config = hf_config_overrides(hf_config)
    layers = (from_config, dict(base_overrides or {}), dict(overrides or {}))
    for layer in layers:
        if layer:
            conventions = conventions.replace(**layer)
    source = {
        "set": chosen,
        "chosen_by": "flag" if name else "checkpoint default",
        "config_yaml": hf_config_path if hf_config is not None else None,
        "config_yaml_applied": from_config if hf_config is not None and chosen == "hf" else None,
        "overrides": {**layers[1], **layers[2]},
    }
    return conventions, source
