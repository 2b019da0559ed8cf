"""A deliberately plain training loop: AdamW with linear warm-up and decay (or LXMERT's BertAdam
and its schedule), gradient clipping, AMP on GPU, seeded and deterministic on CPU, atomic
checkpoints, exact resume.

Exact resume: the data order of epoch e is a permutation seeded by (seed, e), the trainer
state holds step, optimizer, scheduler and the torch RNG (dropout), so an interrupted run
continued with --resume takes the same steps as an uninterrupted one.

A step is an optimizer step: grad_accum micro-batches of batch_size examples each. Validation
(every epoch, or every val_every steps) never draws from the global RNG, writes a checkpoint,
and moves the BEST pointer when the task's headline metric is the highest so far; the best and
the patience count of early stopping are part of the trainer state, so they resume exactly too.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from vlpipe import distributed
from vlpipe.distributed import resolve_device
from vlpipe.errors import ConfigError
from vlpipe.fusion import checkpoint as ckpt
from vlpipe.fusion.data import TaskDataset
from vlpipe.fusion.model import TaskModel
from vlpipe.fusion.optim import BertAdam, warmup_linear_schedule
from vlpipe.fusion.tasks import Task
from vlpipe.fusion.train_config import TrainConfig
from vlpipe.io import write_text_atomic


class EpochOrder(Sampler[int]):
    """A seeded permutation per epoch, this rank's share of it (every world-th item, padded by
    wrapping so all ranks take the same number of steps), starting `offset` items in."""

    def __init__(
        self, n: int, seed: int, epoch: int, offset: int = 0, rank: int = 0, world: int = 1
    ):
        self.n, self.seed, self.epoch, self.offset = n, seed, epoch, offset
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[int]:
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        padded = np.resize(perm, self.per_rank(self.n, self.world) * self.world)
        return iter(padded[self.rank :: self.world][self.offset :].tolist())

    @staticmethod
    def per_rank(n: int, world: int) -> int:
        return math.ceil(n / world)

    def __len__(self) -> int:
        return max(0, self.per_rank(self.n, self.world) - self.offset)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimiser over the trainable parameters; encoder tops (`tops.*`) at
    cfg.encoder_lr when it is set."""
    encoder_lr = cfg.lr if cfg.encoder_lr is None else cfg.encoder_lr
    if cfg.optimizer == "bertadam":  # decay on everything, as LXMERT passes it
        groups = [
            {"params": params, "lr": encoder_lr if encoder else cfg.lr}
            for encoder, params in _by_encoder(model, lambda name, p: True).items()
        ]
        return BertAdam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    groups = []
    for decays in (True, False):
        chosen = _by_encoder(model, lambda name, p, d=decays: _decays(name, p) == d)
        for encoder, params in chosen.items():
            groups.append(
                {
                    "params": params,
                    "weight_decay": cfg.weight_decay if decays else 0.0,
                    "lr": encoder_lr if encoder else cfg.lr,
                }
            )
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _decays(name: str, p: torch.nn.Parameter) -> bool:
    """AdamW's weight decay: not on biases and norms."""
    return p.ndim >= 2 and "norm" not in name.lower()


def _by_encoder(model: torch.nn.Module, keep) -> dict[bool, list[torch.nn.Parameter]]:
    """{is an encoder top's: trainable parameters `keep(name, p)` admits}, non-empty groups
    only, the fusion and head first (the logged lr is theirs)."""
    out: dict[bool, list] = {False: [], True: []}
    for name, p in model.named_parameters():
        if p.requires_grad and keep(name, p):
            out[name.startswith("tops.")].append(p)
    return {k: v for k, v in out.items() if v}


