"""Region features other tools wrote -> a vlpipe `regions` cache, and a cache -> LXMERT's TSV.

Formats:

- ``lxmert-tsv``: the bottom-up-attention / LXMERT TSV (``train2014_obj36.tsv``): no header, tab
  separated, one image per row: img_id, img_h, img_w, objects_id, objects_conf, attrs_id,
  attrs_conf, num_boxes, boxes, features; array fields are base64 of raw little-endian buffers
  (ids int64 [N], confidences float32 [N], boxes float32 [N, 4] absolute xyxy, features
  float32 [N, D]). Read row by row (constant memory), written back in the same field order.
- ``npz``: MILVLG bottom-up-attention.pytorch, one ``<image>.npz`` per image: x [N, D], bbox
  [N, 4], num_bbox, image_h, image_w and ``info`` {objects_id, objects_conf, attrs_id,
  attrs_conf, ...}, a dict that numpy stores pickled: it is only read with ``allow_pickle``.
  Ids are taken as written: current MILVLG code stores them 0-based without the background /
  "no attribute" column, as the cache does (its early versions kept that column).

Every array field is kept: image_feats, image_boxes, obj_ids/obj_conf, attr_ids/attr_conf,
image_hw (img_h, img_w), image_mask (the first num_boxes of K rows; K = --max-boxes, default
the first image's count for TSV, the largest num_bbox for npz). Imports default to float32, so
arrays come back byte for byte.

Keys and ids: an image's cache key is `image_key_from_lxmert_id(img_id)`
("COCO_train2014_000000458752" -> "458752", the key `vlpipe extract --dataset coco` gives) or,
with `verbatim_keys`, the img_id itself. The original ids are not stored one by one: the
importer infers one id format from the first image ("COCO_train2014_{num:012d}" or "{key}"),
checks that it rebuilds every img_id exactly (or fails, naming the row), and records it as
provenance["img_id_format"]; `export_lxmert_tsv` formats ids with it (``{key}`` = the key,
``{num}`` = the key as an integer).
"""

from __future__ import annotations

import base64
import binascii
import csv
import itertools
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlpipe import provenance as prov
from vlpipe.cache import FIELDS, CacheWriter, FeatureCache, Schema, region_shapes
from vlpipe.data_manifests.images import COCO_NAME
from vlpipe.data_manifests.lxmert import image_key_from_lxmert_id
from vlpipe.errors import ConfigError, InputError
from vlpipe.io import atomic_write, refuse_pickle

FORMATS = ("lxmert-tsv", "npz")
TSV_FIELDS = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
# TSV / npz-info name -> (little-endian dtype, cache field)
PER_BOX = {
    "objects_id": ("<i8", "obj_ids"),
    "objects_conf": ("<f4", "obj_conf"),
    "attrs_id": ("<i8", "attr_ids"),
    "attrs_conf": ("<f4", "attr_conf"),
}
# A 100-box float32 row is ~1.1 MB of base64, far over csv's 128 KiB default field limit.
_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


class FeatureFileError(InputError):
    """A malformed feature file or row; the message names the file and the row / image."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")


@dataclass
class RegionItem:
    """One image's regions as read from a file (N rows, unpadded)."""

    img_id: str
    hw: tuple[int, int]
    arrays: dict[str, np.ndarray]  # cache field -> N-row array
    where: str  # "file.tsv row 12 (img_id ...)" for error messages

    @property
    def num_boxes(self) -> int:
        return len(self.arrays["image_boxes"])


@dataclass
class ImportOptions:
    max_boxes: int | None = None  # K; None: see the module docstring
    dtype: str = "float32"
    allow_pickle: bool = False
    verbatim_keys: bool = False
    overwrite: bool = False
    batch_size: int = 256
    shard_items: int = 4096
    limit: int | None = None
    resume: bool = False  # keep the complete shards of an interrupted import, skip their keys


@dataclass
class ImportSummary:
    out: str
    items: int = 0
    skipped: int = 0  # already in the cache (--resume)
    max_boxes: int = 0
    feature_dim: int = 0
    img_id_format: str = "{key}"


# ---- reading the lxmert TSV -------------------------------------------------------------------


