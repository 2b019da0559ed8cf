"""The extraction loop: records in, cache shards out.

Images are decoded and resized in DataLoader workers while the model runs; bad images are
recorded in the cache (key, path, reason) instead of stopping the run; keys already in complete
shards are skipped on `--resume`. Texts are deduplicated: identical strings are encoded once and
every key that carries them points at the same row.

SIGINT (Ctrl-C) or SIGTERM (a scheduler's stop) ends a run cleanly: the batch in hand is written,
the shard in progress is finished as a complete (smaller) shard and the index is written, so a
stop loses nothing; `--resume` continues from there. A second signal stops at once (the partial
shard is dropped, complete shards stay).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vlpipe import provenance as prov
from vlpipe.cache import CacheWriter, Schema, storable
from vlpipe.data_manifests.base import ImageRecord, TextRecord
from vlpipe.distributed import resolve_device
from vlpipe.extract.base import Batch, Extractor
from vlpipe.extract.images import BadImage, load_image

SHARD_BYTES = 1 << 30  # bound each shard to about 1 GiB


@dataclass
class RunOptions:
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast)
    dtype: str = "float16"  # storage dtype of features
    shard_items: int | None = None  # default: about SHARD_BYTES per shard
    resume: bool = False
    overwrite: bool = False
    writer: str = "r0"
    seed: int = 0  # fixes random-init weights, so a resumed random-init run stays consistent
    progress: bool = True
    build_index: bool = True


@dataclass
class Summary:
    out: str
    total: int
    written: int = 0
    skipped: int = 0
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0
    stopped_by: int | None = None  # the signal that stopped the run early (SIGINT, SIGTERM)

    @property
    def partial(self) -> bool:
        return bool(self.failures)

    @property
    def items_per_s(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return torch.autocast(device.type, dtype=dtype)


def run_provenance(extractor: Extractor, opts: RunOptions, dataset: dict[str, Any]) -> dict:
    return {
        **extractor.provenance(),
        "dtype": opts.dtype,
        "seed": opts.seed,
        "precision": opts.precision,
        "dataset": dataset.get("name"),
        "split": dataset.get("split"),
        "dataset_root": dataset.get("root"),
        "config": dataset.get("config"),  # the resolved `vlpipe extract` config, when run by it
        "versions": prov.package_versions("timm", "transformers", "torchvision"),
        "created": prov.now_iso(),
        **prov.host_record(),
    }


def _open_writer(extractor: Extractor, out: str, opts: RunOptions, dataset: dict) -> CacheWriter:
    schema = Schema.build(extractor.kind, extractor.shapes(), opts.dtype, extractor.facts())
    shard_items = opts.shard_items or _default_shard_items(schema)
    return CacheWriter(
        out,
        schema,
        run_provenance(extractor, opts, dataset),
        shard_items=shard_items,
        writer=opts.writer,
        resume=opts.resume,
        overwrite=opts.overwrite,
        build_index_on_close=opts.build_index,
    )


def _default_shard_items(schema: Schema) -> int:
    item = sum(
        int(np.prod(s)) * (8 if d == "str" else np.dtype(d).itemsize)
        for s, d in schema.fields.values()
    )
    return max(1, SHARD_BYTES // max(item, 1))


def _to_numpy(outputs: dict[str, Any], schema: Schema) -> dict[str, np.ndarray]:
    """Cast on the device (fp16 halves the copy), then move to host; strings stay as they are."""
    arrays = {}
    for name, value in outputs.items():
        dtype = schema.fields[name][1]
        if dtype == "str":
            arrays[name] = np.asarray(value, dtype=object)
        else:
            arrays[name] = value.to(getattr(torch, dtype)).cpu().numpy()
    return arrays


# ---- images -----------------------------------------------------------------------------------


class ImageItems(Dataset):
    """Decodes and transforms one image per index; failures come back as a reason string."""

    def __init__(self, records: Sequence[ImageRecord], transform):
        self.records, self.transform = records, transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.records[i]
        item = {"key": rec.key, "path": rec.path, "pixels": None, "hw": None, "reason": None}
        try:
            img = load_image(rec.path)
            item["hw"] = (img.height, img.width)
            item["pixels"] = self.transform(img)
        except BadImage as err:
            item["reason"] = err.reason
        except Exception as err:  # noqa: BLE001 - one odd file must never stop a run
            item["reason"] = f"{type(err).__name__}: {err}"
        return item


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGINT / SIGTERM to the main process, which stops cleanly and
    shuts them down (a Ctrl-C reaches the whole process group)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _batches(records, transform, opts: RunOptions, device: torch.device) -> Iterator[list[dict]]:
    loader = DataLoader(
        ImageItems(records, transform),
        batch_size=opts.batch_size,
        num_workers=opts.num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=2 if opts.num_workers else None,  # bounded host memory: FRCNN inputs ~7 MB
        worker_init_fn=_ignore_stop_signals,
    )
    yield from loader


def extract_images(
    extractor: Extractor,
    records: Sequence[ImageRecord],
    out: str,
    opts: RunOptions,
    dataset: dict[str, Any],
) -> Summary:
    with _run(extractor, records, out, opts, dataset) as (device, writer, pending, summary):
        bar = _progress(len(pending), opts, "images")
        for batch in _batches(pending, extractor.transform, opts, device):
            _write_image_batch(extractor, batch, writer, device, opts, summary)
            bar.update(len(batch))
            if summary.stopped_by:
                break
        bar.close()
    return summary


@contextlib.contextmanager
def _run(extractor: Extractor, records: Sequence, out: str, opts: RunOptions, dataset: dict):
    """Put the model on its device and open the writer; yields (device, writer, the records not
    yet cached, summary), and times the run into the summary."""
    device = resolve_device(opts.device)
    extractor.to(device)
    summary = Summary(out=str(out), total=len(records))
    start = time.perf_counter()
    # the handlers outlive the writer: a stop while the last shard and the index are written
    # only notes itself
    with _stop_signals(summary), _open_writer(extractor, out, opts, dataset) as writer:
        pending = [r for r in records if storable(r.key) not in writer.done]
        summary.skipped = len(records) - len(pending)
        pending = _drop_unstorable(pending, writer, summary)
        yield device, writer, pending, summary
    summary.seconds = time.perf_counter() - start


@contextlib.contextmanager
def _stop_signals(summary: Summary):
    """Note a SIGINT / SIGTERM in `summary.stopped_by` (the loops stop after the batch in
    hand); a second one interrupts at once. Outside the main thread signals stay as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stops = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in stops}

    def stop(signum, _frame):
        summary.stopped_by = signum
        for s in stops:  # the next one is not polite
            signal.signal(s, signal.default_int_handler)

    for s in stops:
        signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _drop_unstorable(records: Sequence, writer: CacheWriter, summary: Summary) -> list:
    """A key that is not valid UTF-8 (a file name in another encoding) cannot be stored: the
    item is recorded as failed, like an unreadable image, and the run goes on."""
    kept = []
    for rec in records:
        text = getattr(rec, "text", "")
        if storable(rec.key) == rec.key and storable(text) == text:
            kept.append(rec)
            continue
        path = getattr(rec, "path", "")
        reason = "the file name is not valid UTF-8" if path else "the text is not valid UTF-8"
        writer.add_failure(rec.key, path, reason)
        summary.failures.append((storable(rec.key), storable(path), reason))
    return kept


