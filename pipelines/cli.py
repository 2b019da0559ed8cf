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


def _fail_hard(err: Exception) -> None:
    """After a failed HDF5 write the library's state is unreliable and its object teardown at
    interpreter exit can crash: report and leave without it (complete shards are on disk)."""
    import os

    typer.secho(f"error: {err}", fg="red", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def _user_errors() -> tuple[type[Exception], ...]:
    from vlpipe.cache import CacheError
    from vlpipe.data_manifests.base import AnnotationError
    from vlpipe.extract.frcnn.d2_backend import BackendUnavailable
    from vlpipe.fusion.checkpoint import RunError
    from vlpipe.weights import WeightsError

    return (
        CacheError,
        WeightsError,
        BackendUnavailable,
        AnnotationError,
        RunError,
        FileNotFoundError,
        ValueError,
        KeyError,
    )


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
        None,
        help="input side in pixels (ViT: position embeddings are resampled; frcnn: the short "
        "side, conventions field min_size)",
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
    box_policy: str = typer.Option(
        None,
        help="frcnn: caffe (LXMERT's 36) | maxnms | adaptive (10-100); default: the conventions'",
    ),
    min_boxes: int = typer.Option(None, help="frcnn: fewest regions (caffe 36, adaptive 10)"),
    max_boxes: int = typer.Option(
        None, help="frcnn: most regions = K stored per image (caffe 36, adaptive 100, maxnms 36)"
    ),
    conf_threshold: float = typer.Option(None, help="frcnn: region confidence (default 0.2)"),
    max_size: int = typer.Option(
        None, help="frcnn: cap of the long side (default: the conventions', caffe 1000)"
    ),
    conventions: str = typer.Option(
        None,
        help="frcnn: test-time pipeline to reproduce: caffe (generate_tsv.py, LXMERT's "
        "features) | hf (the Hugging Face port); default: the checkpoint's (HF folder: hf, "
        "with its config.yaml; MILVLG .pth, .pkl, random: caffe)",
    ),
    frcnn_set: list[str] = typer.Option(
        [],
        help="frcnn: override one conventions field, KEY=VALUE (repeatable), e.g. "
        "rpn_min_size=0 or maxnms_thresholds=0.3,0.5; an unknown KEY lists the fields",
    ),
    allow_pickle: bool = typer.Option(
        False, help="frcnn: allow reading a .pkl checkpoint (unpickling runs code from the file)"
    ),
    layer: str = typer.Option(
        None, help="resnet: stage whose output is cached, e.g. layer3 (C4); default the last"
    ),
    pool: str = typer.Option(None, help="resnet: pooled image vector, avg (default) | max"),
    impl: str = typer.Option(None, help="frcnn: native (default) | detectron2"),
    config: Path = typer.Option(None, help="frcnn --impl detectron2: the detectron2 yaml config"),
) -> None:
    """Run a frozen encoder over a dataset and cache its features."""
    from vlpipe.extract.runner import RunOptions
    from vlpipe.pipelines.extract_job import (
        ExtractRequest,
        FrcnnOptions,
        ResnetOptions,
        run_extract,
    )

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
        FrcnnOptions(
            box_policy,
            min_boxes,
            max_boxes,
            conf_threshold,
            max_size,
            allow_pickle,
            impl,
            str(config) if config else None,
            conventions,
            tuple(frcnn_set),
        ),
        ResnetOptions(layer, pool),
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
    from vlpipe.cache import CacheWriteError

    try:
        summary = run_extract(req, opts)
    except CacheWriteError as err:
        _fail_hard(err)
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


@app.command("import")
def import_features(
    source: Path = typer.Argument(..., help="an LXMERT .tsv file or a folder of MILVLG .npz"),
    fmt: str = typer.Option(..., "--format", help="lxmert-tsv | npz"),
    out: Path = typer.Option(..., help="cache index file to write"),
    dtype: str = typer.Option("float32", help="stored feature dtype (float32 keeps bytes exact)"),
    max_boxes: int = typer.Option(
        None, help="K rows per image (default: tsv the first row's, npz the largest num_bbox)"
    ),
    allow_pickle: bool = typer.Option(
        False, help="npz: read the pickled `info` dict (unpickling runs code from the files)"
    ),
    verbatim_keys: bool = typer.Option(
        False, help="key images by img_id as is (default: COCO_train2014_000000458752 -> 458752)"
    ),
    limit: int = typer.Option(None, help="only the first N images"),
    shard_items: int = typer.Option(4096, help="images per shard"),
    overwrite: bool = typer.Option(False, help="replace an existing cache"),
) -> None:
    """Turn region features written by other tools into a vlpipe cache."""
    from vlpipe.extract import interop

    opts = interop.ImportOptions(
        max_boxes,
        dtype,
        allow_pickle,
        verbatim_keys,
        overwrite,
        shard_items=shard_items,
        limit=limit,
    )
    try:
        s = interop.import_features(fmt, source, out, opts)
    except _user_errors() as err:
        _fail(err)
    typer.echo(
        f"{out}: imported {s.items} images ({s.max_boxes} x {s.feature_dim} regions, "
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
            raise ValueError(f"unknown export format {fmt!r}; expected lxmert-tsv")
        n = interop.export_lxmert_tsv(cache, out, img_id_format=img_id_format)
    except _user_errors() as err:
        _fail(err)
    typer.echo(f"{out}: wrote {n} images")


def _json_option(text: str, name: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{name} is not JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object")
    return value


def _spec(task, features, text_features, annotations, fmt, split, limit):
    from vlpipe.pipelines.train_job import DataSpec

    return DataSpec(task, list(features), list(text_features), list(annotations), fmt, split, limit)


@app.command()
def train(
    features: list[Path] = typer.Option(..., help="image feature cache(s), repeatable"),
    task: str = typer.Option(..., help="vqa | gqa | nlvr2 | easy-vqa"),
    out: Path = typer.Option(..., help="run folder (checkpoints, logs, curves)"),
    fusion: str = typer.Option("concat", help="concat | lstm | lxmert | cross"),
    text_features: list[Path] = typer.Option([], help="text feature cache(s) (concat, cross)"),
    annotations: list[Path] = typer.Option([], help="training annotation file(s)"),
    annotations_format: str = typer.Option(
        None, help="vqa | gqa | nlvr2 | lxmert | easy-vqa (default: the task's official format)"
    ),
    split: str = typer.Option("train", help="split name (easy-vqa: train)"),
    val_features: list[Path] = typer.Option(
        [], help="validation image caches (default: --features)"
    ),
    val_text_features: list[Path] = typer.Option([], help="validation text caches"),
    val_annotations: list[Path] = typer.Option([], help="validation annotation file(s)"),
    val_split: str = typer.Option(None, help="validation split (easy-vqa: test)"),
    limit: int = typer.Option(None, help="first N training examples"),
    epochs: int = typer.Option(None),
    batch_size: int = typer.Option(None),
    lr: float = typer.Option(None),
    seed: int = typer.Option(None),
    max_steps: int = typer.Option(None, help="stop after N steps (checkpointed, resumable)"),
    ckpt_every: int = typer.Option(None, help="checkpoint every N steps (default: per epoch)"),
    num_workers: int = typer.Option(None),
    device: str = typer.Option(None),
    model_config: str = typer.Option("{}", help="JSON overrides, e.g. '{\"l_layers\": 2}'"),
    train_config: str = typer.Option("{}", help="JSON overrides of TrainConfig fields"),
    vocab: str = typer.Option(None, help="WordPiece vocab.txt for fusions that tokenize"),
    max_length: int = typer.Option(20, help="text tokens (lxmert, lstm)"),
    min_answer_count: int = typer.Option(None, help="answer vocab threshold (VQA: 9)"),
    init: str = typer.Option(None, help="pretrained LXMERT: HF folder or Epoch20_LXRT.pth"),
    init_bert: str = typer.Option(None, help="BERT folder for LXMERT's language layers"),
    resume: bool = typer.Option(False, help="continue the run in --out exactly"),
    overwrite: bool = typer.Option(False, help="replace an earlier run in --out"),
    progress: bool = typer.Option(True),
) -> None:
    """Train a fusion model and task head from cached features."""
    from vlpipe.pipelines.train_job import TrainRequest, run_train

    try:
        overrides = _json_option(train_config, "--train-config")
        flags = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "max_steps": max_steps,
            "ckpt_every": ckpt_every,
            "num_workers": num_workers,
            "device": device,
        }
        overrides.update({k: v for k, v in flags.items() if v is not None})
        train_spec = _spec(
            task, features, text_features, annotations, annotations_format, split, limit
        )
        val_spec = None
        if val_annotations or val_split:
            val_spec = _spec(
                task,
                val_features or features,
                val_text_features or text_features,
                val_annotations,
                annotations_format,
                val_split,
                None,
            )
        req = TrainRequest(
            fusion,
            train_spec,
            out,
            val_spec,
            _json_option(model_config, "--model-config"),
            overrides,
            vocab,
            max_length,
            min_answer_count,
            init,
            init_bert,
            resume,
            progress,
        )
        results = run_train(req)
    except _user_errors() as err:
        _fail(err)
    typer.echo(f"{out}: done. " + (f"validation: {json.dumps(results)}" if results else ""))


def _eval_args(run, features, text_features, annotations, annotations_format, split, limit):
    return run, _spec("", features, text_features, annotations, annotations_format, split, limit)


@app.command()
def evaluate(
    run: Path = typer.Option(..., help="run folder written by `vlpipe train`"),
    features: list[Path] = typer.Option(..., help="image feature cache(s)"),
    text_features: list[Path] = typer.Option([], help="text feature cache(s)"),
    annotations: list[Path] = typer.Option([], help="annotation file(s) with answers"),
    annotations_format: str = typer.Option(None),
    split: str = typer.Option(None, help="split (easy-vqa: test)"),
    limit: int = typer.Option(None),
    device: str = typer.Option("auto"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Print the official metrics of a trained run on a labelled split."""
    from vlpipe.pipelines.train_job import run_evaluate

    try:
        results, _ = run_evaluate(
            *_eval_args(
                run, features, text_features, annotations, annotations_format, split, limit
            ),
            device=device,
        )
    except _user_errors() as err:
        _fail(err)
    typer.echo(json.dumps(results, indent=None if as_json else 2))


@app.command()
def predict(
    run: Path = typer.Option(..., help="run folder written by `vlpipe train`"),
    features: list[Path] = typer.Option(..., help="image feature cache(s)"),
    text_features: list[Path] = typer.Option([], help="text feature cache(s)"),
    annotations: list[Path] = typer.Option([], help="question / statement file(s)"),
    annotations_format: str = typer.Option(None),
    split: str = typer.Option(None),
    out: Path = typer.Option(None, help="submission file (default: RUN/predictions.json|csv)"),
    device: str = typer.Option("auto"),
) -> None:
    """Write the official submission file: VQA / GQA json, NLVR2 csv."""
    from vlpipe.pipelines.train_job import run_predict

    try:
        path = run_predict(
            *_eval_args(run, features, text_features, annotations, annotations_format, split, None),
            out,
            device=device,
        )
    except _user_errors() as err:
        _fail(err)
    typer.echo(f"wrote {path}")


@app.command()
def demo(
    workdir: Path = typer.Option(Path("vlpipe-demo"), help="where caches and the run go"),
    fusion: str = typer.Option("concat", help="concat | lxmert | cross"),
    epochs: int = typer.Option(5),
    vision_weights: str = typer.Option(
        None, help="local timm ViT checkpoint (default: none can be downloaded, so random-init)"
    ),
    vision: str = typer.Option(
        "vit", help="vit | resnet (random ResNet-18, max-pooled layer2: carries shape)"
    ),
    vision_arch: str = typer.Option(None, help="default vit_tiny_patch16_224 / resnet18"),
    image_size: int = typer.Option(None, help="default 64 (ViT) / 128 (ResNet)"),
    text_weights: str = typer.Option(None, help="BERT folder (default: the MiniLM package)"),
    device: str = typer.Option("auto"),
    progress: bool = typer.Option(True),
) -> None:
    """easy-VQA end to end: extract ViT (or ResNet) + MiniLM BERT -> train -> test accuracy."""
    from vlpipe.pipelines.demo import DemoOptions, run_demo

    opts = DemoOptions(
        workdir,
        vision_weights,
        vision_arch,
        image_size,
        text_weights,
        fusion,
        epochs,
        device=device,
        progress=progress,
        vision=vision,
    )
    try:
        run_demo(opts)
    except _user_errors() as err:
        _fail(err)


@app.command()
def verify(
    cache: Path = typer.Argument(..., help="cache index file"),
    repair: bool = typer.Option(
        False,
        help="move corrupt shards aside and rebuild the index "
        "from the intact ones (then `extract --resume` refills)",
    ),
) -> None:
    """Check every shard against its checksum and counts; exit 1 on any problem."""
    from vlpipe import verify as check

    try:
        report = check.verify(cache)
        for problem in report.problems:
            typer.echo(f"problem: {problem}", err=True)
        if repair and not report.ok:
            _, summary = check.repair(cache)
            typer.echo(
                f"repaired: index rebuilt from {summary['shards']} shards, "
                f"{summary['rows']} rows; {len(report.corrupt)} corrupt shards moved aside"
            )
            report = check.verify(cache)
    except _user_errors() as err:
        _fail(err)
    typer.echo(
        f"{cache}: {report.shards} shards, {report.items} items, "
        f"{'OK' if report.ok else f'{len(report.problems)} problems'}"
    )
    if not report.ok:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="vlpipe")


if __name__ == "__main__":
    sys.exit(main())
