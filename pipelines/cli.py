"""The `vlpipe` command line. Each command parses options and delegates to a library function;
heavy imports (torch, timm, transformers) happen inside the commands so `--help` is instant."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from vlpipe.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Extract frozen features once into a sharded HDF5 cache; train "
    "VQA / GQA / NLVR2 / easy-VQA fusion models from it.",
)

EXIT_PARTIAL = 3  # the run finished but some items failed (they are recorded in the cache)


def _fail(err: Exception) -> None:
    typer.secho(f"error: {err}", fg="red", err=True)
    raise typer.Exit(1)


def _fail_hard(err: Exception) -> None:
    """After a failed HDF5 write the library's state is unreliable and its object teardown at
    interpreter exit can crash: report and leave without it (complete shards are on disk)."""
    import os

    typer.secho(f"error: {err}", fg="red", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _user_errors() -> tuple[type[Exception], ...]:
    """What the CLI reports in one line: errors meant for users (VlpipeError: a bad option,
    file, checkpoint or cache, each naming it) and the operating system's (a file that cannot
    be opened, a full disk: their message names the path). Anything else is a bug and keeps
    its traceback."""
    from vlpipe.errors import VlpipeError

    return (VlpipeError, OSError)


def _extract(config, sets, flags) -> None:
    from vlpipe.cache import CacheWriteError
    from vlpipe.distributed import set_threads
    from vlpipe.pipelines.configs import ExtractJob
    from vlpipe.pipelines.extract_job import resolve_extract, run_extract
    from vlpipe.pipelines.options import flag_names, layers

    try:
        file_layer, set_layer = layers(config, sets)
        job = resolve_extract(file_layer, set_layer, flags.layer(), names=flag_names(ExtractJob))
        set_threads(job.threads)
        summary = run_extract(job)
    except CacheWriteError as err:
        _fail_hard(err)
    except _user_errors() as err:
        _fail(err)
    _print_summary(summary)
    if summary.stopped_by:
        _stopped(summary)
    if summary.partial:
        raise typer.Exit(EXIT_PARTIAL)


def _stopped(summary) -> None:
    """A run stopped by SIGINT / SIGTERM kept everything it wrote: say how to continue."""
    import signal

    name = signal.Signals(summary.stopped_by).name
    typer.secho(
        f"stopped by {name}: the items written so far are complete shards of {summary.out} and "
        "its index is written; rerun the same command with --resume to finish",
        fg="yellow",
        err=True,
    )
    raise typer.Exit(128 + summary.stopped_by)


def _print_summary(summary) -> None:
    typer.echo(
        f"{summary.out}: wrote {summary.written} items in {summary.seconds:.1f}s "
        f"({summary.items_per_s:.1f}/s), skipped {summary.skipped} already cached, "
        f"{len(summary.failures)} failed"
    )
    for key, path, reason in summary.failures[:20]:
        typer.echo(f"  failed {key} ({path}): {reason}", err=True)
    if len(summary.failures) > 20:
        typer.echo(f"  ... {len(summary.failures) - 20} more; `vlpipe inspect` lists all", err=True)
    if summary.partial:
        typer.secho(
            f"partial run: {len(summary.failures)} items could not be read (exit status "
            f"{EXIT_PARTIAL})",
            fg="yellow",
            err=True,
        )


@app.command()
def inspect(
    cache: Path = typer.Argument(..., help="cache index file"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    samples: int = typer.Option(5, help="how many sample keys / failures to show"),
) -> None:
    """Print a cache's provenance, counts, shapes and sample keys."""
    from vlpipe.cache import FeatureCache

    try:
        summary = FeatureCache(cache).summary(samples)
    except _user_errors() as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    typer.echo(format_summary(summary))


def format_summary(s: dict) -> str:
    prov = s["provenance"]
    lines = [
        f"{s['path']}  ({s['kind']} cache, schema v{s['schema_version']})",
        f"  items {s['items']}  rows {s['rows']}  shards {s['shards']}  failed {s['failures']}",
        f"  backbone {prov.get('backbone')}  model {prov.get('model', {}).get('arch')}  "
        f"weights {prov.get('weights')}  sha256 {str(prov.get('weights_sha256'))[:16]}",
        f"  dataset {prov.get('dataset')}  split {prov.get('split')}  dtype {prov.get('dtype')}"
        f"  created {prov.get('created')}",
        f"  preprocessing {json.dumps(prov.get('preprocessing'))}",
        f"  versions {json.dumps(prov.get('versions'))}",
        "  fields:",
    ]
    lines += [
        f"    {n:<12} {str(tuple(f['shape'])):<14} {f['dtype']}" for n, f in s["fields"].items()
    ]
    lines.append(f"  sample keys: {', '.join(s['sample_keys'])}")
    lines += [f"  failed {f['key']} ({f['path']}): {f['reason']}" for f in s["failed"]]
    if prov.get("weights") == "random-init":
        lines.append("  WARNING: features from a RANDOM-INIT model (no pretrained weights)")
    return "\n".join(lines)


