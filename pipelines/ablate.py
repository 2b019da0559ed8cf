"""`vlpipe ablate GRID --out DIR`: every run of a grid file (pipelines/grid.py) from one set of
caches, then the report (pipelines/report.py).

    DIR/caches/<name>.h5      the grid's caches, extracted once (a rerun reuses them)
    DIR/runs/<name>/          one run folder per configuration, as `vlpipe train` writes it,
                              plus ablate.json (its state) and ablate.log (its output)
    DIR/results.{md,csv,json} the table, and results.png / curves.png

Runs execute as `vlpipe train` processes, `--jobs N` at a time (GPUs round-robin when present,
the CPU threads split between them when not), or as SLURM jobs through submitit. A rerun of the
same command skips finished runs, resumes interrupted ones and retries failed ones; a failing
run is recorded with its error and does not stop the others.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import Queue
from typing import Any

from vlpipe.config import to_toml
from vlpipe.errors import ConfigError
from vlpipe.fusion import checkpoint as ckpt
from vlpipe.io import write_text_atomic
from vlpipe.pipelines.configs import AblateJob
from vlpipe.pipelines.grid import Grid, RunPlan, load_grid

STATE, LOG, CONFIG = "ablate.json", "ablate.log", "ablate.toml"


@dataclass
class Planned:
    """A run and what a rerun finds of it: new, done, interrupted, failed or changed."""

    plan: RunPlan
    config: str  # the resolved train config, as TOML
    state: str
    error: str | None = None

    @property
    def run_dir(self) -> Path:
        return Path(self.plan.layer["out"])


def plan_runs(grid: Grid) -> list[Planned]:
    """Every run of the grid, its config resolved and checked (a bad value fails here, before
    anything runs), and its state on disk."""
    from vlpipe.pipelines.train_job import resolve_train

    planned = []
    for run in grid.runs:
        try:
            job = resolve_train(run.layer)
        except ConfigError as err:
            raise ConfigError(f"{grid.path}: run {run.name}: {err}") from err
        config = to_toml(job)
        planned.append(Planned(run, config, *_state(Path(run.layer["out"]), config)))
    return planned


def _state(run_dir: Path, config: str) -> tuple[str, str | None]:
    record = read_state(run_dir)
    has_checkpoint = (run_dir / ckpt.LATEST).exists()
    if not has_checkpoint:  # nothing trained yet: (re)start it with the grid's config
        return ("failed", record.get("error")) if record.get("state") == "failed" else ("new", None)
    if (run_dir / CONFIG).exists() and (run_dir / CONFIG).read_text() != config:
        return "changed", (
            f"{run_dir}: the grid gives this run another config than it ran with; use another "
            f"--out, or remove the folder to run it again"
        )
    if record.get("state") == "done" and has_checkpoint:
        return "done", None
    if record.get("state") == "failed":
        return "failed", record.get("error")
    return ("interrupted" if has_checkpoint else "new"), None


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / STATE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_state(run_dir: Path, **fields: Any) -> None:
    write_text_atomic(run_dir / STATE, json.dumps({**read_state(run_dir), **fields}, indent=1))


# --------------------------------------------------------------------------------------------
# The grid's caches
# --------------------------------------------------------------------------------------------
def cache_jobs(grid: Grid, job: AblateJob) -> dict[str, Any]:
    """The grid's extraction jobs, resolved and checked (a bad option fails before anything
    runs); an existing cache is resumed: finished, nothing is extracted again."""
    from vlpipe.pipelines.extract_job import resolve_extract

    jobs = {}
    for name, layer in grid.caches.items():
        resume = Path(layer["out"]).exists()
        run = {"resume": resume, "progress": job.progress, "device": job.device}
        try:
            jobs[name] = resolve_extract(layer, {"run": run})
        except ConfigError as err:
            raise ConfigError(f"{grid.path}: caches.{name}: {err}") from err
    return jobs


def extract_caches(grid: Grid, job: AblateJob) -> None:
    """Extract each cache the grid names, once: a finished cache is reused, an interrupted one
    completed (extraction resumes)."""
    from vlpipe.pipelines.extract_job import run_extract

    for name, extract in cache_jobs(grid, job).items():
        Path(extract.out).parent.mkdir(parents=True, exist_ok=True)
        summary = run_extract(extract)
        print(f"cache {name}: {summary.written} new items, {summary.skipped} reused", flush=True)
        if summary.failures:
            raise ConfigError(
                f"cache {name} ({extract.out}): {len(summary.failures)} items failed; "
                "`vlpipe inspect` lists them"
            )


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------
def run_ablate(job: AblateJob) -> tuple[list[Planned], Path | None]:
    """Plan, extract the caches, run what is not done, write the report. Returns the runs
    (their final states) and the report's results.md (None on a dry run)."""
    grid = load_grid(job.grid, job.out)
    cache_jobs(grid, job)  # every option checked before anything runs
    planned = plan_runs(grid)
    print_plan(grid, planned)
    if job.dry_run:
        return planned, None
    extract_caches(grid, job)
    todo = [p for p in planned if p.state in ("new", "interrupted", "failed")]
    for p in planned:
        if p.state == "changed":
            print(f"  skipped {p.plan.name}: {p.error}", file=sys.stderr)
    if todo:
        execute(todo, job)
    from vlpipe.pipelines.report import write_report

    ran = [p.run_dir for p in planned if (p.run_dir / ckpt.LATEST).exists()]
    report = write_report(ran, job.out, job.checkpoint) if ran else None  # rows in grid order
    return planned, report


