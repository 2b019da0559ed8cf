"""A deliberately plain training loop: AdamW, linear warm-up and decay, gradient clipping,
AMP on GPU, seeded and deterministic on CPU, atomic checkpoints, exact resume.

Exact resume: the data order of epoch e is a permutation seeded by (seed, e), the trainer
state holds step, optimizer, scheduler and the torch RNG (dropout), so an interrupted run
continued with --resume takes the same steps as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from vlpipe.fusion import checkpoint as ckpt
from vlpipe.fusion.data import TaskDataset
from vlpipe.fusion.model import TaskModel
from vlpipe.fusion.tasks import Task


@dataclass
class TrainConfig:
    epochs: int = 4
    batch_size: int = 32
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_clip: float = 5.0
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    ckpt_every: int = 0  # steps between checkpoints; 0 = end of each epoch only
    device: str = "auto"
    amp: bool = True  # only takes effect on CUDA
    max_steps: int = 0  # stop after this many steps (0 = all epochs); for tests and smoke runs


class EpochOrder(Sampler[int]):
    """A seeded permutation per epoch, starting `skip` items in (resume mid-epoch)."""

    def __init__(self, n: int, seed: int, epoch: int, skip: int = 0):
        self.n, self.seed, self.epoch, self.skip = n, seed, epoch, skip

    def __iter__(self) -> Iterator[int]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        return iter(perm[self.skip :].tolist())

    def __len__(self) -> int:
        return self.n - self.skip


def resolve_device(name: str) -> torch.device:
    return torch.device(
        "cuda"
        if name == "auto" and torch.cuda.is_available()
        else ("cpu" if name == "auto" else name)
    )


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr)


def make_schedule(opt: torch.optim.Optimizer, total: int, warmup_ratio: float):
    warmup = max(1, int(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Logger:
    """Per-step CSV + TensorBoard (when installed) + a progress bar."""

    FIELDS = ("step", "epoch", "loss", "lr", "samples_per_s")

    def __init__(self, run_dir: Path, total: int, start: int, progress: bool):
        from tqdm import tqdm

        self.path = run_dir / "train_log.csv"
        kept = self._rows_up_to(start)  # a killed run may have logged past its checkpoint
        self.file = open(self.path, "w", newline="")  # noqa: SIM115 - closed in close()
        self.csv = csv.writer(self.file)
        self.csv.writerow(self.FIELDS)
        self.csv.writerows(kept)
        self.tb = _tensorboard(run_dir)
        self.bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            disable=not progress,
            dynamic_ncols=True,
            desc="train",
        )

    def _rows_up_to(self, step: int) -> list[list[str]]:
        if step == 0 or not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            return [
                [r[k] for k in self.FIELDS] for r in csv.DictReader(fh) if int(r["step"]) <= step
            ]

    def step(self, row: dict[str, float]) -> None:
        self.csv.writerow([row[k] for k in self.FIELDS])
        self.file.flush()  # `tail -f train_log.csv` works, and a killed run keeps its log
        if self.tb is not None:
            for k in ("loss", "lr", "samples_per_s"):
                self.tb.add_scalar(f"train/{k}", row[k], row["step"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: `pip install tensorboard`
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _seed_everything(seed: int, device: torch.device) -> None:
    # CPU kernels are deterministic as they are (and use_deterministic_algorithms would import
    # all of torch._inductor); on CUDA keep cuDNN from picking non-deterministic algorithms.
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = True


def _trainer_state(step, epoch, skip, opt, sched) -> dict[str, Any]:
    state = {
        "step": step,
        "epoch": epoch,
        "skip": skip,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _restore(state, opt, sched) -> tuple[int, int, int]:
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    return state["step"], state["epoch"], state["skip"]


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train(
    model: TaskModel,
    task: Task,
    data: TaskDataset,
    cfg: TrainConfig,
    run_dir: Path,
    meta: dict[str, Any],
    *,
    val: TaskDataset | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train, checkpoint and (when `val` is given) evaluate after every epoch."""
    device = resolve_device(cfg.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    _seed_everything(cfg.seed, device)
    model.to(device)
    per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = per_epoch * cfg.epochs
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, total, cfg.warmup_ratio)
    meta = dict(meta, train=asdict(cfg))
    step, epoch, skip = 0, 0, 0
    if resume:
        step, epoch, skip = _resume(run_dir, model, opt, sched)
    limit = min(total, cfg.max_steps) if cfg.max_steps else total
    log = Logger(run_dir, limit, step, progress)
    amp = cfg.amp and device.type == "cuda"
    results: dict[str, Any] = {}
    try:
        while epoch < cfg.epochs and step < limit:
            step, seen = _run_epoch(
                model,
                task,
                data,
                cfg,
                device,
                amp,
                opt,
                sched,
                log,
                run_dir,
                meta,
                step,
                epoch,
                skip,
                limit,
            )
            if seen < len(data):  # stopped mid-epoch by max_steps: resumable from here
                ckpt.save_checkpoint(
                    run_dir, step, model, meta, _trainer_state(step, epoch, seen, opt, sched)
                )
                break
            epoch, skip = epoch + 1, 0
            if val is not None:
                results = evaluate(model, task, val, cfg.batch_size, device, cfg.num_workers)[0]
                _append_jsonl(run_dir / "eval_log.jsonl", dict(results, step=step, epoch=epoch))
                log.scalars(
                    step, {f"val/{k}": v for k, v in results.items() if isinstance(v, int | float)}
                )
            ckpt.save_checkpoint(
                run_dir,
                step,
                model,
                dict(meta, eval=results),
                _trainer_state(step, epoch, 0, opt, sched),
            )
    finally:
        log.close()
    plot_curves(run_dir / "train_log.csv", run_dir / "curves.png")
    return results