def read_lxmert_tsv(path: str | Path) -> Iterator[RegionItem]:
    """Items of an LXMERT TSV in file order, one row in memory at a time."""
    path = Path(path)
    csv.field_size_limit(_FIELD_LIMIT)
    with open(path, newline="") as handle:
        for row_no, row in enumerate(csv.reader(handle, delimiter="\t"), start=1):
            if row:  # a trailing blank line is not an image
                yield _tsv_item(row, f"{path} row {row_no}")


def _tsv_item(row: list[str], where: str) -> RegionItem:
    if len(row) != len(TSV_FIELDS):
        raise FeatureFileError(
            where, f"expected {len(TSV_FIELDS)} tab-separated fields, got {len(row)}"
        )
    rec = dict(zip(TSV_FIELDS, row, strict=True))
    where = f"{where} (img_id {rec['img_id']!r})"
    try:
        n, hw = int(rec["num_boxes"]), (int(rec["img_h"]), int(rec["img_w"]))
    except ValueError as err:
        raise FeatureFileError(
            where, f"num_boxes / img_h / img_w is not an integer ({err})"
        ) from None
    arrays = {
        cache: _b64(rec[name], dtype, name, where, n) for name, (dtype, cache) in PER_BOX.items()
    }
    arrays["image_boxes"] = _b64(rec["boxes"], "<f4", "boxes", where, n, 4)
    arrays["image_feats"] = _b64(rec["features"], "<f4", "features", where, n, -1)
    return RegionItem(rec["img_id"], hw, arrays, where)


def _b64(text: str, dtype: str, name: str, where: str, n: int, width: int | None = None):
    """Decode one array field: (n,) when width is None, (n, width) otherwise; width -1 reads
    the width off the buffer (features)."""
    try:
        values = np.frombuffer(base64.b64decode(text, validate=True), dtype=dtype)
    except (binascii.Error, ValueError) as err:
        raise FeatureFileError(where, f"{name} is not valid base64 of {dtype} ({err})") from None
    if width == -1:
        width = values.size // n if n else 0
    shape = (n,) if width is None else (n, width)
    if values.size != int(np.prod(shape)) or (n and width == 0):
        raise FeatureFileError(
            where, f"{name} holds {values.size} {np.dtype(dtype).name} values, not {n} boxes' worth"
        )
    return values.reshape(shape)


# ---- reading MILVLG npz -----------------------------------------------------------------------

_NPZ_KEYS = ("x", "bbox", "num_bbox", "image_h", "image_w")


def npz_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FeatureFileError(str(folder), "expected a folder of .npz files")
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise FeatureFileError(str(folder), "holds no .npz files")
    return files


def read_milvlg_npz(folder: str | Path, *, allow_pickle: bool = False) -> Iterator[RegionItem]:
    """Items of a folder of MILVLG per-image .npz files, in file-name order."""
    for path in npz_files(folder):
        yield _npz_item(path, allow_pickle)


def _npz_item(path: Path, allow_pickle: bool) -> RegionItem:
    where = str(path)
    with np.load(path, allow_pickle=allow_pickle) as data:
        missing = [k for k in _NPZ_KEYS if k not in data.files]
        if missing:
            raise FeatureFileError(where, f"not a MILVLG feature file: lacks {missing}")
        info = _npz_info(data, where, allow_pickle)
        arrays = {"image_feats": data["x"], "image_boxes": data["bbox"]}
        n, hw = int(data["num_bbox"]), (int(data["image_h"]), int(data["image_w"]))
    if (
        arrays["image_feats"].ndim != 2
        or arrays["image_boxes"].shape != (n, 4)
        or len(arrays["image_feats"]) != n
    ):
        raise FeatureFileError(
            where,
            f"x {arrays['image_feats'].shape} / bbox {arrays['image_boxes'].shape} "
            f"do not hold num_bbox = {n} boxes",
        )
    for name, (dtype, cache) in PER_BOX.items():
        arrays[cache] = _info_array(info, name, dtype, n, where)
    return RegionItem(path.stem, hw, arrays, where)


def _npz_info(data, where: str, allow_pickle: bool) -> dict[str, Any]:
    if "info" not in data.files:
        raise FeatureFileError(where, "lacks `info` (object / attribute labels)")
    try:
        info = data["info"].item()
    except ValueError as err:  # numpy refuses a pickled array unless allowed to unpickle
        refuse_pickle(where, allow_pickle=allow_pickle, pickled="its `info` is a pickled dict")
        raise FeatureFileError(where, f"`info` is not one dict ({err})") from None
    if not isinstance(info, dict):
        raise FeatureFileError(where, f"`info` is a {type(info).__name__}, expected a dict")
    return info


