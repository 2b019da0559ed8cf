"""Distributed extraction speed-up: `vlpipe extract` with 1 process vs `torchrun` with N
processes, one thread each, on the same images (easy-VQA train). Prints wall time, images/s
and the speed-up ratio; the caches are checked to hold the same keys.

    python benchmarks/extract_ranks.py --images 800 --ranks 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def extract_cmd(out: Path, args: argparse.Namespace) -> list[str]:
    return [
        "extract",
        "--backbone",
        "vit",
        "--dataset",
        "easy-vqa",
        "--split",
        "train",
        "--limit",
        str(args.images),
        "--weights",
        "random",
        "--arch",
        args.arch,
        "--image-size",
        str(args.image_size),
        "--batch-size",
        str(args.batch_size),
        "--num-workers",
        "1",
        "--cls-only",
        "--no-progress",
        "--out",
        str(out),
    ]


def timed(cmd: list[str]) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vlpipe-ranks-"))
    single = timed([sys.executable, "-m", "vlpipe", *extract_cmd(work / "one.h5", args)])
    multi = timed(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(args.ranks),
            "-m",
            "vlpipe",
            *extract_cmd(work / "many.h5", args),
        ]
    )
    from vlpipe.cache import FeatureCache

    same = sorted(FeatureCache(work / "one.h5").keys()) == sorted(
        FeatureCache(work / "many.h5").keys()
    )
    print(
        f"{args.images} images, {args.arch} at {args.image_size}px, 1 thread per process "
        f"(wall time includes process start-up and model build)"
    )
    print(f"  1 process : {single:7.1f} s  {args.images / single:7.1f} images/s")
    print(f"  {args.ranks} ranks   : {multi:7.1f} s  {args.images / multi:7.1f} images/s")
    print(f"  speed-up  : {single / multi:.2f}x   same keys: {same}")


if __name__ == "__main__":
    main()
