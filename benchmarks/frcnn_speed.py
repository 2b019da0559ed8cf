"""BUTD Faster R-CNN extraction speed and memory: images/s and peak memory of the `frcnn`
extractor's `encode` (detect + box selection), with a per-stage breakdown.

Full-size architecture (ResNet-101 C4, 1600 classes / 400 attributes), random weights seeded
(speed does not depend on the weights; box counts do a little). Synthetic images are sized so
the preprocessing keeps them as they are (scale 1), so the setting is exactly what is printed.

Peak memory: RSS of the process on CPU (ru_maxrss, includes the model), on CUDA
torch.cuda.max_memory_allocated over the timed batches.

With --precision fp16 / bf16 (autocast), the same images first run in fp32 and the report adds
the fp32 images/s of that run and the drift: the share of fp32-selected boxes also selected in
reduced precision (same box within 0.5 px) and, over those boxes, the max abs / mean abs / mean
relative difference of their features. --json PATH also writes these figures as JSON.

    python benchmarks/frcnn_speed.py                 # CPU, 300x500, 100 proposals, 3 images
    python benchmarks/frcnn_speed.py --device cuda --precision fp16   # 600x1000, 300, 32 images
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
from PIL import Image

from vlpipe.extract.base import Batch
from vlpipe.extract.frcnn.extractor import build_frcnn
from vlpipe.extract.runner import autocast

GPU_DEFAULTS = {"height": 600, "width": 1000, "proposals": 300, "images": 32, "batch_size": 8}
CPU_DEFAULTS = {"height": 300, "width": 500, "proposals": 100, "images": 3, "batch_size": 1}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--height", type=int, help="image height (cpu 300, cuda 600)")
    p.add_argument("--width", type=int, help="image width (cpu 500, cuda 1000)")
    p.add_argument("--proposals", type=int, help="RPN proposals kept (cpu 100, cuda 300)")
    p.add_argument("--images", type=int, help="timed images (cpu 3, cuda 32)")
    p.add_argument("--batch-size", type=int, help="images per encode call (cpu 1, cuda 8)")
    p.add_argument("--policy", default="caffe", choices=["caffe", "maxnms", "adaptive"])
    p.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    defaults = GPU_DEFAULTS if args.device.startswith("cuda") else CPU_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def build(args: argparse.Namespace):
    torch.manual_seed(args.seed)
    extractor = build_frcnn(
        arch=None,
        weights=None,
        image_size=min(args.height, args.width),
        max_size=max(args.height, args.width),
        model_kwargs={},
        frcnn_set=(f"rpn_post_nms_topk={args.proposals}",),
        box_policy=args.policy,
    )
    return extractor.to(args.device)


def make_batches(args: argparse.Namespace, transform) -> list[tuple[list, list]]:
    """(pixels on the device, original hw) per batch, preprocessed up front."""
    rng = np.random.default_rng(args.seed)
    count = args.images + args.warmup * args.batch_size
    images = [
        Image.fromarray(rng.integers(0, 256, (args.height, args.width, 3), dtype=np.uint8))
        for _ in range(count)
    ]
    pixels = [transform(img).to(args.device) for img in images]
    hw = [(args.height, args.width)] * count
    size = args.batch_size
    return [(pixels[i : i + size], hw[i : i + size]) for i in range(0, count, size)]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(extractor, batches, args, precision: str) -> tuple[float, float, list]:
    """Seconds of the timed batches, of which in `detect`, and their outputs."""
    device = torch.device(args.device)
    clock = {"detect": 0.0}
    detect = extractor.detect

    def timed_detect(images, scales):  # split encode into detect + box selection
        _sync(args.device)
        start = time.perf_counter()
        result = detect(images, scales)
        _sync(args.device)
        clock["detect"] += time.perf_counter() - start
        return result

    extractor.detect = timed_detect
    outputs, total = [], 0.0
    try:
        for i, (pixels, hw) in enumerate(batches):
            if i == args.warmup:
                clock["detect"] = 0.0
            with torch.inference_mode(), autocast(device, precision):
                _sync(args.device)
                start = time.perf_counter()
                out = extractor.encode(Batch(pixels, hw))
                _sync(args.device)
                elapsed = time.perf_counter() - start
            if i >= args.warmup:
                total += elapsed
                outputs.append({k: v.float().cpu() for k, v in out.items()})
    finally:
        del extractor.detect
    return total, clock["detect"], outputs


def drift(reference: list[dict], other: list[dict]) -> dict[str, float]:
    matched, total, max_abs, mean_abs, rel = 0, 0, 0.0, [], []
    for ref, out in zip(reference, other, strict=True):
        for b in range(ref["image_boxes"].shape[0]):
            ref_boxes = ref["image_boxes"][b][ref["image_mask"][b].bool()]
            out_mask = out["image_mask"][b].bool()
            out_boxes, out_feats = out["image_boxes"][b][out_mask], out["image_feats"][b][out_mask]
            total += len(ref_boxes)
            if not len(out_boxes):
                continue
            dist = torch.cdist(ref_boxes, out_boxes, p=float("inf"))
            best, idx = dist.min(dim=1)
            for r in torch.nonzero(best <= 0.5).flatten().tolist():
                a, c = ref["image_feats"][b][r], out_feats[idx[r]]
                max_abs = max(max_abs, float((a - c).abs().max()))
                mean_abs.append(float((a - c).abs().mean()))
                rel.append(float((a - c).norm() / a.norm().clamp(min=1e-12)))
                matched += 1
    return {
        "boxes_kept": matched / max(total, 1),
        "feat_max_abs": max_abs,
        "feat_mean_abs": float(np.mean(mean_abs)) if mean_abs else float("nan"),
        "feat_mean_rel": float(np.mean(rel)) if rel else float("nan"),
    }


def peak_memory_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    args = parse_args()
    extractor = build(args)
    batches = make_batches(args, extractor.transform)
    print(
        f"frcnn R101-C4 random init | {args.device} {args.precision} | {args.height}x"
        f"{args.width} | {args.proposals} proposals | policy {args.policy} | "
        f"{args.images} images, batch {args.batch_size} | torch threads "
        f"{torch.get_num_threads()}"
    )
    images, reference = args.images, None
    figures = {"config": {k: v for k, v in vars(args).items() if k != "json"}}
    if args.precision != "fp32":
        ref_seconds, _, reference = run(extractor, batches, args, "fp32")
        figures["fp32_images_per_s"] = images / ref_seconds
        print(f"fp32 reference images/s {images / ref_seconds:.3f}")
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds, detect_s, outputs = run(extractor, batches, args, args.precision)
    figures["images_per_s"] = images / seconds
    figures["detect_s_per_image"] = detect_s / images
    print(f"images/s {images / seconds:.3f}  ({seconds / images:.2f} s per image)")
    print(
        f"per image: detect {detect_s / images:.2f} s, box selection "
        f"{(seconds - detect_s) / images:.2f} s"
    )
    figures["peak_memory_mb"] = peak_memory_mb(args.device)
    print(f"peak memory {figures['peak_memory_mb']:.0f} MiB")
    kept = [int(o["image_mask"].sum()) for o in outputs]
    print(f"regions kept per batch: {kept}")
    if reference is not None:
        d = figures["drift"] = drift(reference, outputs)
        print(
            f"drift vs fp32: boxes kept {d['boxes_kept']:.3f}, features max abs "
            f"{d['feat_max_abs']:.4g}, mean abs {d['feat_mean_abs']:.4g}, mean relative "
            f"{d['feat_mean_rel']:.4g}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)


if __name__ == "__main__":
    main()