def make_schedule(
    opt: torch.optim.Optimizer, total: int, warmup_ratio: float, optimizer: str = "adamw"
):
    if optimizer == "bertadam":
        return warmup_linear_schedule(opt, total, warmup_ratio)
    warmup = max(1, int(total * warmup_ratio))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Logger:
    """Per-step CSV + TensorBoard (when installed) + a progress bar; `parts`: loss terms logged
    beside the total, as loss_<part> columns."""

    FIELDS = ("step", "epoch", "loss", "lr", "samples_per_s")

    def __init__(
        self,
        run_dir: Path,
        total: int,
        start: int,
        progress: bool,
        main: bool = True,
        parts: tuple[str, ...] = (),
    ):
        from tqdm import tqdm

        self.main = main
        self.fields = self.FIELDS + tuple(f"loss_{p}" for p in parts)
        if not main:  # other ranks: the same calls, no output
            self.bar, self.file, self.tb = tqdm(disable=True), None, None
            return
        self.path = run_dir / "train_log.csv"
        # A killed run may have logged past its checkpoint: keep the rows up to `start`,
        # replacing the file atomically (a kill here leaves the old log, never an empty one).
        text = io.StringIO(newline="")
        csv.writer(text).writerows([self.fields, *self._rows_up_to(start)])
        write_text_atomic(self.path, text.getvalue())
        _trim_jsonl(run_dir / "eval_log.jsonl", start)
        self.file = open(self.path, "a", newline="")  # noqa: SIM115 - closed in close()
        self.csv = csv.writer(self.file)
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
        """Complete rows of steps <= `step` (a row cut short by a kill is dropped)."""
        if step == 0 or not self.path.exists():
            return []
        with open(self.path, newline="") as fh:
            rows = [[r.get(k) for k in self.fields] for r in csv.DictReader(fh)]
        return [r for r in rows if None not in r and _int(r[0], step + 1) <= step]

    def step(self, row: dict[str, float]) -> None:
        if not self.main:
            return
        self.csv.writerow([row[k] for k in self.fields])
        self.file.flush()  # `tail -f train_log.csv` works, and a killed run keeps its log
        if self.tb is not None:
            for k in self.fields[2:]:
                self.tb.add_scalar(f"train/{k}", row[k], row["step"])
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.main and self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _int(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


def _trim_jsonl(path: Path, step: int) -> None:
    """Drop evaluation rows logged after `step` (a kill between evaluation and checkpoint),
    atomically."""
    if not path.exists():
        return
    rows = _read_jsonl(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) != len(rows):
        write_text_atomic(path, "".join(json.dumps(r, default=str) + "\n" for r in kept))


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


def _trainer_state(step, epoch, offset, opt, sched) -> dict[str, Any]:
    state = {
        "step": step,
        "epoch": epoch,
        "offset": offset,
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
    # "skip" is what checkpoints written before the position was renamed call the offset
    return state["step"], state["epoch"], state.get("offset", state.get("skip", 0))


def steps_per_epoch(n: int, batch_size: int, grad_accum: int, world: int) -> int:
    """Optimizer steps per epoch: this rank's share in batches, grad_accum batches a step (the
    last step of an epoch may take fewer)."""
    return math.ceil(math.ceil(EpochOrder.per_rank(n, world) / batch_size) / grad_accum)


def _groups(batches: Iterator[dict] | Any, size: int) -> Iterator[list[dict]]:
    """The batches in groups of `size` (the last one may be smaller)."""
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class TaskObjective:
    """What the trainer optimises and judges a run by, for a fine-tuning task: the task's loss
    on the model's logits, validated by the task's official metric (higher is better).

    An objective has `headline` and `higher_is_better` (the validation figure BEST and early
    stopping follow), `parts` (loss terms logged beside the total, here none), and:
    examples(batch) (examples in it), weight(batch) (what the loss is a mean over: the
    micro-batches of a step are weighed by it), losses(net, batch) (the loss and its parts)
    and validate(model, data, batch_size, device, num_workers, dist) (the results dict).
    `fusion/pretrain.py` has the pre-training one."""

    parts: tuple[str, ...] = ()
    higher_is_better = True

    def __init__(self, task: Task):
        self.task = task
        self.headline = task.headline

    def examples(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["target"])

    def weight(self, batch: dict[str, torch.Tensor]) -> int:
        return self.task.loss_count(batch["target"])

    def losses(self, net, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = net(batch)
        if not self.weight(batch):  # no answer in the vocabulary: 0, not the mean's NaN
            return logits.sum() * 0.0, {}
        return self.task.loss_fn(logits.float(), batch["target"]), {}

    def validate(self, model, data, batch_size, device, num_workers, dist) -> dict[str, Any]:
        return evaluate(model, self.task, data, batch_size, device, num_workers, dist)[0]


class Trainer:
    """The state of one run: model (DDP-wrapped under torchrun), optimizer, schedule, position,
    and the validation record (best headline metric, validations since it improved). Rank 0
    alone logs and writes checkpoints; metrics are gathered across ranks, so every rank judges
    a validation alike and stops early at the same step."""

    def __init__(
        self,
        model: torch.nn.Module,
        task: Task | TaskObjective,
        data: TaskDataset,
        cfg: TrainConfig,
        run_dir: Path,
        meta: dict[str, Any],
        progress: bool = True,
    ):
        self.device = resolve_device(cfg.device)
        self.dist = distributed.init(self.device.type)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        _seed_everything(cfg.seed, self.device)
        self.objective = task if hasattr(task, "losses") else TaskObjective(task)
        self.model, self.data, self.cfg, self.run_dir = model, data, cfg, run_dir
        self.meta = dict(meta, train=asdict(cfg), world_size=self.dist.world)
        model.to(self.device)
        self.net = self._wrap(model)
        self.per_epoch = steps_per_epoch(len(data), cfg.batch_size, cfg.grad_accum, self.dist.world)
        self.total = self.per_epoch * cfg.epochs
        self.limit = min(self.total, cfg.max_steps) if cfg.max_steps else self.total
        self.opt = make_optimizer(model, cfg)
        self.sched = make_schedule(self.opt, self.total, cfg.warmup_ratio, cfg.optimizer)
        self.amp = cfg.amp and self.device.type == "cuda"
        # The position, and the only one: optimizer steps taken, epoch, items of this rank's
        # share of the epoch already trained on. Checkpoints store exactly these three.
        self.step, self.epoch, self.offset = 0, 0, 0
        # The validation record, in the trainer state too: the best headline metric so far
        # ({"metric", "value", "step"}) and the validations in a row that did not improve it.
        self.best: dict[str, Any] | None = None
        self.bad_evals = 0
        self.results: dict[str, Any] = {}  # the last validation's
        self.saved_at = -1  # the step of the last checkpoint written
        # wall time spent training, over every session of the run (resumes add to it)
        self.seconds_before, self.started = 0.0, time.perf_counter()
        self.progress = progress and self.dist.main

    def _wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.dist.enabled:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def resume(self) -> None:
        latest = ckpt.latest_checkpoint(self.run_dir)
        if latest is None:
            raise ckpt.RunError(f"{self.run_dir}: nothing to resume (no checkpoint)")
        saved = ckpt.load_meta(latest)
        saved_world = saved.get("world_size", 1)
        if saved_world != self.dist.world:
            raise ckpt.RunError(
                f"{latest}: written by {saved_world} processes, resuming with "
                f"{self.dist.world} would change the data order"
            )
        ckpt.load_weights(latest, self.model)
        state = ckpt.load_trainer_state(latest)
        self.step, self.epoch, self.offset = _restore(state, self.opt, self.sched)
        # trainer states written before validation was recorded hold neither
        self.best, self.bad_evals = state.get("best"), state.get("bad_evals", 0)
        self.seconds_before = float(saved.get("train_seconds", 0.0))
        self.results, self.saved_at = saved.get("eval") or {}, self.step
        if self.best is not None and self.dist.main:  # a kill may have come before BEST moved
            ckpt.point_best(self.run_dir, self.best["step"])

    def save(self, extra: dict[str, Any] | None = None, best: bool = False) -> None:
        """Checkpoint the current position (rank 0 writes; all ranks wait for it)."""
        if self.dist.main:
            state = _trainer_state(self.step, self.epoch, self.offset, self.opt, self.sched)
            state.update(best=self.best, bad_evals=self.bad_evals)
            meta = dict(self.meta, **(extra or {}), train_seconds=self.train_seconds())
            if self.best is not None:
                meta["best"] = self.best
            ckpt.save_checkpoint(self.run_dir, self.step, self.model, meta, state, best=best)
        self.saved_at = self.step
        distributed.barrier(self.dist)

    def train_seconds(self) -> float:
        """Wall time of the run so far: the sessions before this one, and this one."""
        return self.seconds_before + time.perf_counter() - self.started

    def fit(self, val: TaskDataset | None = None) -> dict[str, Any]:
        """Train (from the resumed position), validate and checkpoint as configured, stop
        early when the headline metric stops improving. Returns the last validation's
        results."""
        if val is None and (self.cfg.val_every or self.cfg.early_stop):
            raise ConfigError("--val-every and --early-stop need validation examples")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        if self.stopped_early():
            self._say_stopped("; nothing more to train (a larger --early-stop continues it)")
            return self.results
        log = Logger(
            self.run_dir,
            self.limit,
            self.step,
            self.progress,
            self.dist.main,
            parts=self.objective.parts,
        )
        try:
            while self.epoch < self.cfg.epochs and self.step < self.limit:
                if not self._epoch(log, val):  # stopped by max_steps or early stopping
                    break
                self.epoch, self.offset = self.epoch + 1, 0
                self._epoch_end(val, log)
                if self.stopped_early():
                    break
            if self.saved_at != self.step:  # stopped by max_steps: resumable from here
                self.save()
        finally:
            log.close()
        if self.dist.main:
            plot_curves(self.run_dir / "train_log.csv", self.run_dir / "curves.png")
        return self.results

    def _epoch(self, log: Logger, val: TaskDataset | None) -> bool:
        """Train on this rank's share of the epoch from `self.offset` on, advancing the
        position; True when the share is done, False when max_steps or early stopping stopped
        it. The end of the share is `fit`'s to handle."""
        self.net.train()
        share = EpochOrder.per_rank(len(self.data), self.dist.world)
        order = EpochOrder(
            len(self.data), self.cfg.seed, self.epoch, self.offset, self.dist.rank, self.dist.world
        )
        if hasattr(self.data, "set_epoch"):  # data whose examples are drawn anew each epoch
            self.data.set_epoch(self.epoch)
        loader = self.data.loader(self.cfg.batch_size, order, self.cfg.num_workers)
        # a step's micro-batches are read before its first backward: their weights need the
        # step's example count (the last step of an epoch has fewer)
        for group in _groups(loader, self.cfg.grad_accum):
            start = time.perf_counter()
            batches = [to_device(batch, self.device) for batch in group]
            loss, parts = self._step(batches)
            loss = distributed.mean(self.dist, loss)
            parts = {f"loss_{k}": distributed.mean(self.dist, v) for k, v in parts.items()}
            n = sum(self.objective.examples(batch) for batch in group)
            self.step, self.offset = self.step + 1, self.offset + n
            log.step(
                {
                    "step": self.step,
                    "epoch": self.epoch,
                    "loss": loss,
                    "lr": self.sched.get_last_lr()[0],
                    "samples_per_s": n * self.dist.world / (time.perf_counter() - start),
                    **parts,
                }
            )
            if self.offset < share:
                self._periodic(val, log)
            if self.step >= self.limit or self.stopped_early():
                break
        return self.offset >= share

    def _periodic(self, val: TaskDataset | None, log: Logger) -> None:
        """Within an epoch: validate every val_every steps, checkpoint every ckpt_every."""
        cfg = self.cfg
        if cfg.val_every and self.step % cfg.val_every == 0:
            self._validate_and_save(val, log)
        elif cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
            self.save()

    def _epoch_end(self, val: TaskDataset | None, log: Logger) -> None:
        """Validate (every epoch when val_every is 0, else on its steps and the run's last
        step) and checkpoint."""
        every = self.cfg.val_every
        due = not every or self.step % every == 0 or self.step == self.total
        if val is not None and due:
            self._validate_and_save(val, log)
        else:
            self.save()

    def _validate_and_save(self, val: TaskDataset | None, log: Logger) -> None:
        self.results = self._validate(val, log)
        improved = self._judge(self.results)
        extra: dict[str, Any] = {"eval": self.results}
        if self.stopped_early():
            extra["stopped"] = self._stop_reason()
        self.save(extra, best=improved)
        if self.stopped_early():
            self._say_stopped()

    def _judge(self, results: dict[str, Any]) -> bool:
        """Count a validation against the best headline metric so far: a gain of more than
        early_stop_delta resets the patience count, anything less adds one to it; True when
        it is the best so far (the highest, or for a loss the lowest), which BEST then names."""
        metric = self.objective.headline
        value = results.get(metric)
        if not isinstance(value, int | float):  # nothing labelled to score: no judgement
            return False
        sign = 1.0 if self.objective.higher_is_better else -1.0
        before = self.best["value"] if self.best is not None else None
        if before is None or sign * (value - before) > self.cfg.early_stop_delta:
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        if before is not None and not sign * (value - before) > 0:
            return False
        self.best = {"metric": metric, "value": float(value), "step": self.step}
        return True

    def stopped_early(self) -> bool:
        return bool(self.cfg.early_stop) and self.bad_evals >= self.cfg.early_stop

    def _stop_reason(self) -> str:
        best = self.best or {}
        return (
            f"early_stop after {self.bad_evals} validations without improvement of "
            f"{best.get('metric')} by more than {self.cfg.early_stop_delta} (best "
            f"{best.get('value', float('nan')):.2f} at step {best.get('step')})"
        )

    def _say_stopped(self, then: str = "") -> None:
        if self.dist.main:
            print(f"{self.run_dir}: stopped at step {self.step}: {self._stop_reason()}{then}")

    def _step(self, batches: list[dict[str, torch.Tensor]]) -> tuple[float, dict[str, float]]:
        """One optimizer step over `batches` (grad_accum micro-batches; the last step of an
        epoch may have fewer). Each micro-batch's loss is weighed by its share of what the
        step's loss is a mean over (the objective's weight: Task.loss_count), so the gradient
        is that of the step as one batch; under DDP only the last micro-batch synchronises
        gradients. Returns the step's loss and its parts, weighed alike."""
        weights = [self.objective.weight(batch) for batch in batches]
        total = sum(weights)
        self.opt.zero_grad(set_to_none=True)
        step_loss, step_parts = 0.0, {}
        for i, (batch, weight) in enumerate(zip(batches, weights, strict=True)):
            share = weight / total if total else 0.0
            with self._sync(i == len(batches) - 1):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
                    loss, parts = self.objective.losses(self.net, batch)
                loss = loss * share
                loss.backward()
            step_loss += float(loss.detach())
            for name, part in parts.items():
                step_parts[name] = step_parts.get(name, 0.0) + float(part.detach()) * share
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        return step_loss, step_parts

    def _sync(self, last: bool):
        """DDP all-reduces gradients on the last micro-batch of a step only."""
        if last or not isinstance(self.net, torch.nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.net.no_sync()

    def _validate(self, val: TaskDataset, log: Logger) -> dict[str, Any]:
        results = self.objective.validate(
            self.model, val, self.cfg.batch_size, self.device, self.cfg.num_workers, self.dist
        )
        self.net.train()  # predict() left the model in eval mode; dropout resumes
        if self.dist.main:
            _append_jsonl(
                self.run_dir / "eval_log.jsonl", dict(results, step=self.step, epoch=self.epoch)
            )
            log.scalars(
                self.step, {f"val/{k}": v for k, v in results.items() if isinstance(v, int | float)}
            )
        return results


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
    """Train, checkpoint and (when `val` is given) validate after every epoch or every
    cfg.val_every steps, keeping the best checkpoint and stopping early if asked."""
    trainer = Trainer(model, task, data, cfg, run_dir, meta, progress)
    if resume:
        trainer.resume()
    return trainer.fit(val)


@torch.no_grad()
def predict(
    model: TaskModel,
    task: Task,
    data: TaskDataset,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    dist_info: distributed.DistInfo | None = None,
    probabilities: dict[str, list[float]] | None = None,
) -> dict[str, str]:
    """{record key: predicted answer string}; under torchrun each rank predicts every world-th
    record and the parts are gathered. `probabilities`, when given, is filled with each
    record's softmax over the answers (the answer-choice probabilities a VCR submission is)."""
    info = dist_info or distributed.DistInfo()
    model.eval().to(device)
    indices = list(range(info.rank, len(data), info.world))
    preds: dict[str, str] = {}
    for start in range(0, len(indices), batch_size * 16):  # bounded memory, few loader starts
        chunk = indices[start : start + batch_size * 16]
        for batch_indices, batch in zip(
            _chunks(chunk, batch_size), data.loader(batch_size, chunk, num_workers), strict=True
        ):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(to_device(batch, device))
            logits = logits.float()
            keys = [data.records[i].key for i in batch_indices]
            for key, answer in zip(keys, logits.argmax(-1).tolist(), strict=True):
                preds[key] = data.vocab.answer(answer)
            if probabilities is not None:
                probabilities.update(zip(keys, logits.softmax(-1).tolist(), strict=True))
    if probabilities is not None:
        probabilities.update(distributed.gather_dicts(info, dict(probabilities)))
    return distributed.gather_dicts(info, preds)


def _chunks(items: list[int], size: int) -> Iterator[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def evaluate(
    model,
    task,
    data,
    batch_size,
    device,
    num_workers=0,
    dist_info: distributed.DistInfo | None = None,
) -> tuple[dict, dict]:
    preds = predict(model, task, data, batch_size, device, num_workers, dist_info)
    labelled = [r for r in data.records if r.labelled]
    if not labelled:
        return {}, preds
    return task.evaluate({r.key: preds[r.key] for r in labelled}, labelled), preds


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(row, default=str) + "\n")


def plot_curves(csv_path: Path, png_path: Path) -> None:
    """Loss and learning rate against step, and the validation metric after each evaluation
    (from eval_log.jsonl beside the CSV), drawn with matplotlib."""
    from vlpipe.fusion.plot import line_plots

    with open(csv_path) as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return
    steps = [int(r["step"]) for r in rows]
    series = {
        "loss": (steps, [float(r["loss"]) for r in rows]),
        "learning rate": (steps, [float(r["lr"]) for r in rows]),
    }
    evals = _read_jsonl(csv_path.parent / "eval_log.jsonl")
    for metric in ("overall", "accuracy"):  # VQA's name, then GQA / NLVR2 / easy-VQA's
        points = [(e["step"], e[metric]) for e in evals if metric in e]
        if points:
            series[f"validation {metric} (%)"] = ([p[0] for p in points], [p[1] for p in points])
            break
    line_plots(png_path, series)


def _read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines log; a last line cut short by a kill is skipped."""
    if not path.exists():
        return []
    rows = []
    with open(path) as fh:
        for line in fh:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows
