"""`vlpipe report DIR [DIR...]`: one table of many runs, as a paper prints it.

Each run folder's figures are its validation results at the checkpoint the report reads, the
one `vlpipe evaluate --checkpoint` reads: the best validation by the task's headline metric
(best, the BEST pointer) or the latest checkpoint (latest), as recorded with that checkpoint.
Runs that differ only in their seed are one configuration: a row gives the mean and standard
deviation over them, the per-answer-type (or per-metric) breakdown, the parameters, the train
time, samples/s, and what made each input
(backbone, architecture, weights sha256 or random-init, from the caches' provenance).

    OUT/results.md    the table (Markdown)       OUT/results.png   metric per configuration
    OUT/results.csv   one row per configuration  OUT/curves.png    validation curves overlaid
    OUT/results.json  the same, with every run
"""

from __future__ import annotations

import csv
import io
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlpipe.config import load_file
from vlpipe.errors import InputError
from vlpipe.fusion import checkpoint as ckpt
from vlpipe.io import write_text_atomic

# What a configuration is, apart from its seed: the config without these (where it runs, how
# fast, its folder) and without the seed.
RUNTIME = {("out",), ("threads",), ("optim", "seed"), ("optim", "num_workers")}
RUNTIME |= {("optim", "device"), ("optim", "ckpt_every"), ("optim", "amp")}


@dataclass
class RunResult:
    """One run's figures at the checkpoint the report reads."""

    path: str
    name: str  # its configuration's name (the run's, without the seed)
    seed: int | None
    task: str
    headline: str
    metrics: dict[str, float]  # headline first, then the breakdown
    step: int  # the checkpoint the figures come from
    steps: int  # steps trained
    which: str  # why that checkpoint, in words
    params: int
    train_seconds: float | None
    samples_per_s: float | None
    inputs: dict[str, str]
    curve: list[tuple[int, float]] = field(default_factory=list)
    key: str = ""  # the configuration identity (config without seed and runtime)


def find_runs(dirs: list[Path]) -> list[Path]:
    """Run folders (they hold a LATEST pointer) given, or found below the folders given."""
    from vlpipe.data_manifests.base import natural_key

    runs: list[Path] = []
    for folder in dirs:
        if not folder.is_dir():
            raise InputError(f"{folder}: not a folder")
        if (folder / ckpt.LATEST).exists():
            runs.append(folder)
            continue
        found = sorted(
            (p.parent for p in folder.rglob(ckpt.LATEST)), key=lambda p: natural_key(str(p))
        )
        runs += [p for p in found if not p.name.startswith("ckpt-")]
    if not runs:
        raise InputError(
            f"no run folders (with a {ckpt.LATEST} file) in {', '.join(map(str, dirs))}"
        )
    return list(dict.fromkeys(runs))


def is_pretraining(run_dir: Path) -> bool:
    return ckpt.load_meta(ckpt.latest_checkpoint(run_dir)).get("kind") == ckpt.PRETRAIN_KIND


def read_run(run_dir: Path, which: str) -> RunResult:
    """The run's figures at the checkpoint `vlpipe evaluate --checkpoint WHICH` reads: its
    validation results, recorded with it when it was written."""
    from vlpipe.fusion.tasks import get_task
    from vlpipe.fusion.train import _read_jsonl

    # "best" is evaluate's default: the BEST checkpoint, or the latest of a run that never
    # validated (the reason says which)
    chosen, reason = ckpt.select_checkpoint(run_dir, None if which == "best" else which)
    meta, latest = ckpt.load_meta(chosen), ckpt.load_meta(ckpt.latest_checkpoint(run_dir))
    task = get_task(meta["task"])
    headline = task.headline
    results = meta.get("eval") or {}
    evals = [e for e in _read_jsonl(run_dir / "eval_log.jsonl") if headline in e]
    state = _ablate_state(run_dir)
    return RunResult(
        path=str(run_dir),
        name=state.get("configuration") or _name_without_seed(run_dir.name),
        seed=meta.get("train", {}).get("seed"),
        task=task.name,
        headline=headline,
        metrics=_metrics(results, headline) if headline in results else {},
        step=int(meta.get("step", 0)),
        steps=int(latest.get("step", 0)),
        which=reason,
        params=_params(chosen),
        train_seconds=latest.get("train_seconds", state.get("seconds_total")),
        samples_per_s=_samples_per_s(run_dir / "train_log.csv"),
        inputs=_inputs(meta.get("caches") or {}, _trained_encoders(meta)),
        curve=[(e["step"], e[headline]) for e in evals if "step" in e],
        key=json.dumps(_identity(_config(run_dir), meta), sort_keys=True, default=str),
    )