def _info_array(info: dict, name: str, dtype: str, n: int, where: str) -> np.ndarray:
    if name not in info:
        if name.startswith("attrs_"):  # saved without an attribute head: "no attribute" for all
            return np.full(n, -1 if name == "attrs_id" else 0, dtype=dtype)
        raise FeatureFileError(where, f"`info` lacks {name!r}")
    value = np.asarray(info[name])
    if value.shape != (n,):
        raise FeatureFileError(where, f"info[{name!r}] has shape {value.shape}, expected ({n},)")
    return value.astype(dtype, copy=False)


def _npz_max_boxes(folder: str | Path) -> int:
    """Largest num_bbox of the folder (reads only that tiny member of each file)."""
    largest = 0
    for path in npz_files(folder):
        with np.load(path, allow_pickle=False) as data:
            largest = max(largest, int(data["num_bbox"]))
    return largest


# ---- image ids ---------------------------------------------------------------------------------


def infer_id_format(img_id: str, verbatim: bool) -> str:
    """The format that rebuilds img_id from its cache key (see the module docstring)."""
    match = None if verbatim else COCO_NAME.fullmatch(img_id)
    if match is None or not match["prefix"]:
        return "{key}"
    return f"{match['prefix']}{{num:0{len(match['id'])}d}}"


def format_img_id(fmt: str, key: str) -> str:
    try:
        return fmt.format(key=key, num=int(key) if key.isdecimal() else key)
    except (ValueError, KeyError, IndexError) as err:
        raise ConfigError(f"img id format {fmt!r} does not apply to key {key!r} ({err})") from None


def _key_of(item: RegionItem, fmt: str, verbatim: bool) -> str:
    key = item.img_id if verbatim else image_key_from_lxmert_id(item.img_id)
    if format_img_id(fmt, key) != item.img_id:
        raise FeatureFileError(
            item.where,
            f"img_id {item.img_id!r} does not follow the id format {fmt!r} of the first image, "
            "so it could not be exported back; pass --verbatim-keys to key the cache by img_id",
        )
    return key


# ---- writing the cache --------------------------------------------------------------------------


def import_features(
    fmt: str, source: str | Path, out: str | Path, opts: ImportOptions | None = None
) -> ImportSummary:
    """Read `source` (a TSV file or a folder of npz) in `fmt` into the cache `out`."""
    opts = opts or ImportOptions()
    if fmt == "lxmert-tsv":
        items: Iterable[RegionItem] = read_lxmert_tsv(source)
    elif fmt == "npz":
        items = read_milvlg_npz(source, allow_pickle=opts.allow_pickle)
    else:
        raise ConfigError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    items = itertools.islice(items, opts.limit)
    first = next(items, None)
    if first is None:
        raise FeatureFileError(str(source), "holds no images")
    k = opts.max_boxes or (_npz_max_boxes(source) if fmt == "npz" else first.num_boxes)
    dim = first.arrays["image_feats"].shape[1]
    if k < 1 or dim < 1:
        raise FeatureFileError(first.where, "first image has no boxes: pass --max-boxes")
    summary = ImportSummary(str(out), max_boxes=k, feature_dim=dim)
    summary.img_id_format = infer_id_format(first.img_id, opts.verbatim_keys)
    schema = Schema.build("regions", region_shapes(k, dim), opts.dtype)
    provenance = _import_provenance(fmt, Path(source), opts, summary)
    with CacheWriter(
        out,
        schema,
        provenance,
        shard_items=opts.shard_items,
        overwrite=opts.overwrite,
        resume=opts.resume,
    ) as writer:
        _write_items(itertools.chain([first], items), writer, summary, opts)
    return summary


def _write_items(
    items: Iterable[RegionItem], writer: CacheWriter, summary: ImportSummary, opts: ImportOptions
) -> None:
    seen: set[str] = set()
    batch: list[tuple[str, RegionItem]] = []
    for item in items:
        key = _key_of(item, summary.img_id_format, opts.verbatim_keys)
        if key in seen:
            raise FeatureFileError(item.where, f"cache key {key!r} appears twice")
        seen.add(key)
        if key in writer.done:
            summary.skipped += 1
            continue
        batch.append((key, item))
        if len(batch) == opts.batch_size:
            writer.add(*_padded(batch, summary))
            batch = []
    if batch:
        writer.add(*_padded(batch, summary))
    summary.items = len(seen)