def print_plan(grid: Grid, planned: list[Planned]) -> None:
    counts: dict[str, int] = {}
    for p in planned:
        counts[p.state] = counts.get(p.state, 0) + 1
    summary = ", ".join(f"{n} {state}" for state, n in counts.items())
    print(f"{grid.path}: {len(planned)} runs ({summary}); {len(grid.caches)} caches", flush=True)
    for name, layer in grid.caches.items():
        there = "exists" if Path(layer["out"]).exists() else "to extract"
        print(f"  cache {name:<24} {layer['out']} ({there})")
    for p in planned:
        print(f"  run   {p.plan.name:<40} {p.state}")


def execute(todo: list[Planned], job: AblateJob) -> None:
    """Run `todo` on the chosen executor, recording each run's state as it ends."""
    if job.executor == "local":
        _run_local(todo, job)
    else:
        _run_submitit(todo, job)


def _threads(job: AblateJob, slots: int) -> int:
    if job.threads:
        return job.threads
    return max(1, (os.cpu_count() or 1) // slots)


def _gpus(device: str) -> int:
    """The GPUs the runs share (CUDA_VISIBLE_DEVICES counts); none with --device cpu."""
    if device == "cpu":
        return 0
    import torch

    return torch.cuda.device_count()


def _run_local(todo: list[Planned], job: AblateJob) -> None:
    """`--jobs` `vlpipe train` processes at a time; each takes a slot (a GPU, or its share of
    the CPU threads)."""
    gpus = _gpus(job.device)
    slots: Queue[int] = Queue()
    for slot in range(job.jobs):
        slots.put(slot)
    threads = _threads(job, job.jobs)

    def one(p: Planned) -> None:
        slot = slots.get()
        try:
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            _run_process(p, job, threads, env)
        finally:
            slots.put(slot)

    with ThreadPoolExecutor(max_workers=job.jobs) as pool:
        list(pool.map(one, todo))


def train_command(p: Planned, job: AblateJob, threads: int) -> list[str]:
    resume = ["--resume"] if (p.run_dir / ckpt.LATEST).exists() else []
    device = [] if job.device == "auto" else ["--device", job.device]
    return [
        sys.executable,
        "-m",
        "vlpipe",
        "train",
        "--config",
        str(p.run_dir / CONFIG),
        "--threads",
        str(threads),
        "--no-progress",
        *device,
        *resume,
    ]


def _begin(p: Planned) -> float:
    """The run starts: its folder, the config it runs with, its state."""
    p.run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(p.run_dir / CONFIG, p.config)
    run, start = p.plan, time.time()
    _write_state(
        p.run_dir,
        name=run.name,
        configuration=run.configuration,
        variant=run.variant,
        point=run.point,
        state="running",
        started=start,
        error=None,
    )
    return start


def _run_process(p: Planned, job: AblateJob, threads: int, env: dict) -> None:
    start = _begin(p)
    print(f"  start {p.plan.name}", flush=True)
    with open(p.run_dir / LOG, "a") as log:
        log.write(f"\n$ {' '.join(train_command(p, job, threads))}\n")
        log.flush()
        code = subprocess.call(
            train_command(p, job, threads), stdout=log, stderr=subprocess.STDOUT, env=env
        )
    _finish(p, start, None if code == 0 else _error_line(p.run_dir / LOG, code))


def _finish(p: Planned, start: float, error: str | None) -> None:
    seconds = time.time() - start
    spent = read_state(p.run_dir).get("seconds_total", 0.0) + seconds
    state = "done" if error is None else "failed"
    _write_state(p.run_dir, state=state, error=error, seconds=seconds, seconds_total=spent)
    p.state, p.error = state, error
    tail = f": {error}" if error else ""
    print(f"  {state:<5} {p.plan.name} ({seconds:.0f}s){tail}", flush=True)


def _error_line(log: Path, code: int) -> str:
    """The run's own one-line error, else the last line it printed, and its exit status."""
    if code in (-2, 130, -15, 143):  # SIGINT / SIGTERM: the run is resumable from its checkpoint
        return f"exit status {code}: stopped by a signal; a rerun resumes it"
    text = log.read_text(errors="replace").splitlines()
    lines = [line.strip() for line in text if line.strip() and not line.startswith("$ ")]
    errors = [line for line in lines if line.startswith("error:")]
    last = errors[-1] if errors else (lines[-1] if lines else "no output")
    return f"exit status {code}: {last}"


# --------------------------------------------------------------------------------------------
# SLURM (or submitit's local executor) through submitit
# --------------------------------------------------------------------------------------------
def _run_submitit(todo: list[Planned], job: AblateJob) -> None:
    try:
        import submitit
    except ImportError as err:
        raise ConfigError(
            f"--executor {job.executor}: needs submitit (pip install 'vlpipe[slurm]')"
        ) from err
    folder = job.out / "submitit"
    if job.executor == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=job.slurm.time_min)
    else:
        executor = submitit.AutoExecutor(folder=folder)
        params = {"timeout_min": job.slurm.time_min, "cpus_per_task": job.slurm.cpus}
        params |= {"gpus_per_node": job.slurm.gpus, "mem_gb": job.slurm.mem_gb}
        if job.slurm.partition:
            params["slurm_partition"] = job.slurm.partition
        executor.update_parameters(name="vlpipe-ablate", **params)
    threads = job.threads or job.slurm.cpus
    started = []
    for p in todo:
        start = _begin(p)
        command = train_command(p, job, threads)
        started.append((p, start, executor.submit(_train_job, command[3:], str(p.run_dir / LOG))))
        print(f"  submitted {p.plan.name}", flush=True)
    for p, start, submitted in started:
        try:
            code = submitted.result()
            error = None if code == 0 else _error_line(p.run_dir / LOG, code)
        except Exception as err:  # noqa: BLE001 - a job's failure is recorded, the others go on
            error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1:]}"
        _finish(p, start, error)


def _train_job(args: list[str], log: str) -> int:
    """One run inside a submitit job: `vlpipe train ARGS`, its output appended to `log`."""
    with open(log, "a") as fh:
        return subprocess.call([sys.executable, "-m", "vlpipe", *args], stdout=fh, stderr=fh)
