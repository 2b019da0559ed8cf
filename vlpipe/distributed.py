"""torch.distributed under torchrun: rank / world from the environment, gloo on CPU, nccl on
GPU. A single process (no torchrun) is world size 1 and touches nothing of torch.distributed."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


def resolve_device(name: str) -> torch.device:
    """`auto` takes CUDA when present; anything else is a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
