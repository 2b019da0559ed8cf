"""The `vlpipe` command line. Each command parses options and delegates to a library function;
heavy imports (torch, timm, transformers) happen inside the commands so `--help` is instant."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

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


def _user_errors() -> tuple[type[Exception], ...]:
    from vlpipe.cache import CacheError
    from vlpipe.data_manifests.base import AnnotationError
    from vlpipe.weights import WeightsError

    return (CacheError, WeightsError, AnnotationError, FileNotFoundError, ValueError, KeyError)


@app.command()
def extract(
    backbone: str = typer.Option(..., help="vit | bert | resnet | frcnn"),
    dataset: str = typer.Option(
        ...,
        help="images: easy-vqa, folder, coco, vg, gqa, nlvr2; "
        "texts (bert): easy-vqa, vqa, gqa, nlvr2, lxmert",
    ),
    out: Path = typer.Option(..., help="cache index file; shards go to <name>.shards/ beside it"),
    split: str = typer.Option(None, help="e.g. train / test (easy-vqa), train2014 (coco)"),
    root: Path = typer.Option(None, help="dataset image folder"),
    annotations: list[Path] = typer.Option(
        [], help="text files (repeatable), e.g. VQA questions.json then annotations.json"
    ),
    limit: int = typer.Option(None, help="only the first N items (quick runs)"),
    weights: str = typer.Option(
        None,
        help="checkpoint file or model folder; 'random' for random init (recorded in provenance)",
    ),
    arch: str = typer.Option(None, help="timm architecture / BERT name (default: the paper's)"),
    model_kwargs: str = typer.Option("{}", help="JSON of extra model config, e.g. tiny models"),
    image_size: int = typer.Option(
        None, help="input side in pixels (ViT: position embeddings are resampled)"
    ),
    max_length: int = typer.Option(20, help="text tokens incl. [CLS]/[SEP] (LXMERT uses 20)"),
    vocab: str = typer.Option(None, help="WordPiece vocab.txt (default: the model folder's)"),
    cls_only: bool = typer.Option(False, help="store only CLS/pooled features, not tokens"),
    batch_size: int = typer.Option(32),
    num_workers: int = typer.Option(2, help="image-decoding DataLoader workers"),
    device: str = typer.Option("auto", help="auto takes CUDA when present"),
    precision: str = typer.Option("fp32", help="fp32 | fp16 | bf16 (autocast)"),
    dtype: str = typer.Option("float16", help="stored feature dtype: float16 | float32"),
    shard_items: int = typer.Option(None, help="items per shard (default: about 1 GiB)"),
    resume: bool = typer.Option(False, help="continue an interrupted run"),
    overwrite: bool = typer.Option(False, help="replace an existing cache"),
    progress: bool = typer.Option(True, help="progress bar"),
    seed: int = typer.Option(0, help="seed of random-init weights"),
) -> None:
    """Run a frozen encoder over a dataset and cache its features."""
    from vlpipe.extract.runner import RunOptions
    from vlpipe.pipelines.extract_job import ExtractRequest, run_extract

    req = ExtractRequest(
        backbone,
        dataset,
        out,
        split,
        root,
        tuple(annotations),
        limit,
        weights,
        arch,
        model_kwargs,
        image_size,
        max_length,
        vocab,
        cls_only,
    )
    opts = RunOptions(
        batch_size,
        num_workers,
        device,
        precision,
        dtype,
        shard_items,
        resume,
        overwrite,
        progress=progress,
        seed=seed,
    )
    try:
        summary = run_extract(req, opts)
    except _user_errors() as err:
        _fail(err)
    _print_summary(summary)
    if summary.partial:
        raise typer.Exit(EXIT_PARTIAL)


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


def main() -> None:
    app(prog_name="vlpipe")


if __name__ == "__main__":
    sys.exit(main())
