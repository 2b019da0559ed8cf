"""`--backbone frcnn`: BUTD Faster R-CNN region features for the extraction loop.

Per image: preprocess in a DataLoader worker; on the device, the detector (the native
`BUTDFasterRCNN`, or detectron2's through `d2_backend`) then one box-selection policy; the kept
regions become a `regions` cache row padded to K = max boxes (`image_mask` marks the real ones).
Boxes are stored in ORIGINAL image pixels, from the original (h, w) the loop's `Batch` carries.

Two settings decide the regions, and both are recorded in the cache's provenance:
- the checkpoint: `--weights random` builds `FrcnnConfig(**model_kwargs)` (`{"tiny": true, ...}`
  gives the few-channel test model); a path goes through the converters, whose box convention
  (trained geometry) travels with the weights. A `.pkl` (py-bottom-up-attention) is only
  unpickled with `allow_pickle=True` (`--allow-pickle`), since unpickling runs code.
- the test-time conventions (`--conventions caffe|hf`, `--frcnn-set key=value`): which
  reference pipeline's rules to reproduce; the default comes from the checkpoint
  (`default_conventions`; random weights: caffe), an HF folder's config.yaml is honoured.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from vlpipe.cache import region_shapes
from vlpipe.errors import ConfigError
from vlpipe.extract.base import Batch, Extractor
from vlpipe.io import refuse_pickle
from vlpipe.weights import resolve_weights_file

from .config import BoxConvention, FrcnnConfig
from .conventions import (
    CAFFE,
    TINY_SETTINGS,
    FrcnnConventions,
    parse_overrides,
    resolve_conventions,
)
from .convert import checkpoint_conventions, load_checkpoint, model_from_state_dict
from .model import BUTDFasterRCNN, Detections
from .preprocess import ResizePlan, preprocess, resize_plan
from .select import BoxSelection, select_boxes, select_given

DEFAULT_ARCH = "butd-frcnn-r101-c4"
# What a policy does when --min-boxes / --max-boxes / --conf-threshold are not given and it is
# not the conventions' own policy (whose min_boxes / max_boxes come from the conventions).
POLICY_DEFAULTS: dict[str, dict[str, Any]] = {
    "caffe": {"conf_threshold": 0.2, "min_boxes": 36, "max_boxes": 36},
    "adaptive": {"conf_threshold": 0.2, "min_boxes": 10, "max_boxes": 100},
    "maxnms": {"min_boxes": 36, "max_boxes": 36},
}
# FrcnnConfig fields that became test-time conventions
MOVED_TO_CONVENTIONS = {
    "pre_nms_topk": "rpn_pre_nms_topk",
    "post_nms_topk": "rpn_post_nms_topk",
    "rpn_nms_threshold": "rpn_nms_threshold",
    "min_proposal_size": "rpn_min_size",
}


@dataclass(frozen=True)
class FrcnnTransform:
    """PIL image -> (3, H', W') float32 network input under `conventions`; picklable.

    The resize plan is a pure function of the original size, so `encode` recomputes it from
    the (h, w) the loop passes instead of shipping it through the DataLoader."""

    conventions: FrcnnConventions = CAFFE

    def __call__(self, image: Image.Image) -> Tensor:
        return preprocess(image, self.conventions)[0]

    def plan(self, height: int, width: int) -> ResizePlan:
        return resize_plan(height, width, self.conventions)

    def scale(self, height: int, width: int) -> float:
        return self.plan(height, width).scale

    def record(self) -> dict[str, Any]:
        c = self.conventions
        grid = {"scale": "exact scale on both axes (cv2.resize fx=fy)", "size": "per-axis ratio"}
        return {
            "pixel_order": c.pixel_order,
            "mean": list(c.pixel_mean),
            "std": list(c.pixel_std),
            "min_size": c.min_size,
            "max_size": c.max_size,
            "resize": f"bilinear on float pixels after mean subtraction, no antialias, pixel "
            f"centres; grid {grid[c.resize_grid]}; cap {c.resize_cap}; sides rounded "
            f"{c.size_rounding}",
        }


@dataclass(frozen=True)
class BoxPolicy:
    """A named box-selection policy and its parameters (recorded in the cache as is)."""

    name: str
    max_boxes: int
    min_boxes: int | None = None
    conf_threshold: float | None = None
    nms_threshold: float | None = None  # caffe / adaptive: per-class NMS
    thresholds: tuple[float, ...] | None = None  # maxnms: tried in turn
    plus_one: bool = False
    source: str | None = None  # given: where the boxes come from (--boxes)

    @classmethod
    def build(
        cls,
        name: str | None,
        *,
        min_boxes: int | None = None,
        max_boxes: int | None = None,
        conf_threshold: float | None = None,
        conventions: FrcnnConventions = CAFFE,
    ) -> BoxPolicy:
        name = name or conventions.box_policy
        if name not in POLICY_DEFAULTS:
            raise ConfigError(
                f"unknown box policy {name!r}; expected one of {list(POLICY_DEFAULTS)}"
            )
        given = {"min_boxes": min_boxes, "max_boxes": max_boxes, "conf_threshold": conf_threshold}
        given = {k: v for k, v in given.items() if v is not None}
        unused = sorted(set(given) - set(POLICY_DEFAULTS[name]))
        if unused:
            flags = ", ".join("--" + k.replace("_", "-") for k in unused)
            raise ConfigError(f"box policy {name!r} takes no {flags}")
        defaults = dict(POLICY_DEFAULTS[name])
        if name == conventions.box_policy:  # the reference's own counts (HF: MIN/MAX_DETECTIONS)
            defaults.update(min_boxes=conventions.min_boxes, max_boxes=conventions.max_boxes)
        values = {**defaults, **given}
        # one bound given: move the other default so they stay ordered (--max-boxes 12 -> 12..12)
        if "min_boxes" not in given:
            values["min_boxes"] = min(values["min_boxes"], values["max_boxes"])
        if "min_boxes" in given and "max_boxes" not in given:
            values["max_boxes"] = max(values["max_boxes"], values["min_boxes"])
        if name == "maxnms":
            values.update(thresholds=conventions.maxnms_thresholds)
        else:
            values.update(nms_threshold=conventions.class_nms_threshold)
        policy = cls(name, plus_one=conventions.class_nms_plus_one, **values)
        policy.check()
        return policy

    def check(self) -> None:
        low = self.min_boxes if self.min_boxes is not None else 1
        if not 1 <= low <= self.max_boxes:
            raise ConfigError(f"need 1 <= --min-boxes <= --max-boxes, got {low}, {self.max_boxes}")
        if self.conf_threshold is not None and not 0.0 <= self.conf_threshold <= 1.0:
            raise ConfigError(f"--conf-threshold must be in [0, 1], got {self.conf_threshold}")

    def options(self) -> dict[str, Any]:
        """Keyword arguments of `select_boxes` for this policy."""
        if self.name == "maxnms":
            return {
                "num_boxes": self.max_boxes,
                "min_boxes": self.min_boxes,
                "thresholds": self.thresholds,
                "plus_one": self.plus_one,
            }
        return {
            "conf_threshold": self.conf_threshold,
            "min_boxes": self.min_boxes,
            "max_boxes": self.max_boxes,
            "nms_threshold": self.nms_threshold,
            "plus_one": self.plus_one,
        }

    def record(self) -> dict[str, Any]:
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if "thresholds" in fields:
            fields["thresholds"] = list(fields["thresholds"])
        boxes = {"maxnms": "regressed, best class", "given": "given, whole image first"}
        return {**fields, "boxes": boxes.get(self.name, "unregressed proposals")}


class FrcnnExtractor(Extractor):
    """Frozen BUTD detector -> K regions per image (features, boxes, labels, mask).

    `model` is the detector: called as model(images, scales=...) on images of their own sizes
    (no padding ever reaches a feature map), it returns one `Detections` per image."""

    backbone = "frcnn"
    kind = "regions"

    def __init__(
        self,
        model: torch.nn.Module,
        weights: str | None,
        model_record: dict[str, Any],
        transform: FrcnnTransform,
        policy: BoxPolicy,
        convention: BoxConvention,
        feature_dim: int,
        conventions_source: dict[str, Any] | None = None,
    ):
        super().__init__(model, weights, model_record)
        self.transform, self.policy = transform, policy
        self.convention, self.feature_dim = convention, feature_dim
        self.conventions_source = conventions_source or {}
        self.given: dict[str, Any] | None = None  # --boxes: {key: (N, 4) boxes}, by prepare

    @property
    def conventions(self) -> FrcnnConventions:
        return self.transform.conventions

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return region_shapes(self.policy.max_boxes, self.feature_dim)

    def detect(self, images: list[Tensor], scales: list[float]) -> list[Detections]:
        """One `Detections` per image."""
        return self.model(images, scales=scales)

    def prepare(self, records: list) -> None:
        """--boxes: every image's given boxes, read and checked (K holds them and the whole
        image) before any work."""
        if self.policy.name != "given":
            return
        from .given import read_given_boxes

        self.given = read_given_boxes(self.policy.source, records)
        k = self.policy.max_boxes
        over = {key: len(b) for key, b in self.given.items() if len(b) + 1 > k}
        if over:
            key, n = next(iter(over.items()))
            raise ConfigError(
                f"--boxes {self.policy.source}: image {key} has {n} boxes, more than --max-boxes "
                f"{k} holds with the whole image ({len(over)} images do): raise --max-boxes"
            )

    def encode(self, batch: Batch) -> dict[str, Tensor]:
        """batch.pixels: B tensors (3, H_i, W_i) from `transform`, batch.hw: the original (h, w)
        of each -> image_feats B,K,D, image_boxes B,K,4 (original pixels), image_mask B,K,
        labels B,K and image_hw B,2."""
        if self.given is not None:
            return self._encode_given(batch)
        plans = [self.transform.plan(h, w) for h, w in batch.hw]
        detections = self.detect(batch.pixels, [plan.scale for plan in plans])
        options = self.policy.options()
        rows = [
            select_boxes(det, scale=plan.box_scale, policy=self.policy.name, **options)
            for det, plan in zip(detections, plans, strict=True)
        ]
        return {**_stack(rows, batch.hw), "image_hw": batch.image_hw()}

    def _encode_given(self, batch: Batch) -> dict[str, Tensor]:
        """The regions at each image's given boxes, the whole image first."""
        device = batch.pixels[0].device
        boxes, inputs, dets = [], [], []
        for key, (h, w) in zip(batch.keys, batch.hw, strict=True):
            given = torch.as_tensor(self.given[key], device=device)
            rows = torch.cat([given.new_tensor([[0.0, 0.0, w, h]]), given])
            rows = torch.minimum(rows.clamp(min=0), rows.new_tensor([w, h, w, h]))  # as stored
            sy, sx = self.transform.plan(h, w).box_scale
            boxes.append(rows)
            inputs.append(rows * rows.new_tensor([sx, sy, sx, sy]))  # into network pixels
        heads = self.model.features_at(batch.pixels, inputs)
        for pixels, rows, (feats, probs, attrs) in zip(batch.pixels, inputs, heads, strict=True):
            size = (int(pixels.shape[-2]), int(pixels.shape[-1]))
            none = rows.new_zeros(len(rows))
            dets.append(Detections(rows, none, feats, probs, attrs, rows, size))
        k = self.policy.max_boxes
        selected = [select_given(d, b, rows=k) for d, b in zip(dets, boxes, strict=True)]
        return {**_stack(selected, batch.hw), "image_hw": batch.image_hw()}

    def preprocessing(self) -> dict[str, Any]:
        # a detectron2 detector reads pixels in its own INPUT.FORMAT order
        input_format = getattr(self.model, "input_format", None)
        record = self.transform.record()
        return record if input_format is None else dict(record, model_input_format=input_format)

    def provenance(self) -> dict[str, Any]:
        return {
            **super().provenance(),
            "box_policy": self.policy.record(),
            "box_convention": dataclasses.asdict(self.convention),
            "conventions": {**self.conventions.record(), "source": self.conventions_source},
            "impl": self.model_record.get("impl", "native"),
        }