def _import(config, sets, flags) -> None:
    from vlpipe.cache import CacheWriteError
    from vlpipe.extract import interop
    from vlpipe.pipelines.configs import ImportJob

    try:
        job = _resolved(ImportJob, config, sets, flags)
        fields = ("max_boxes", "dtype", "allow_pickle", "verbatim_keys", "overwrite")
        fields += ("shard_items", "limit", "resume")
        opts = interop.ImportOptions(**{name: getattr(job, name) for name in fields})
        s = interop.import_features(job.format, job.source, job.out, opts)
    except CacheWriteError as err:
        _fail_hard(err)
    except _user_errors() as err:
        _fail(err)
    typer.echo(
        f"{job.out}: imported {s.items} images ({s.max_boxes} x {s.feature_dim} regions, "
        f"img_id format {s.img_id_format!r})"
    )


@app.command("export")
def export_features(
    cache: Path = typer.Argument(..., help="a regions cache index file"),
    fmt: str = typer.Option("lxmert-tsv", "--format", help="lxmert-tsv"),
    out: Path = typer.Option(..., help="file to write"),
    img_id_format: str = typer.Option(
        None,
        help="img_id from the key: {key} or {num} (int), e.g. 'COCO_val2014_{num:012d}' "
        "(default: the one recorded by `vlpipe import`, else {key})",
    ),
) -> None:
    """Write a regions cache as an LXMERT TSV, for code that reads those files."""
    from vlpipe.extract import interop

    try:
        if fmt != "lxmert-tsv":
            raise ConfigError(f"unknown export format {fmt!r}; expected lxmert-tsv")
        n = interop.export_lxmert_tsv(cache, out, img_id_format=img_id_format)
    except _user_errors() as err:
        _fail(err)
    typer.echo(f"{out}: wrote {n} images")


# --------------------------------------------------------------------------------------------
# Stage two: commands generated from their job configs (pipelines/configs.py)
# --------------------------------------------------------------------------------------------
def _job_commands() -> None:
    from vlpipe.pipelines import configs
    from vlpipe.pipelines.options import command

    json_flag = [("as_json", bool, typer.Option(False, "--json", help="machine-readable output"))]
    command(app, "extract", configs.ExtractJob, _extract, help=EXTRACT_HELP)
    command(app, "import", configs.ImportJob, _import, help=IMPORT_HELP)
    command(app, "train", configs.TrainJob, _train, help=TRAIN_HELP, prefixes=TRAIN_PREFIXES)
    command(app, "pretrain", configs.PretrainJob, _pretrain, help=PRETRAIN_HELP)
    command(app, "export-lxmert", configs.LxmertExportJob, _export_lxmert, help=EXPORT_LXMERT_HELP)
    command(app, "evaluate", configs.EvaluateJob, _evaluate, help=EVALUATE_HELP, extra=json_flag)
    command(app, "predict", configs.PredictJob, _predict, help=PREDICT_HELP)
    command(app, "score", configs.ScoreJob, _score, help=SCORE_HELP, extra=json_flag)
    command(app, "demo", configs.DemoOptions, _demo, help=DEMO_HELP)
    command(app, "ablate", configs.AblateJob, _ablate, help=ABLATE_HELP, prefixes=ABLATE_PREFIXES)
    command(app, "report", configs.ReportJob, _report, help=REPORT_HELP)


TRAIN_PREFIXES = {"val": "val-"}
ABLATE_PREFIXES = {"slurm": "slurm-"}
EXTRACT_HELP = "Run a frozen encoder over a dataset and cache its features."
IMPORT_HELP = "Turn region features written by other tools into a vlpipe cache."
TRAIN_HELP = (
    "Train a fusion model and task head from cached features. The defaults shown are the base "
    "values: the fusion's preset (`vlpipe presets`) sets the optimisation (lr, epochs, batch "
    "size, optimizer) unless --preset, --config or the flags say otherwise."
)
PRETRAIN_HELP = (
    "Pre-train LXMERT from cached features with its five tasks (masked language modelling, "
    "masked object features and labels, matching, image QA). The defaults shown are the base "
    "values: the lxmert-pretrain preset (the released recipe) sets the optimisation."
)
EXPORT_LXMERT_HELP = (
    "Write a pre-training run's model as a Hugging Face LxmertForPreTraining folder or in "
    "airsplay/lxmert's original .pth layout."
)
EVALUATE_HELP = "Print the official metrics of a trained run on a labelled split."
PREDICT_HELP = "Write the official submission file: VQA / GQA json, NLVR2 csv."
DEMO_HELP = "easy-VQA end to end: extract ViT (or ResNet) + MiniLM BERT -> train -> test accuracy."
SCORE_HELP = "Score a predictions file with the official metrics (no model, no caches)."
ABLATE_HELP = (
    "Run every configuration of a grid file from one set of caches (extracted once), then "
    "write the results table. A rerun skips finished runs and resumes interrupted ones."
)
REPORT_HELP = "One table (Markdown, CSV, JSON) and plots of the runs under some folders."