def _padded(
    batch: list[tuple[str, RegionItem]], summary: ImportSummary
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Stack a batch into K-row arrays, zero padded; image_mask marks the real rows."""
    k, dim = summary.max_boxes, summary.feature_dim
    # float32 / int64 / bool as in the files; the writer casts features to the cache dtype
    out = {
        name: np.zeros((len(batch), *shape), FIELDS[name][0] or "float32")
        for name, shape in region_shapes(k, dim).items()
    }
    out["image_hw"] = np.array([item.hw for _, item in batch], dtype=np.int32)
    for i, (_, item) in enumerate(batch):
        n = item.num_boxes
        if n > k:
            raise FeatureFileError(
                item.where, f"{n} boxes, more than K = {k}: pass --max-boxes {n} or more"
            )
        if item.arrays["image_feats"].shape[1:] != (dim,) and n:
            got = item.arrays["image_feats"].shape[1]
            raise FeatureFileError(item.where, f"features are {got}-d, the first image's {dim}-d")
        for name, value in item.arrays.items():
            out[name][i, :n] = value
        out["image_mask"][i, :n] = True
    return [key for key, _ in batch], out


def _import_provenance(fmt: str, source: Path, opts: ImportOptions, s: ImportSummary) -> dict:
    return {
        "backbone": "imported",
        "model": {"arch": f"unknown (imported from {fmt})"},
        "weights": "unknown (imported)",
        "weights_sha256": None,
        "source_format": fmt,
        "source": str(source.resolve()),
        "img_id_format": s.img_id_format,
        "key_rule": "img_id" if opts.verbatim_keys else "image_key_from_lxmert_id(img_id)",
        "max_boxes": s.max_boxes,
        "dtype": opts.dtype,
        "box_policy": None,
        "dataset": None,
        "split": None,
        "versions": prov.package_versions(),
        "created": prov.now_iso(),
        **prov.host_record(),
    }


# ---- export -------------------------------------------------------------------------------------


def export_lxmert_tsv(
    cache_path: str | Path, out: str | Path, *, img_id_format: str | None = None, batch: int = 256
) -> int:
    """Write a `regions` cache as an LXMERT TSV (rows in cache order, only the `image_mask`
    rows of each image, float32 features); returns the number of images written."""
    cache = FeatureCache(cache_path)
    if cache.kind != "regions":
        raise InputError(f"{cache_path}: a {cache.kind} cache; only regions caches export to TSV")
    fmt = img_id_format or cache.provenance.get("img_id_format") or "{key}"
    keys = _row_keys(cache)
    with atomic_write(out) as tmp, open(tmp, "w", newline="") as handle:
        # generate_tsv.py's csv.DictWriter defaults: tab delimiter, "\r\n" line ends
        writer = csv.writer(handle, delimiter="\t", lineterminator="\r\n")
        for start in range(0, cache.num_rows, batch):
            rows = cache.read_rows(np.arange(start, min(start + batch, cache.num_rows)))
            for i in range(len(rows["image_hw"])):
                writer.writerow(_tsv_row(format_img_id(fmt, keys[start + i]), rows, i))
    return cache.num_rows


def _row_keys(cache: FeatureCache) -> list[str]:
    """The key of every row, in row order (the first key when aliases share a row)."""
    keys = cache.keys()
    by_row: dict[int, str] = {}
    for key, row in zip(keys, cache.rows_of(keys).tolist(), strict=True):
        by_row.setdefault(row, key)
    return [by_row[r] for r in range(cache.num_rows)]


def _tsv_row(img_id: str, rows: dict[str, np.ndarray], i: int) -> list[str]:
    mask = rows["image_mask"][i]
    height, width = rows["image_hw"][i].tolist()
    fields = {name: rows[cache][i][mask].astype(dtype) for name, (dtype, cache) in PER_BOX.items()}
    boxes = rows["image_boxes"][i][mask].astype("<f4")
    feats = rows["image_feats"][i][mask].astype("<f4")
    return [
        img_id,
        str(height),
        str(width),
        *(_b64_text(fields[name]) for name in PER_BOX),
        str(int(mask.sum())),
        _b64_text(boxes),
        _b64_text(feats),
    ]


def _b64_text(values: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(values).tobytes()).decode("ascii")