def _write_image_batch(extractor, batch, writer, device, opts, summary) -> None:
    good = [b for b in batch if b["reason"] is None]
    for bad in (b for b in batch if b["reason"] is not None):
        writer.add_failure(bad["key"], bad["path"], bad["reason"])
        summary.failures.append((bad["key"], bad["path"], bad["reason"]))
    if not good:
        return
    pixels = [b["pixels"].to(device, non_blocking=True) for b in good]
    with torch.inference_mode(), autocast(device, opts.precision):
        keys = [b["key"] for b in good]
        outputs = extractor.encode(Batch(pixels=pixels, hw=[b["hw"] for b in good], keys=keys))
    writer.add([b["key"] for b in good], _to_numpy(outputs, writer.schema))
    summary.written += len(good)


# ---- texts ------------------------------------------------------------------------------------


def unique_texts(records: Sequence[TextRecord]) -> tuple[list[TextRecord], dict[str, str]]:
    """First record of each distinct text, and alias key -> key of that first record."""
    first: dict[str, TextRecord] = {}
    aliases: dict[str, str] = {}
    for rec in records:
        if rec.text in first:
            aliases[rec.key] = first[rec.text].key
        else:
            first[rec.text] = rec
    return list(first.values()), aliases


def extract_texts(
    extractor: Extractor,
    records: Sequence[TextRecord],
    out: str,
    opts: RunOptions,
    dataset: dict[str, Any],
) -> Summary:
    with _run(extractor, records, out, opts, dataset) as (device, writer, pending, summary):
        uniques, aliases = unique_texts(pending)
        followers: dict[str, dict[str, str]] = {}
        for alias, target in aliases.items():
            followers.setdefault(target, {})[alias] = target
        bar = _progress(len(uniques), opts, "texts")
        for i in range(0, len(uniques), opts.batch_size):
            chunk = uniques[i : i + opts.batch_size]
            mine = {a: k for r in chunk for a, k in followers.get(r.key, {}).items()}
            _write_text_batch(extractor, chunk, mine, writer, device, opts)
            summary.written += len(chunk) + len(mine)
            bar.update(len(chunk))
            if summary.stopped_by:
                break
        bar.close()
    return summary


def _write_text_batch(extractor, chunk, aliases, writer, device, opts) -> None:
    with torch.inference_mode(), autocast(device, opts.precision):
        outputs = extractor.encode(Batch(texts=[r.text for r in chunk]))
    writer.add([r.key for r in chunk], _to_numpy(outputs, writer.schema), aliases=aliases)


def _progress(total: int, opts: RunOptions, unit: str):
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit=unit[:-1],
        desc=f"extract {unit}",
        file=sys.stderr,
        disable=not opts.progress,
        dynamic_ncols=True,
        smoothing=0.1,
    )
