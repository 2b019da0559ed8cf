"""`--backbone frcnn`: BUTD Faster R-CNN region features for the extraction loop.

Per image: preprocess (BGR, mean-subtracted, short side 600 / long side <= 1000) in a DataLoader
worker; on the device, `detect` then one box-selection policy; the kept regions become a
`regions` cache row padded to K = max boxes (`image_mask` marks the real ones). Boxes are stored
in ORIGINAL image pixels, which is why the loop hands `encode` each image's original (h, w).

Weights: `--weights random` builds `FrcnnConfig(**model_kwargs)` (`{"tiny": true, ...}` gives the
few-channel test model); a path goes through the checkpoint converters, whose box convention
travels with the weights and into the cache's provenance. A `.pkl` (py-bottom-up-attention) is
only unpickled with `allow_pickle=True` (`--allow-pickle`), since unpickling runs code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from vlpipe.extract.base import Extractor
from vlpipe.weights import WeightsError, resolve_weights_file

from .config import BoxConvention, FrcnnConfig
from .convert import build_from_checkpoint
from .model import BUTDFasterRCNN, detect
from .preprocess import PIXEL_MEAN_BGR, preprocess, resize_scale
from .select import MAXNMS_THRESHOLDS, BoxSelection, select_boxes

DEFAULT_ARCH = "butd-frcnn-r101-c4"
# What each policy does when --min-boxes / --max-boxes / --conf-threshold are not given.
POLICY_DEFAULTS: dict[str, dict[str, Any]] = {
    "caffe": {"conf_threshold": 0.2, "min_boxes": 36, "max_boxes": 36},
    "adaptive": {"conf_threshold": 0.2, "min_boxes": 10, "max_boxes": 100},
    "maxnms": {"max_boxes": 36},
}
NMS_THRESHOLD = 0.3  # the per-class NMS of the caffe / adaptive rule (generate_tsv.py)


@dataclass(frozen=True)
class FrcnnTransform:
    """PIL image -> (3, H', W') float32 BGR mean-subtracted tensor; picklable for workers.

    The resize scale is a pure function of the original size, so `encode` recomputes it from
    the (h, w) the loop passes instead of shipping it through the DataLoader."""

    min_size: int = 600
    max_size: int = 1000

    def __call__(self, image: Image.Image) -> Tensor:
        return preprocess(image, self.min_size, self.max_size)[0]

    def scale(self, height: int, width: int) -> float:
        return resize_scale(height, width, min_size=self.min_size, max_size=self.max_size)

    def record(self) -> dict[str, Any]:
        return {
            "pixel_order": "BGR",
            "mean": list(PIXEL_MEAN_BGR),
            "std": 1.0,
            "min_size": self.min_size,
            "max_size": self.max_size,
            "resize": "bilinear on float pixels after mean subtraction, no antialias, "
            "align_corners=False (cv2 INTER_LINEAR); output side round(side * scale)",
        }


@dataclass(frozen=True)
class BoxPolicy:
    """A named box-selection policy and its parameters (recorded in the cache as is)."""

    name: str
    max_boxes: int
    min_boxes: int | None = None
    conf_threshold: float | None = None

    @classmethod
    def build(
        cls,
        name: str,
        *,
        min_boxes: int | None = None,
        max_boxes: int | None = None,
        conf_threshold: float | None = None,
    ) -> BoxPolicy:
        if name not in POLICY_DEFAULTS:
            raise ValueError(
                f"unknown box policy {name!r}; expected one of {list(POLICY_DEFAULTS)}"
            )
        given = {"min_boxes": min_boxes, "max_boxes": max_boxes, "conf_threshold": conf_threshold}
        given = {k: v for k, v in given.items() if v is not None}
        unused = sorted(set(given) - set(POLICY_DEFAULTS[name]))
        if unused:
            flags = ", ".join("--" + k.replace("_", "-") for k in unused)
            raise ValueError(f"box policy {name!r} takes no {flags} (maxnms keeps --max-boxes)")
        values = {**POLICY_DEFAULTS[name], **given}
        # one bound given: move the other default so they stay ordered (--max-boxes 12 -> 12..12)
        if "min_boxes" in values and "min_boxes" not in given:
            values["min_boxes"] = min(values["min_boxes"], values["max_boxes"])
        if "min_boxes" in given and "max_boxes" not in given:
            values["max_boxes"] = max(values["max_boxes"], values["min_boxes"])
        policy = cls(name, **values)
        policy.check()
        return policy

    def check(self) -> None:
        low = self.min_boxes if self.min_boxes is not None else 1
        if not 1 <= low <= self.max_boxes:
            raise ValueError(f"need 1 <= --min-boxes <= --max-boxes, got {low}, {self.max_boxes}")
        if self.conf_threshold is not None and not 0.0 <= self.conf_threshold <= 1.0:
            raise ValueError(f"--conf-threshold must be in [0, 1], got {self.conf_threshold}")

    def options(self, plus_one: bool) -> dict[str, Any]:
        """Keyword arguments of `select_boxes` for this policy."""
        if self.name == "maxnms":
            return {"num_boxes": self.max_boxes, "plus_one": plus_one}
        return {
            "conf_threshold": self.conf_threshold,
            "min_boxes": self.min_boxes,
            "max_boxes": self.max_boxes,
            "plus_one": plus_one,
        }

    def record(self, plus_one: bool) -> dict[str, Any]:
        if self.name == "maxnms":
            extra = {"thresholds": list(MAXNMS_THRESHOLDS), "boxes": "regressed, best class"}
        else:
            extra = {"nms_threshold": NMS_THRESHOLD, "boxes": "unregressed proposals"}
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        return {**fields, **extra, "plus_one": plus_one}


class FrcnnExtractor(Extractor):
    """Frozen BUTD detector -> K regions per image (features, boxes, labels, mask)."""

    backbone = "frcnn"
    kind = "regions"
    stackable = False  # every image keeps its own size: no padding ever reaches a feature map

    def __init__(
        self,
        model: torch.nn.Module,
        weights: str | None,
        model_record: dict[str, Any],
        transform: FrcnnTransform,
        policy: BoxPolicy,
        convention: BoxConvention,
        feature_dim: int,
    ):
        super().__init__(model, weights, model_record)
        self.transform, self.policy = transform, policy
        self.convention, self.feature_dim = convention, feature_dim

    def shapes(self) -> dict[str, tuple[int, ...]]:
        k = self.policy.max_boxes
        per_box = ("image_mask", "obj_ids", "obj_conf", "attr_ids", "attr_conf")
        return {
            "image_feats": (k, self.feature_dim),
            "image_boxes": (k, 4),
            "image_hw": (2,),
            **{name: (k,) for name in per_box},
        }

    def detect(self, images: list[Tensor], scales: list[float]):
        """One `Detections` per image (the detectron2 backend overrides this)."""
        return detect(self.model, images, scales=scales)

    def encode(self, pixels: list[Tensor], hw: list[tuple[int, int]]) -> dict[str, Tensor]:
        """pixels: B tensors (3, H_i, W_i) from `transform`; hw: original (h, w) of each ->
        image_feats B,K,D, image_boxes B,K,4 (original pixels), image_mask B,K and labels B,K."""
        scales = [self.transform.scale(h, w) for h, w in hw]
        options = self.policy.options(self.convention.plus_one)
        rows = [
            select_boxes(det, scale=scale, policy=self.policy.name, **options)
            for det, scale in zip(self.detect(pixels, scales), scales, strict=True)
        ]
        return _stack(rows, hw)

    def preprocessing(self) -> dict[str, Any]:
        return self.transform.record()

    def provenance(self) -> dict[str, Any]:
        plus_one = self.convention.plus_one
        return {
            **super().provenance(),
            "box_policy": self.policy.record(plus_one),
            "box_convention": dataclasses.asdict(self.convention),
            "impl": self.model_record.get("impl", "native"),
        }


def _stack(rows: list[BoxSelection], hw: list[tuple[int, int]]) -> dict[str, Tensor]:
    k = rows[0].features.shape[0]
    device = rows[0].features.device
    counts = torch.tensor([r.num_boxes for r in rows], device=device)
    boxes = torch.stack([r.boxes for r in rows])
    # A detectron2-convention box may end up to half a (resized) pixel past the border after
    # dividing by the scale, because the resized side is rounded: clamp to the original image.
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


def config_from_kwargs(model_kwargs: dict[str, Any]) -> FrcnnConfig:
    """`--model-kwargs` JSON -> FrcnnConfig: field overrides, `"tiny": true` for the test-size
    model, `"convention": "caffe"` for a box convention by name; JSON lists become tuples."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model_kwargs.items()}
    tiny = bool(kwargs.pop("tiny", False))
    if isinstance(kwargs.get("convention"), str):
        kwargs["convention"] = BoxConvention.named(kwargs["convention"])
    known = {f.name for f in dataclasses.fields(FrcnnConfig)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(
            f"--model-kwargs: unknown FrcnnConfig fields {unknown}; known: {sorted(known)}"
        )
    return FrcnnConfig.tiny(**kwargs) if tiny else FrcnnConfig(**kwargs)


def load_model(
    weights: str | None, model_kwargs: dict[str, Any], *, allow_pickle: bool
) -> BUTDFasterRCNN:
    """Random init from the config, or a converted checkpoint (`model_kwargs` then overrides
    test-time settings such as post_nms_topk; architecture sizes come from the weights)."""
    if weights is None:
        return BUTDFasterRCNN(config_from_kwargs(model_kwargs)).eval()
    if model_kwargs.get("tiny"):
        raise ValueError("--model-kwargs 'tiny' builds a random test model; drop it with --weights")
    file = resolve_weights_file(weights)  # a clear error before anything is read
    if file.suffix == ".pkl" and not allow_pickle:
        raise WeightsError(
            f"{file} is a pickle: loading it runs code stored in the file, so vlpipe reads a "
            ".pkl only when you pass --allow-pickle. Pass it if you trust this file (e.g. "
            "py-bottom-up-attention's faster_rcnn_from_caffe_attr.pkl)."
        )
    overrides = dict(model_kwargs)
    if isinstance(overrides.get("convention"), str):
        raise ValueError("the box convention comes with the checkpoint; drop 'convention'")
    return build_from_checkpoint(weights, allow_pickle=allow_pickle, **overrides)


def model_record(model: BUTDFasterRCNN, arch: str, impl: str = "native") -> dict[str, Any]:
    return {
        "arch": arch,
        "impl": impl,
        "config": dataclasses.asdict(model.config),
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
    **_,
) -> FrcnnExtractor:
    """The registry's builder. Unset box options take the policy's defaults (caffe: 36 to 36
    boxes at confidence 0.2; adaptive: 10 to 100; maxnms: 36)."""
    policy = BoxPolicy.build(
        box_policy or "caffe",
        min_boxes=min_boxes,
        max_boxes=max_boxes,
        conf_threshold=conf_threshold,
    )
    transform = FrcnnTransform(min_size=image_size or 600, max_size=max_size or 1000)
    if transform.min_size > transform.max_size:
        raise ValueError(
            f"--image-size {transform.min_size} exceeds --max-size {transform.max_size}"
        )
    impl = impl or "native"
    if impl == "detectron2":
        from .d2_backend import build_detectron2

        return build_detectron2(config, weights, transform, policy, allow_pickle=allow_pickle)
    if impl != "native":
        raise ValueError(f"unknown --impl {impl!r}; expected native or detectron2")
    if config is not None:
        raise ValueError("--config is a detectron2 config file: it needs --impl detectron2")
    model = load_model(weights, model_kwargs, allow_pickle=allow_pickle)
    record = model_record(model, arch or DEFAULT_ARCH)
    return FrcnnExtractor(
        model,
        weights,
        record,
        transform,
        policy,
        model.config.convention,
        model.config.feature_dim,
    )