def _resolved(cls, config, sets, flags, prefixes=None):
    """The job config from --config, --set and the flags; errors name the flags."""
    from vlpipe.config import resolve
    from vlpipe.pipelines.options import flag_names, layers

    file_layer, set_layer = layers(config, sets)
    return resolve(cls, file_layer, set_layer, flags.layer(), names=flag_names(cls, prefixes))


def _train(config, sets, flags) -> None:
    from vlpipe.pipelines import configs
    from vlpipe.pipelines.train_job import resolve_train, run_train

    _training(configs.TrainJob, resolve_train, run_train, config, sets, flags, TRAIN_PREFIXES)


def _pretrain(config, sets, flags) -> None:
    from vlpipe.pipelines import configs
    from vlpipe.pipelines.pretrain_job import resolve_pretrain, run_pretrain

    _training(configs.PretrainJob, resolve_pretrain, run_pretrain, config, sets, flags)


def _training(cls, resolve_job, run_job, config, sets, flags, prefixes=None) -> None:
    """A training job (train, pretrain): resolved over its preset, run, its last validation
    printed."""
    from vlpipe.distributed import set_threads
    from vlpipe.pipelines.options import flag_names, layers

    try:
        file_layer, set_layer = layers(config, sets)
        names = flag_names(cls, prefixes)
        job = resolve_job(file_layer, set_layer, flags.layer(), names=names)
        set_threads(job.threads)
        results = run_job(job)
    except _user_errors() as err:
        _fail(err)
    typer.echo(f"{job.out}: done. " + (f"validation: {json.dumps(results)}" if results else ""))


def _export_lxmert(config, sets, flags) -> None:
    from vlpipe.pipelines.configs import LxmertExportJob
    from vlpipe.pipelines.lxmert_export import export_lxmert

    try:
        path = export_lxmert(_resolved(LxmertExportJob, config, sets, flags))
    except _user_errors() as err:
        _fail(err)
    typer.echo(f"wrote {path}")


def _evaluate(config, sets, flags, as_json: bool) -> None:
    from vlpipe.distributed import set_threads
    from vlpipe.pipelines.configs import EvaluateJob
    from vlpipe.pipelines.eval_job import run_evaluate

    try:
        job = _resolved(EvaluateJob, config, sets, flags)
        set_threads(job.threads)
        results, _ = run_evaluate(job)
    except _user_errors() as err:
        _fail(err)
    _print_results(results, as_json)


def _print_results(results: dict, as_json: bool) -> None:
    """The metrics as JSON, the metric's provenance ("metric") included; a readable summary
    line first unless --json; warnings loudly on stderr."""
    for warning in results.get("warnings", []):
        typer.secho(f"WARNING: {warning}", fg="yellow", bold=True, err=True)
    if not as_json and "metric" in results:
        figures = ("overall", "accuracy", "q2a", "qa2r", "q2ar")  # the tasks' headlines
        headline = {k: results[k] for k in figures if k in results}
        typer.echo(f"{results['metric']}: {json.dumps(headline)}", err=True)
    typer.echo(json.dumps(results, indent=None if as_json else 2))


def _predict(config, sets, flags) -> None:
    from vlpipe.distributed import set_threads
    from vlpipe.pipelines.configs import PredictJob
    from vlpipe.pipelines.eval_job import run_predict

    try:
        job = _resolved(PredictJob, config, sets, flags)
        set_threads(job.threads)
        path = run_predict(job)
    except _user_errors() as err:
        _fail(err)
    typer.echo(f"wrote {path}")


def _score(config, sets, flags, as_json: bool) -> None:
    from vlpipe.pipelines.configs import ScoreJob
    from vlpipe.pipelines.score_job import run_score

    try:
        results = run_score(_resolved(ScoreJob, config, sets, flags))
    except _user_errors() as err:
        _fail(err)
    _print_results(results, as_json)


