"""torch.distributed under torchrun: rank / world from the environment, gloo on CPU, nccl on
GPU. A single process (no torchrun) is world size 1 and touches nothing of torch.distributed."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from vlpipe.errors import ConfigError

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?|mps")


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; else cpu, cuda, cuda:N (a GPU that exists) or mps."""
    if not DEVICE_PATTERN.fullmatch(name):
        raise ConfigError(f"--device {name!r}: expected auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0:
            raise ConfigError(f"--device {name}: no CUDA GPU on this machine (use auto or cpu)")
        if (device.index or 0) >= count:
            raise ConfigError(f"--device {name}: this machine has {count} CUDA GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"--device {name}: MPS is not available here")
    return device


def set_threads(threads: int) -> int:
    """torch's CPU threads: `threads`, or for 0 half the cores this process may use (at least
    one). torch's own default, every core, is slower on a small shared machine: a tiny model
    stepped 17x slower with two threads than with one on a busy 2-core machine. Returns it."""
    if threads < 0:
        raise ConfigError(f"--threads must be >= 0, got {threads}")
    if threads == 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        threads = max(1, (cores or 1) // 2)
    torch.set_num_threads(threads)
    return threads


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def from_env() -> DistInfo:
    """What torchrun put in the environment (world size 1 without torchrun)."""
    return DistInfo(
        int(os.environ.get("RANK", 0)),
        int(os.environ.get("WORLD_SIZE", 1)),
        int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(device_type: str) -> DistInfo:
    info = from_env()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend)
    return info


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_dicts(info: DistInfo, part: dict[str, Any]) -> dict[str, Any]:
    """Merge one dict per rank (e.g. predictions of each rank's shard) on every rank."""
    if not info.enabled:
        return part
    parts: list[dict[str, Any]] = [{} for _ in range(info.world)]
    dist.all_gather_object(parts, part)
    merged: dict[str, Any] = {}
    for p in parts:
        merged.update(p)
    return merged


def mean(info: DistInfo, value: float) -> float:
    """The mean of a scalar over ranks (for logging the global loss)."""
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / info.world
