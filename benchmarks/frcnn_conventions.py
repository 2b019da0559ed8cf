"""How much each test-time convention moves the stored regions (docs/frcnn.md's table).

Start from a named set (`caffe`, `hf`), flip ONE field (or a group that is one rule) to the
other set's value, extract the same images with both, and compare the stored regions:

- images changed: images whose stored box list differs (count, or any box by > 0.5 px);
- mean best IoU: over the base's boxes, the best IoU with a variant box (1 = same boxes);
- box shift: the largest coordinate change of a region kept by both (IoU > 0.95);
- same-region feature drift: features recomputed at the base's boxes under the variant's
  preprocessing (RoI pool + res5), mean |diff| relative to the mean |feature|, and max |diff|;
- attribute confidence: the largest change on regions kept by both.

Random weights: a few-channel ResNet-50-depth trunk with the full 1600-class / 400-attribute
heads and the real anchors (64..512), seeded. Random weights make class scores nearly uniform
and proposals scattered, so the box-set figures exaggerate (policy, NMS) or understate (small
objects, min-size filter) what trained weights do; see docs/frcnn.md.

    python benchmarks/frcnn_conventions.py --images DIR [--limit 12]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torchvision.ops import box_iou

from vlpipe.extract.base import Batch
from vlpipe.extract.frcnn import BUTDFasterRCNN, FrcnnConfig
from vlpipe.extract.frcnn.conventions import CAFFE, HF, FrcnnConventions
from vlpipe.extract.frcnn.extractor import BoxPolicy, FrcnnExtractor, FrcnnTransform
from vlpipe.extract.images import load_image

FLIPS: list[tuple[str, tuple[str, ...] | None]] = [
    ("pixel order BGR / RGB", ("pixel_order",)),
    ("sizes 600/1000 vs 800/1333", ("min_size", "max_size")),
    ("long-side cap after / before rounding", ("resize_cap",)),
    ("side rounding half-even / half-up", ("size_rounding",)),
    ("sampling grid exact scale / per-axis ratio", ("resize_grid",)),
    ("min proposal size 16 px x scale / 0", ("rpn_min_size", "rpn_min_size_unit",
                                              "rpn_min_size_inclusive")),
    ("small-box filter before / after top-k", ("rpn_filter_before_topk",)),
    ("RPN NMS +1 areas", ("rpn_nms_plus_one",)),
    ("clip to size - 1 / size", ("clip_minus_one",)),
    ("delta clamp none / log(1000/16)", ("delta_clamp",)),
    ("attribute softmax over 401 / 400", ("attr_conf_with_none",)),
    ("boxes back by one scale / per axis", ("box_mapping",)),
    ("class NMS +1 areas", ("class_nms_plus_one",)),
    ("box policy caffe / maxnms", ("box_policy",)),
    ("maxnms thresholds 0.3..0.9 / 0.5,0.6,0.7", ("maxnms_thresholds",)),
    ("whole set", None),
]  # fmt: skip


def build_model(conventions: FrcnnConventions, seed: int = 0) -> BUTDFasterRCNN:
    config = FrcnnConfig(stage_blocks=(3, 4, 6), res5_blocks=3, stem_channels=16,
                         res2_channels=32, bottleneck_channels=8, rpn_channels=32,
                         class_embed_dim=32, attr_hidden_dim=64)  # fmt: skip
    torch.manual_seed(seed)
    model = BUTDFasterRCNN(config, conventions)
    state = model.state_dict()
    gen = torch.Generator().manual_seed(seed + 1)
    for key in state:  # non-trivial frozen-norm statistics
        if key.endswith("norm.running_var"):
            state[key] = torch.rand(state[key].shape, generator=gen) + 0.5
        elif key.endswith("norm.running_mean"):
            state[key] = torch.randn(state[key].shape, generator=gen) * 0.1
    model.load_state_dict(state)
    return model.eval()


def run(conventions: FrcnnConventions, images, regions=None) -> list[dict]:
    """Stored rows per image, plus features at `regions`' boxes (original pixels)."""
    model = build_model(conventions)
    transform = FrcnnTransform(conventions)
    policy = BoxPolicy.build(None, conventions=conventions)
    ext = FrcnnExtractor(model, None, {}, transform, policy, model.config.convention,
                         model.config.feature_dim)  # fmt: skip
    rows = []
    for i, image in enumerate(images):
        hw = (image.height, image.width)
        with torch.inference_mode():
            pixels = transform(image)
            out = ext.encode(Batch([pixels], [hw]))
            k = int(out["image_mask"][0].sum())
            row = {
                name: v[0, :k] for name, v in out.items() if name not in ("image_mask", "image_hw")
            }
            boxes = (regions[i] if regions else row)["image_boxes"]
            sy, sx = transform.plan(*hw).box_scale
            fmap = model.backbone(pixels[None])
            pooled = model.roi_heads.pool([fmap], [boxes * torch.tensor([sx, sy, sx, sy])])
            row["probe"] = model.roi_heads.region_features(pooled)
        rows.append(row)
    return rows


def compare(base: list[dict], other: list[dict]) -> dict:
    changed, ious, drift_rel, drift_max, shift, attr = 0, [], [], 0.0, 0.0, 0.0
    for a, b in zip(base, other, strict=True):
        same = a["image_boxes"].shape == b["image_boxes"].shape and torch.allclose(
            a["image_boxes"], b["image_boxes"], atol=0.5
        )
        changed += not same
        best, idx = box_iou(a["image_boxes"], b["image_boxes"]).max(1)
        ious.append(best.mean().item())
        drift = (a["probe"] - b["probe"]).abs()  # both probed alike: RoIPool rounding cancels
        drift_rel.append((drift.mean() / a["image_feats"].abs().mean()).item())
        drift_max = max(drift_max, drift.max().item())
        match = best > 0.95
        if match.any():
            moved = a["image_boxes"][match] - b["image_boxes"][idx[match]]
            shift = max(shift, moved.abs().max().item())
            dattr = a["attr_conf"][match] - b["attr_conf"][idx[match]]
            attr = max(attr, dattr.abs().max().item())
    return {
        "images_changed": f"{changed}/{len(base)}",
        "mean_best_iou": round(float(np.mean(ious)), 3),
        "box_shift_px": round(shift, 2),
        "feat_drift_rel": round(float(np.mean(drift_rel)), 4),
        "feat_drift_max": round(drift_max, 3),
        "attr_conf_max": round(attr, 5),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=Path, required=True, help="a folder of images")
    p.add_argument("--limit", type=int, default=12)
    args = p.parse_args()
    paths = sorted(q for q in args.images.iterdir() if q.suffix.lower() in (".png", ".jpg"))
    images = [load_image(q) for q in paths[: args.limit]]
    for base_name, base, other in (("caffe", CAFFE, HF), ("hf", HF, CAFFE)):
        ref = run(base, images)
        for label, fields in FLIPS:
            variant = (
                other if fields is None else base.replace(**{f: getattr(other, f) for f in fields})
            )
            thresholds_unused = fields == ("maxnms_thresholds",) and base.box_policy != "maxnms"
            if variant == base or thresholds_unused:
                continue
            result = compare(ref, run(variant, images, regions=ref))
            print(json.dumps({"base": base_name, "flip": label, **result}), flush=True)


if __name__ == "__main__":
    main()