def _config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "config.toml"
    return load_file(path) if path.exists() else {}


def _ablate_state(run_dir: Path) -> dict[str, Any]:
    from vlpipe.pipelines.ablate import read_state

    return read_state(run_dir)


def _identity(config: dict[str, Any], meta: dict[str, Any]) -> dict[str, Any]:
    """The configuration a run is one seed of: its config without seed and runtime options
    (a run without config.toml: its fusion, config, training and features)."""
    if not config:
        train = {k: v for k, v in meta.get("train", {}).items() if k != "seed"}
        return {"fusion": meta.get("fusion"), "config": meta.get("fusion_config"), "train": train}
    out = json.loads(json.dumps(config, default=str))
    for path in RUNTIME:
        node = out
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    return out


def _name_without_seed(name: str) -> str:
    parts = [p for p in name.split("_") if not p.startswith("seed=")]
    return "_".join(parts) or name


def _metrics(row: dict[str, Any], headline: str) -> dict[str, float]:
    """The headline, then the breakdown: per answer type (VQA, easy-VQA), or the task's other
    figures (GQA binary / open / validity..., NLVR2 consistency, VCR Q->A and QA->R)."""
    out = {headline: float(row[headline])}
    for kind, value in (row.get("perAnswerType") or {}).items():
        out[kind] = float(value)
    others = ("binary", "open", "validity", "plausibility", "consistency", "distribution")
    for key in (*others, "q2a", "qa2r"):  # GQA, NLVR2; VCR's Q->A and QA->R beside Q->AR
        if isinstance(row.get(key), (int, float)):
            out[key] = float(row[key])
    return out


def _params(checkpoint: Path | None) -> int:
    if checkpoint is None:
        return 0
    from safetensors import safe_open

    total = 0
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as fh:
        for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
            n = 1
            for dim in fh.get_slice(key).get_shape():
                n *= dim
            total += n
    return total


def _samples_per_s(log: Path) -> float | None:
    """The median training throughput the run logged (examples per second, all processes)."""
    if not log.exists():
        return None
    with open(log, newline="") as fh:
        values = [float(r["samples_per_s"]) for r in csv.DictReader(fh) if r.get("samples_per_s")]
    return statistics.median(values) if values else None


def _trained_encoders(meta: dict[str, Any]) -> dict[str, str]:
    """{"image" | "text": how its encoder trained with the run}: "top K of L" (--tune-top),
    "fine-tuned" (--finetune full); frozen inputs are not listed."""
    out = {}
    tune, full = meta.get("tune") or {}, meta.get("finetune") or {}
    for role, side in (("image", "vision"), ("text", "text")):
        if tune.get(side):
            out[role] = f"top {tune['k']} of {tune[side][1]} blocks trained"
        elif full.get(side):
            out[role] = "fine-tuned end to end"
    return out


def _inputs(caches: dict[str, Any], trained: dict[str, str] | None = None) -> dict[str, str]:
    """What made each input: backbone, architecture, weights (sha256 prefix or random-init),
    and how its encoder trained with the run when it did (`trained`)."""
    out = {}
    for role in ("image", "text"):
        prov = caches.get(role)
        if not prov:
            continue
        arch = (prov.get("model") or {}).get("arch") or (prov.get("model") or {}).get("name")
        sha = str(prov.get("weights_sha256", ""))
        weights = "random-init" if sha in ("", "random-init") else f"sha256 {sha[:12]}"
        out[role] = f"{prov.get('backbone')} {arch or ''} ({weights})".replace("  ", " ")
        if (trained or {}).get(role):
            out[role] += f", {trained[role]}"
    return out


# --------------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One configuration: the runs that differ only in their seed."""

    name: str
    runs: list[RunResult]

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys(k for r in self.runs for k in r.metrics))

    def mean_std(self, metric: str) -> tuple[float | None, float | None]:
        values = [r.metrics[metric] for r in self.runs if metric in r.metrics]
        if not values:
            return None, None
        std = statistics.stdev(values) if len(values) > 1 else None
        return statistics.fmean(values), std

    def mean_of(self, attr: str) -> float | None:
        values = [getattr(r, attr) for r in self.runs if getattr(r, attr) is not None]
        return statistics.fmean(values) if values else None