def _resume(run_dir: Path, model, opt, sched) -> tuple[int, int, int]:
    latest = ckpt.latest_checkpoint(run_dir)
    if latest is None:
        raise ckpt.RunError(f"{run_dir}: nothing to resume (no checkpoint)")
    ckpt.load_weights(latest, model)
    return _restore(ckpt.load_trainer_state(latest), opt, sched)


def _run_epoch(
    model, task, data, cfg, device, amp, opt, sched, log, run_dir, meta, step, epoch, skip, limit
) -> tuple[int, int]:
    """One epoch from item `skip` on; returns (global step, items of this epoch seen)."""
    model.train()
    order = EpochOrder(len(data), cfg.seed, epoch, skip)
    seen = skip
    for batch in data.loader(cfg.batch_size, order, cfg.num_workers):
        start = time.perf_counter()
        loss = _train_step(model, task, to_device(batch, device), cfg, amp, opt, sched)
        step, seen = step + 1, seen + len(batch["target"])
        row = {
            "step": step,
            "epoch": epoch,
            "loss": loss,
            "lr": sched.get_last_lr()[0],
            "samples_per_s": len(batch["target"]) / (time.perf_counter() - start),
        }
        log.step(row)
        if cfg.ckpt_every and step % cfg.ckpt_every == 0 and seen < len(data):
            ckpt.save_checkpoint(
                run_dir, step, model, meta, _trainer_state(step, epoch, seen, opt, sched)
            )
        if step >= limit:
            break
    return step, seen


def _train_step(model, task, batch, cfg, amp, opt, sched) -> float:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        logits = model(batch)
    loss = task.loss_fn(logits.float(), batch["target"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    return float(loss.detach())


@torch.no_grad()
def predict(
    model: TaskModel,
    task: Task,
    data: TaskDataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
) -> dict[str, str]:
    """{record key: predicted answer string} over the whole dataset, in order."""
    model.eval().to(device)
    preds: dict[str, str] = {}
    position = 0
    for batch in data.loader(batch_size, None, num_workers):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(to_device(batch, device))
        for i in logits.float().argmax(-1).tolist():
            preds[data.records[position].key] = data.vocab.answer(i)
            position += 1
    return preds


def evaluate(model, task, data, batch_size, device, num_workers=0) -> tuple[dict, dict]:
    preds = predict(model, task, data, batch_size, device, num_workers)
    labelled = [r for r in data.records if r.answers or r.label]
    if not labelled:
        return {}, preds
    return task.evaluate({r.key: preds[r.key] for r in labelled}, labelled), preds


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")


def plot_curves(csv_path: Path, png_path: Path) -> None:
    """Loss and learning rate against step, drawn with PIL (no plotting dependency)."""
    from vlpipe.fusion.plot import line_plots

    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    if rows:
        steps = [int(r["step"]) for r in rows]
        line_plots(
            png_path,
            steps,
            {
                "loss": [float(r["loss"]) for r in rows],
                "learning rate": [float(r["lr"]) for r in rows],
            },
        )