def _stack(rows: list[BoxSelection], hw: list[tuple[int, int]]) -> dict[str, Tensor]:
    k = rows[0].features.shape[0]
    device = rows[0].features.device
    counts = torch.tensor([r.num_boxes for r in rows], device=device)
    boxes = torch.stack([r.boxes for r in rows])
    # A box clipped to the resized size may end up to half an original pixel past the border
    # after mapping back, because the resized side is rounded: clamp to the original image.
    limits = torch.tensor([[w, h, w, h] for h, w in hw], dtype=boxes.dtype, device=device)
    boxes = torch.minimum(boxes.clamp(min=0), limits[:, None, :])
    return {
        "image_feats": torch.stack([r.features for r in rows]),
        "image_boxes": boxes,
        "image_mask": torch.arange(k, device=device)[None, :] < counts[:, None],
        "obj_ids": torch.stack([r.obj_ids for r in rows]),
        "obj_conf": torch.stack([r.obj_conf for r in rows]),
        "attr_ids": torch.stack([r.attr_ids for r in rows]),
        "attr_conf": torch.stack([r.attr_conf for r in rows]),
    }


# ---- construction -----------------------------------------------------------------------------


def _check_model_kwargs(kwargs: dict[str, Any]) -> None:
    moved = sorted(set(kwargs) & set(MOVED_TO_CONVENTIONS))
    if moved:
        hint = ", ".join(f"--frcnn-set {MOVED_TO_CONVENTIONS[k]}=..." for k in moved)
        raise ConfigError(f"--model-config {moved}: test-time settings now go through {hint}")
    known = {f.name for f in dataclasses.fields(FrcnnConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(
            f"--model-config: unknown FrcnnConfig fields {unknown}; known: {sorted(known)}"
        )


def config_from_kwargs(model_kwargs: dict[str, Any]) -> FrcnnConfig:
    """`--model-config` JSON -> FrcnnConfig: field overrides, `"tiny": true` for the test-size
    model, `"convention": "caffe"` for a box convention by name; JSON lists become tuples."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
    tiny = bool(kwargs.pop("tiny", False))
    if isinstance(kwargs.get("convention"), str):
        kwargs["convention"] = BoxConvention.named(kwargs["convention"])
    _check_model_kwargs(kwargs)
    return FrcnnConfig.tiny(**kwargs) if tiny else FrcnnConfig(**kwargs)


def _user_overrides(
    frcnn_set: Sequence[str], image_size: int | None, max_size: int | None
) -> dict[str, Any]:
    overrides = parse_overrides(frcnn_set)
    for flag, key, value in (("--image-size", "min_size", image_size),
                             ("--max-size", "max_size", max_size)):  # fmt: skip
        if value is None:
            continue
        if key in overrides and overrides[key] != value:
            raise ConfigError(f"{flag} {value} and --frcnn-set {key}={overrides[key]} disagree")
        overrides[key] = value
    return overrides


def load_model(
    weights: str | None,
    model_kwargs: dict[str, Any],
    *,
    allow_pickle: bool,
    conventions: str | None = None,
    overrides: dict[str, Any] | None = None,
) -> tuple[BUTDFasterRCNN, dict[str, Any]]:
    """Random init from the config, or a converted checkpoint (`model_kwargs` then overrides
    config fields such as anchor_sizes; architecture sizes come from the weights), built with
    the resolved test-time conventions -> (model, the conventions' provenance source)."""
    if weights is None:
        tiny = bool(model_kwargs.get("tiny"))
        resolved, source = resolve_conventions(
            conventions,
            default="caffe",
            base_overrides=TINY_SETTINGS if tiny else None,
            overrides=overrides,
        )
        return BUTDFasterRCNN(config_from_kwargs(model_kwargs), resolved).eval(), source
    if model_kwargs.get("tiny"):
        raise ConfigError(
            "--model-config 'tiny' builds a random test model; drop it with --weights"
        )
    refuse_pickle(resolve_weights_file(weights), allow_pickle=allow_pickle)  # before any work
    config_overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
    if isinstance(config_overrides.get("convention"), str):
        raise ConfigError("the box convention comes with the checkpoint; drop 'convention'")
    _check_model_kwargs(config_overrides)
    state_dict, convention = load_checkpoint(weights, allow_pickle=allow_pickle)
    resolved, source = checkpoint_conventions(weights, convention, conventions, overrides=overrides)
    model = model_from_state_dict(
        state_dict, convention, resolved, source=str(weights), **config_overrides
    )
    return model, source


def model_record(model: BUTDFasterRCNN, arch: str, impl: str = "native") -> dict[str, Any]:
    # the conventions belong to the model as run: a resume compares "model" and so them too
    return {
        "arch": arch,
        "impl": impl,
        "config": dataclasses.asdict(model.config),
        "conventions": model.conventions.record(),
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def build_frcnn(
    *,
    arch: str | None,
    weights: str | None,
    image_size: int | None,
    model_kwargs: dict[str, Any],
    patches: bool = True,
    box_policy: str | None = None,
    min_boxes: int | None = None,
    max_boxes: int | None = None,
    conf_threshold: float | None = None,
    allow_pickle: bool = False,
    max_size: int | None = None,
    impl: str | None = None,
    config: str | None = None,
    conventions: str | None = None,
    frcnn_set: Sequence[str] = (),
    boxes: str | None = None,
    **_,
) -> FrcnnExtractor:
    """The registry's builder. Unset box options take the conventions' policy and counts
    (caffe: the caffe rule, 36 to 36 boxes at confidence 0.2; hf: maxnms with the config's
    MIN/MAX_DETECTIONS); another policy takes its own defaults (adaptive: 10 to 100)."""
    overrides = _user_overrides(frcnn_set, image_size, max_size)
    impl = impl or "native"
    if boxes is not None:
        given = {"--box-policy": box_policy, "--min-boxes": min_boxes}
        given |= {"--conf-threshold": conf_threshold, "--impl detectron2": impl == "detectron2"}
        wrong = [flag for flag, value in given.items() if value not in (None, False)]
        if wrong:
            raise ConfigError(f"--boxes {boxes}: the regions are given; drop {', '.join(wrong)}")
    if impl == "detectron2":
        from .d2_backend import build_detectron2

        resolved, source = resolve_conventions(conventions, default="caffe", overrides=overrides)
        policy = _policy(box_policy, min_boxes, max_boxes, conf_threshold, resolved)
        model, record, feature_dim = build_detectron2(
            config, weights, resolved, allow_pickle=allow_pickle
        )
        convention = BoxConvention.detectron2()
    elif impl == "native":
        if config is not None:
            raise ConfigError("--d2-config is a detectron2 config file: it needs --impl detectron2")
        model, source = load_model(
            weights,
            model_kwargs,
            allow_pickle=allow_pickle,
            conventions=conventions,
            overrides=overrides,
        )
        resolved = model.conventions
        policy = _policy(box_policy, min_boxes, max_boxes, conf_threshold, resolved)
        record = model_record(model, arch or DEFAULT_ARCH)
        convention, feature_dim = model.config.convention, model.config.feature_dim
    else:
        raise ConfigError(f"unknown --impl {impl!r}; expected native or detectron2")
    if boxes is not None:  # K: the most given boxes an image may have, plus the whole image
        policy = BoxPolicy("given", max_boxes or 36, source=boxes, plus_one=False)
    return FrcnnExtractor(
        model,
        weights,
        record,
        FrcnnTransform(resolved),
        policy,
        convention,
        feature_dim,
        source,
    )


def _policy(name, min_boxes, max_boxes, conf_threshold, conventions) -> BoxPolicy:
    return BoxPolicy.build(
        name,
        min_boxes=min_boxes,
        max_boxes=max_boxes,
        conf_threshold=conf_threshold,
        conventions=conventions,
    )