def group(results: list[RunResult]) -> list[Row]:
    """Runs grouped by configuration, in the order first met; two configurations of one name
    are told apart by a number."""
    rows: dict[str, Row] = {}
    for result in results:
        if result.key not in rows:
            rows[result.key] = Row(result.name, [])
        rows[result.key].runs.append(result)
    names: dict[str, int] = {}
    for row in rows.values():
        names[row.name] = names.get(row.name, 0) + 1
        if names[row.name] > 1:
            row.name = f"{row.name} ({names[row.name]})"
    return list(rows.values())


def write_report(dirs: list[Path], out: Path, which: str = "best") -> Path:
    """results.md / .csv / .json and the two plots in `out`; returns results.md."""
    runs = find_runs(dirs)
    pretraining = [run for run in runs if is_pretraining(run)]
    for run in pretraining:  # no task, no headline metric: nothing for this table
        print(f"report: leaving out {run}: a pre-training run (vlpipe pretrain)", file=sys.stderr)
    results = [read_run(run, which) for run in runs if run not in pretraining]
    if not results:
        raise InputError(f"no fine-tuning runs in {', '.join(map(str, dirs))}")
    rows = group(results)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.md", markdown(rows, which))
    write_text_atomic(out / "results.csv", table_csv(rows))
    payload = {"checkpoint": which, "configurations": [_row_json(r) for r in rows]}
    write_text_atomic(out / "results.json", json.dumps(payload, indent=1, default=str))
    from vlpipe.fusion.plot import bar_plot, overlay_plot

    bar_plot(out / "results.png", [_bar(r) for r in rows], _metric_label(rows))
    overlay_plot(out / "curves.png", {r.name: _mean_curve(r) for r in rows}, _metric_label(rows))
    return out / "results.md"


def _metric_label(rows: list[Row]) -> str:
    heads = {run.headline for row in rows for run in row.runs}
    return f"validation {' / '.join(sorted(heads))} (%)"


def _bar(row: Row) -> tuple[str, float, float]:
    mean, std = row.mean_std(row.runs[0].headline)
    return row.name, mean or 0.0, std or 0.0


def _mean_curve(row: Row) -> list[tuple[int, float]]:
    """The validation curve averaged over the seeds, at the steps every seed validated."""
    per_step: dict[int, list[float]] = {}
    for run in row.runs:
        for step, value in run.curve:
            per_step.setdefault(step, []).append(value)
    n = len(row.runs)
    return [(s, statistics.fmean(v)) for s, v in sorted(per_step.items()) if len(v) == n]


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _count(n: float | None) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def markdown(rows: list[Row], which: str) -> str:
    metrics = list(dict.fromkeys(m for r in rows for m in r.metrics))
    head = ["configuration", "seeds", *metrics, "params", "train time", "samples/s"]
    head += ["image features", "text features"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.name, str(len(row.runs))]
        cells += [_fmt(*row.mean_std(m)) for m in metrics]
        cells += [_count(row.mean_of("params")), _duration(row.mean_of("train_seconds"))]
        speed = row.mean_of("samples_per_s")
        cells.append("–" if speed is None else f"{speed:.0f}")
        first = row.runs[0]
        cells += [first.inputs.get("image", "–"), first.inputs.get("text", "–")]
        lines.append("| " + " | ".join(cells) + " |")
    tasks = sorted({run.task for row in rows for run in row.runs})
    note = (
        f"Figures: {', '.join(tasks)} validation, at each run's "
        f"{'best validation by the headline metric' if which == 'best' else 'latest checkpoint'}"
        "; mean ± standard deviation over seeds (sample std)."
    )
    return "\n".join([*lines, "", note]) + "\n"


def table_csv(rows: list[Row]) -> str:
    metrics = list(dict.fromkeys(m for r in rows for m in r.metrics))
    head = ["configuration", "seeds"]
    for m in metrics:
        head += [f"{m}_mean", f"{m}_std"]
    head += ["params", "train_seconds", "samples_per_s", "image_features", "text_features"]
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(head)
    for row in rows:
        cells: list[Any] = [row.name, len(row.runs)]
        for m in metrics:
            cells += [_num(v) for v in row.mean_std(m)]
        cells += [_num(row.mean_of(a)) for a in ("params", "train_seconds", "samples_per_s")]
        cells += [row.runs[0].inputs.get("image", ""), row.runs[0].inputs.get("text", "")]
        writer.writerow(cells)
    return text.getvalue()


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _row_json(row: Row) -> dict[str, Any]:
    stats = {}
    for m in row.metrics:
        mean, std = row.mean_std(m)
        stats[m] = {"mean": mean, "std": std}
    runs = [{k: v for k, v in asdict(r).items() if k not in ("key", "curve")} for r in row.runs]
    return {"configuration": row.name, "seeds": len(row.runs), "metrics": stats, "runs": runs}