def _ablate(config, sets, flags) -> None:
    from vlpipe.pipelines.ablate import run_ablate
    from vlpipe.pipelines.configs import AblateJob

    try:
        job = _resolved(AblateJob, config, sets, flags, ABLATE_PREFIXES)
        planned, report = run_ablate(job)
    except _user_errors() as err:
        _fail(err)
    failed = [p for p in planned if p.state in ("failed", "changed")]
    if report is not None:
        typer.echo(f"\n{report.read_text()}\n{report} (and .csv, .json, results.png, curves.png)")
    if failed and not job.dry_run:  # a dry run lists states, it fails nothing
        typer.secho(f"{len(failed)} runs failed:", fg="red", err=True)
        for p in failed:
            typer.echo(f"  {p.plan.name}: {p.error}", err=True)
        raise typer.Exit(1)


def _report(config, sets, flags) -> None:
    from vlpipe.pipelines.configs import ReportJob
    from vlpipe.pipelines.report import write_report

    try:
        job = _resolved(ReportJob, config, sets, flags)
        if not job.dirs:
            raise ConfigError("report: name at least one run folder, or a folder holding runs")
        path = write_report(job.dirs, job.out or job.dirs[0], job.checkpoint)
    except _user_errors() as err:
        _fail(err)
    typer.echo(path.read_text())
    typer.echo(f"{path} (and .csv, .json, results.png, curves.png)")


@app.command()
def fusions() -> None:
    """List the fusions and the config fields each takes (--model-config, or the \\[model]
    table of a config file)."""
    import dataclasses

    from vlpipe.fusion.registry import FUSIONS

    for name, spec in FUSIONS.items():
        config_cls, _ = spec.classes()
        typer.echo(f"{name}: {spec.help}")
        from_caches = set(spec.inputs)
        for f in dataclasses.fields(config_cls):
            note = "  (from the caches)" if f.name in from_caches else ""
            typer.echo(f"    {f.name} = {f.default!r}{note}")


@app.command()
def presets() -> None:
    """List the presets shipped with vlpipe (the papers' recipes; `vlpipe train --preset NAME`)."""
    from vlpipe.pipelines.configs import preset_names

    for name, description in preset_names().items():
        typer.echo(f"{name:<16} {description}")


def _demo(config, sets, flags) -> None:
    from vlpipe.distributed import set_threads
    from vlpipe.pipelines.configs import DemoOptions
    from vlpipe.pipelines.demo import run_demo

    try:
        opts = _resolved(DemoOptions, config, sets, flags)
        set_threads(opts.threads)
        run_demo(opts)
    except _user_errors() as err:
        _fail(err)


@app.command()
def verify(
    cache: Path = typer.Argument(..., help="cache index file"),
    repair: bool = typer.Option(
        False,
        help="move corrupt, foreign and duplicate shards aside and rebuild the index from the "
        "others (then `extract --resume` refills)",
    ),
    as_json: bool = typer.Option(False, "--json", help="machine-readable report"),
) -> None:
    """Check every shard against its checksum and the index's record of it; exit 1 on any
    problem."""
    from vlpipe import verify as check
    from vlpipe.cache import CacheWriteError

    try:
        report = check.verify(cache)
        for problem in report.problems:
            typer.echo(f"problem: {problem}", err=True)
        for note in report.notes:
            typer.echo(f"note: {note}", err=True)
        if repair and not report.ok:
            report, summary = check.repair(cache, report)
            for old, new in report.moved:
                typer.echo(f"moved aside: {old.name} -> {new.name}")
            typer.echo(
                f"repaired: index rebuilt from {summary['shards']} shards, "
                f"{summary['rows']} rows; {len(report.moved)} shards moved aside"
            )
            report = check.verify(cache)
            for problem in report.problems:
                typer.echo(f"problem after repair: {problem}", err=True)
    except CacheWriteError as err:
        _fail_hard(err)
    except _user_errors() as err:
        _fail(err)
    if as_json:
        typer.echo(json.dumps(check.report_dict(report), indent=2))
    else:
        typer.echo(
            f"{cache}: {report.shards} shards, {report.items} items, "
            f"{'OK' if report.ok else f'{len(report.problems)} problems'}"
        )
    if not report.ok:
        raise typer.Exit(1)


_job_commands()


def main() -> None:
    from vlpipe.memory import keep_freed_memory

    keep_freed_memory()  # big per-batch tensors: no page faults and munmap per batch
    app(prog_name="vlpipe")


if __name__ == "__main__":
    sys.exit(main())
