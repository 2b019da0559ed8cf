"""The vlpipe feature cache: one schema, one writer, one reader.

Layout on disk (``cache.h5`` is the only path users pass around)::

    cache.h5                 index: provenance, field table, shard table, key -> (shard, row)
                             and HDF5 external links /shards/<name> for h5ls/h5py browsing
    cache.shards/r0-00000.h5 a shard: one row per item, every field a dataset of N rows
    cache.shards/r0-00001.h5 ...

A shard is written under a ``.tmp`` name and renamed only when complete, so a reader never sees
a half-written shard, and ``--resume`` simply skips the keys already in complete shards. Each
writer (one per GPU or node) writes shards prefixed with its own id; ``build_index`` ties every
complete shard into the index. Shards are self-describing: the index can always be rebuilt.

Per item fields (the same names are used in training batches and in ``forward()``)::

    image_feats  K x D   visual features: regions, ViT patch tokens or CNN grid cells
    image_cls    D       ViT CLS token / globally pooled CNN feature
    image_boxes  K x 4   absolute xyxy pixels of each region
    image_mask   K       True for real regions (K varies with adaptive box policies)
    image_hw     2       original image height, width
    obj_ids ...  K       object / attribute ids and confidences of each region
    text_feats   L x D   token features;  text_cls D;  text_ids L;  text_mask L;  text (str)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from vlpipe.io import write_text_atomic
from vlpipe.provenance import sha256_file

SCHEMA_VERSION = 1
FEATURE_DTYPES = ("float16", "float32")

# name: (dtype, meaning). dtype None = the cache's feature dtype (float16 unless asked).
FIELDS: dict[str, tuple[str | None, str]] = {
    "image_feats": (None, "K x D visual features (regions, patch tokens or grid cells)"),
    "image_cls": (None, "D ViT CLS token or globally pooled CNN feature"),
    "image_boxes": ("float32", "K x 4 absolute x1, y1, x2, y2 in original image pixels"),
    "image_mask": ("bool", "K True for real regions"),
    "image_hw": ("int32", "2 original image height, width"),
    "obj_ids": ("int64", "K object class id (0-based, background excluded)"),
    "obj_conf": ("float32", "K object class confidence"),
    "attr_ids": ("int64", "K attribute id (0-based, 'no attribute' excluded)"),
    "attr_conf": ("float32", "K attribute confidence"),
    "text_feats": (None, "L x D last-layer token features"),
    "text_cls": (None, "D last-layer [CLS] feature"),
    "text_ids": ("int32", "L WordPiece token ids"),
    "text_mask": ("bool", "L attention mask"),
    "text": ("str", "the text that was encoded"),
}
REGION_FIELDS = ("image_boxes", "image_mask", "obj_ids", "obj_conf", "attr_ids", "attr_conf")
# Which fields each kind of cache may hold; `required` ones must always be present.
KINDS: dict[str, dict[str, tuple[str, ...]]] = {
    "regions": {"required": ("image_feats", "image_hw", *REGION_FIELDS), "optional": ()},
    "patches": {"required": ("image_cls", "image_hw"), "optional": ("image_feats",)},
    "grid": {"required": ("image_cls", "image_hw"), "optional": ("image_feats",)},
    "tokens": {
        "required": ("text_cls", "text_mask", "text_ids", "text"),
        "optional": ("text_feats",),
    },
}
_STR = h5py.string_dtype("utf-8")


class CacheError(RuntimeError):
    """Anything wrong with a cache on disk; the message names the file."""


class CacheWriteError(CacheError):
    """Writing failed (disk full, file-size limit, I/O error); complete shards are intact."""


@dataclass(frozen=True)
class Schema:
    """The fields one cache holds: name -> (per-item shape, dtype)."""

    kind: str
    fields: dict[str, tuple[tuple[int, ...], str]]

    @classmethod
    def build(cls, kind: str, shapes: dict[str, tuple[int, ...]], feature_dtype: str) -> Schema:
        if kind not in KINDS:
            raise ValueError(f"unknown cache kind {kind!r}; known: {sorted(KINDS)}")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(
                f"feature dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}"
            )
        allowed = KINDS[kind]["required"] + KINDS[kind]["optional"]
        missing = [f for f in KINDS[kind]["required"] if f not in shapes]
        extra = [f for f in shapes if f not in allowed]
        if missing or extra:
            raise ValueError(f"{kind} cache: missing fields {missing}, unexpected fields {extra}")
        fields = {n: (tuple(s), FIELDS[n][0] or feature_dtype) for n, s in shapes.items()}
        return cls(kind, fields)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "fields": self.fields})

    @classmethod
    def from_json(cls, text: str) -> Schema:
        raw = json.loads(text)
        return cls(raw["kind"], {n: (tuple(s), d) for n, (s, d) in raw["fields"].items()})


def shard_dir(path: str | Path) -> Path:
    """cache.h5 -> cache.shards/ beside it."""
    path = Path(path)
    return path.with_name(path.stem + ".shards")


def complete_shards(path: str | Path) -> list[Path]:
    folder = shard_dir(path)
    return sorted(folder.glob("*.h5")) if folder.is_dir() else []


def _h5_dtype(dtype: str):
    return _STR if dtype == "str" else np.dtype(dtype)


def _chunk_rows(shape: tuple[int, ...], dtype: str) -> int:
    """Rows per HDF5 chunk: one item when items are big (random access), more when tiny."""
    item_bytes = int(np.prod(shape, dtype=np.int64)) * (
        8 if dtype == "str" else np.dtype(dtype).itemsize
    )
    return int(max(1, min(1024, (256 << 10) // max(item_bytes, 1))))


def _write_attrs(h5: h5py.File, schema: Schema, provenance: dict) -> None:
    h5.attrs["schema_version"] = SCHEMA_VERSION
    h5.attrs["kind"] = schema.kind
    h5.attrs["schema"] = schema.to_json()
    h5.attrs["provenance"] = json.dumps(provenance, sort_keys=True)


class ShardWriter:
    """Appends rows to one shard under a temporary name; `finish` makes it visible atomically."""

    def __init__(self, final_path: Path, schema: Schema, provenance: dict, writer: str):
        self.final_path = final_path
        self.tmp_path = final_path.with_name(final_path.name + ".tmp")
        self.schema = schema
        self.n = 0
        self.n_aliases = 0
        self.h5 = h5py.File(self.tmp_path, "w")
        _write_attrs(self.h5, schema, provenance)
        self.h5.attrs["writer"] = writer
        self.h5.create_dataset("keys", (0,), _STR, maxshape=(None,), chunks=(1024,))
        for name, (shape, dtype) in schema.fields.items():
            chunks = (_chunk_rows(shape, dtype), *shape)
            self.h5.create_dataset(
                name, (0, *shape), _h5_dtype(dtype), maxshape=(None, *shape), chunks=chunks
            )
        for name in ("failed_keys", "failed_paths", "failed_reasons", "alias_keys"):
            self.h5.create_dataset(name, (0,), _STR, maxshape=(None,), chunks=(256,))
        self.h5.create_dataset("alias_rows", (0,), np.int64, maxshape=(None,), chunks=(256,))

    def append(self, keys: Sequence[str], arrays: dict[str, np.ndarray]) -> None:
        n, m = self.n, len(keys)
        _append(self.h5["keys"], n, list(keys))
        for name, (_, dtype) in self.schema.fields.items():
            value = arrays[name] if dtype == "str" else np.asarray(arrays[name], dtype=dtype)
            _append(self.h5[name], n, value)
        self.n += m

    def append_aliases(self, keys: Sequence[str], rows: Sequence[int]) -> None:
        _append(self.h5["alias_keys"], self.n_aliases, list(keys))
        _append(self.h5["alias_rows"], self.n_aliases, np.asarray(rows, np.int64))
        self.n_aliases += len(keys)

    def append_failure(self, key: str, path: str, reason: str) -> None:
        i = len(self.h5["failed_keys"])
        for name, value in (
            ("failed_keys", key),
            ("failed_paths", path),
            ("failed_reasons", reason),
        ):
            _append(self.h5[name], i, [value])

    @property
    def n_failures(self) -> int:
        return len(self.h5["failed_keys"])

    def finish(self) -> Path:
        self.h5.attrs["n_items"] = self.n
        self.h5.flush()
        fd = self.h5.id.get_vfd_handle()
        os.fsync(fd)
        self.h5.close()
        # The checksum sits beside the shard (a file cannot hold its own hash); `vlpipe verify`
        # compares it with the bytes on disk. It is written before the rename, so every
        # visible shard has one.
        write_text_atomic(checksum_path(self.final_path), sha256_file(self.tmp_path))
        os.replace(self.tmp_path, self.final_path)
        _fsync_dir(self.final_path.parent)
        return self.final_path

    def abort(self) -> None:
        """Throw the partial shard away (after a crash-like error the file may not close)."""
        with contextlib.suppress(RuntimeError, OSError):
            self.h5.close()
        self.tmp_path.unlink(missing_ok=True)


def checksum_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".sha256")


def shard_checksum(shard: Path) -> str:
    """The recorded sha256 of a shard (computed now for shards written without one)."""
    side = checksum_path(shard)
    return side.read_text().strip() if side.exists() else sha256_file(shard)


def _append(ds: h5py.Dataset, start: int, values) -> None:
    if len(values) == 0:
        return
    ds.resize(start + len(values), axis=0)
    ds[start : start + len(values)] = values


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _decode(values: Iterable) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def read_shard_keys(shard: Path) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """(row keys, alias keys, alias rows, failed keys) of one complete shard."""
    try:
        with h5py.File(shard, "r") as h5:
            return (
                _decode(h5["keys"][:]),
                _decode(h5["alias_keys"][:]),
                h5["alias_rows"][:],
                _decode(h5["failed_keys"][:]),
            )
    except (OSError, KeyError) as err:
        raise CacheError(f"{shard}: unreadable shard ({err})") from err


class CacheWriter:
    """Writes items into bounded shards of one cache; the index is built on `close`.

    writer: an id unique per concurrent writer (e.g. "r0", "r1" for torch.distributed ranks).
    resume: keep complete shards and skip their keys; otherwise an existing cache is an error
    unless overwrite=True.
    """

    def __init__(
        self,
        path: str | Path,
        schema: Schema,
        provenance: dict,
        *,
        shard_items: int = 4096,
        writer: str = "r0",
        resume: bool = False,
        overwrite: bool = False,
        build_index_on_close: bool = True,
    ):
        self.path = Path(path)
        # JSON round trip: what is compared on resume must look exactly like what was stored
        self.provenance = json.loads(json.dumps(provenance, default=str))
        self.schema, self.writer = schema, writer
        self.shard_items = max(1, int(shard_items))
        self.build_index_on_close = build_index_on_close
        self._prepare(resume, overwrite)
        self.done = self._load_done() if resume else set()
        self._seq = self._next_seq()
        self._shard: ShardWriter | None = None

    def _prepare(self, resume: bool, overwrite: bool) -> None:
        folder = shard_dir(self.path)
        exists = self.path.exists() or complete_shards(self.path)
        if exists and not (resume or overwrite):
            raise CacheError(
                f"{self.path} already exists: pass --resume to continue it or "
                "--overwrite to replace it"
            )
        if overwrite and not resume:
            self.path.unlink(missing_ok=True)
            if folder.is_dir():
                shutil.rmtree(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{self.writer}-*.h5.tmp"):  # a crashed run's partial shard
            stale.unlink()
        for side in folder.glob(f"{self.writer}-*.h5.sha256"):  # crashed between hash and rename
            if not side.with_suffix("").exists():
                side.unlink()

    def _load_done(self) -> set[str]:
        done: set[str] = set()
        for shard in complete_shards(self.path):
            self._check_compatible(shard)
            keys, aliases, _, failed = read_shard_keys(shard)
            done.update(keys, aliases, failed)
        return done

    def _check_compatible(self, shard: Path) -> None:
        with h5py.File(shard, "r") as h5:
            schema = Schema.from_json(h5.attrs["schema"])
            prov = json.loads(h5.attrs["provenance"])
        if schema != self.schema:
            raise CacheError(
                f"{shard}: written with schema {schema.to_json()}, this run writes "
                f"{self.schema.to_json()}; use a new --out or --overwrite"
            )
        ours = {k: self.provenance.get(k) for k in RESUME_MUST_MATCH}
        theirs = {k: prov.get(k) for k in RESUME_MUST_MATCH}
        if ours != theirs:
            diff = {k: (theirs[k], ours[k]) for k in ours if ours[k] != theirs[k]}
            raise CacheError(f"{shard}: cannot resume, the run differs (cache, now): {diff}")

    def _next_seq(self) -> int:
        seqs = [
            int(p.stem.rsplit("-", 1)[1])
            for p in complete_shards(self.path)
            if p.stem.startswith(self.writer + "-")
        ]
        return max(seqs, default=-1) + 1

    def _current(self) -> ShardWriter:
        if self._shard is None:
            name = f"{self.writer}-{self._seq:05d}.h5"
            prov = dict(self.provenance, shard=name)
            self._shard = ShardWriter(shard_dir(self.path) / name, self.schema, prov, self.writer)
            self._seq += 1
        return self._shard

    def add(
        self,
        keys: Sequence[str],
        arrays: dict[str, np.ndarray],
        aliases: dict[str, str] | None = None,
    ) -> None:
        """Append a batch. arrays[name] has len(keys) rows; aliases maps extra keys to a key of
        this batch whose row they share (identical texts are stored once). A batch that would
        overflow the shard is split, so no shard holds more than `shard_items` rows."""
        self._validate(keys, arrays)
        start = 0
        while start < len(keys):
            shard = self._current()
            stop = min(len(keys), start + self.shard_items - shard.n)
            part = list(keys[start:stop])
            with self._write_errors():
                shard.append(part, {n: arrays[n][start:stop] for n in self.schema.fields})
                self._add_aliases(shard, shard.n - len(part), part, aliases or {})
            self.done.update(part)
            start = stop
            if shard.n >= self.shard_items:
                self.flush()

    def _add_aliases(
        self, shard: ShardWriter, first_row: int, part: list[str], aliases: dict[str, str]
    ) -> None:
        local = {k: first_row + i for i, k in enumerate(part)}
        mine = {a: k for a, k in aliases.items() if k in local}
        if mine:
            shard.append_aliases(list(mine), [local[k] for k in mine.values()])
            self.done.update(mine)

    def add_failure(self, key: str, path: str, reason: str) -> None:
        self._current().append_failure(key, path, reason)
        self.done.add(key)

    def _validate(self, keys: Sequence[str], arrays: dict[str, np.ndarray]) -> None:
        for name, (shape, _) in self.schema.fields.items():
            value = arrays.get(name)
            if value is None:
                raise CacheError(f"{self.path}: batch lacks field {name!r}")
            if len(value) != len(keys) or (name != "text" and tuple(value.shape[1:]) != shape):
                got = np.shape(value)
                raise CacheError(
                    f"{self.path}: field {name!r} of item {keys[0]!r}.. has shape "
                    f"{got}, the cache expects ({len(keys)}, {shape})"
                )

    def flush(self) -> None:
        """Finish the current shard (if any rows or failures) and make it visible."""
        if self._shard is not None:
            with self._write_errors():
                if self._shard.n or self._shard.n_failures:
                    self._shard.finish()
                else:
                    self._shard.abort()
            self._shard = None

    @contextlib.contextmanager
    def _write_errors(self):
        """A full disk or file-size limit surfaces from HDF5 as OSError or RuntimeError: drop the
        partial shard and say what to do; complete shards are untouched."""
        try:
            yield
        except (OSError, RuntimeError) as err:
            self.abort()
            raise CacheError(
                f"writing a shard of {self.path} failed ({err}); the complete "
                "shards are intact: fix the cause (disk space?) and rerun the same "
                "command with --resume"
            ) from err

    def close(self) -> None:
        self.flush()
        if self.build_index_on_close:
            build_index(self.path)

    def abort(self) -> None:
        """Drop the partial shard; complete shards stay for --resume."""
        shard, self._shard = self._shard, None
        if shard is not None:
            shard.abort()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


# Provenance keys that must agree between a resumed run and the shards it continues.
RESUME_MUST_MATCH = (
    "backbone",
    "model",
    "weights_sha256",
    "seed",
    "preprocessing",
    "dtype",
    "dataset",
    "split",
    "box_policy",
)


def build_index(path: str | Path) -> dict:
    """Tie every complete shard beside `path` into the index file, atomically. Returns a summary."""
    path = Path(path)
    shards = complete_shards(path)
    if not shards:
        raise CacheError(f"{path}: no complete shards in {shard_dir(path)}")
    rows_keys, alias_keys, alias_rows, failures, table = [], [], [], [], []
    first_attrs, offset = None, 0
    for shard in shards:
        keys, akeys, arows, _ = read_shard_keys(shard)
        with h5py.File(shard, "r") as h5:
            attrs = dict(h5.attrs)
            failures += zip(
                _decode(h5["failed_keys"][:]),
                _decode(h5["failed_paths"][:]),
                _decode(h5["failed_reasons"][:]),
                strict=True,
            )
        if first_attrs is None:
            first_attrs = attrs
        elif attrs["schema"] != first_attrs["schema"]:
            raise CacheError(f"{shard}: schema differs from {shards[0]}")
        rows_keys += keys
        alias_keys += akeys
        alias_rows += [offset + int(r) for r in arows]
        table.append((shard.name, len(keys), shard.stat().st_size, shard_checksum(shard)))
        offset += len(keys)
    all_keys = rows_keys + alias_keys
    _check_unique(path, all_keys, shards)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with h5py.File(tmp, "w") as h5:
        for name in ("schema_version", "kind", "schema", "provenance"):
            h5.attrs[name] = first_attrs[name]
        h5.attrs["n_rows"], h5.attrs["n_keys"], h5.attrs["n_failures"] = (
            offset,
            len(all_keys),
            len(failures),
        )
        h5["shard_files"] = np.array([t[0] for t in table], dtype=object).astype(_STR)
        h5["shard_rows"] = np.array([t[1] for t in table], np.int64)
        h5["shard_bytes"] = np.array([t[2] for t in table], np.int64)
        h5["shard_sha256"] = np.array([t[3] for t in table], dtype=object).astype(_STR)
        h5.create_dataset("keys", data=np.array(all_keys, dtype=object), dtype=_STR)
        h5["key_rows"] = np.concatenate(
            [np.arange(offset), np.asarray(alias_rows, np.int64)]
        ).astype(np.int64)
        h5.create_dataset(
            "failures", data=np.array(failures or np.empty((0, 3)), dtype=object), dtype=_STR
        )
        links = h5.create_group("shards")
        for name, *_ in table:
            links[name] = h5py.ExternalLink(f"{shard_dir(path).name}/{name}", "/")
    os.replace(tmp, path)
    return {"rows": offset, "keys": len(all_keys), "failures": len(failures), "shards": len(table)}


SPAN_BYTES = 8 << 20  # read a whole span when it costs at most this much


def _read_sorted(ds: h5py.Dataset, rows: np.ndarray, item_bytes: int) -> np.ndarray:
    """Rows (sorted, unique) of a dataset. h5py's point selection (`ds[rows]`) runs at about
    18 MB/s (docs/benchmarks.md), so small items are read as one contiguous span and picked in
    numpy, and big items (regions, patches) one row slice at a time."""
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    if len(rows) == 1 or (hi - lo) * item_bytes <= max(SPAN_BYTES, 4 * len(rows) * item_bytes):
        return ds[lo:hi][rows - lo]
    out = np.empty((len(rows), *ds.shape[1:]), dtype=ds.dtype)
    for i, row in enumerate(rows.tolist()):
        out[i] = ds[row]
    return out


def _check_unique(path: Path, keys: list[str], shards: list[Path]) -> None:
    if len(set(keys)) != len(keys):
        seen, dup = set(), []
        for k in keys:
            if k in seen:
                dup.append(k)
            seen.add(k)
        raise CacheError(
            f"{path}: duplicate keys across shards {[s.name for s in shards]}: {dup[:5]}"
        )


class FeatureCache:
    """Random access to a cache by key or by row, safe to hand to DataLoader workers.

    Only the index (keys and row numbers) is held in memory; features are read on demand. HDF5
    handles are opened lazily and re-opened after a fork, so no handle crosses a process boundary.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"{self.path}: no such cache")
        with h5py.File(self.path, "r") as h5:
            if int(h5.attrs.get("schema_version", -1)) > SCHEMA_VERSION:
                raise CacheError(
                    f"{self.path}: schema version {h5.attrs['schema_version']} is newer "
                    f"than this vlpipe ({SCHEMA_VERSION}); upgrade vlpipe"
                )
            self.schema = Schema.from_json(h5.attrs["schema"])
            self.provenance = json.loads(h5.attrs["provenance"])
            self.shard_files = _decode(h5["shard_files"][:])
            shard_rows = h5["shard_rows"][:]
            # utf-8 bytes, not numpy unicode: 4x less memory for the one O(N) table we hold.
            self._keys = np.array(h5["keys"][:].tolist(), dtype=bytes)
            self._key_rows = h5["key_rows"][:]
            self.failures = [tuple(_decode(r)) for r in h5["failures"][:]]
        self._starts = np.concatenate([[0], np.cumsum(shard_rows)]).astype(np.int64)
        self._order = np.argsort(self._keys, kind="stable")
        self._sorted_keys = self._keys[self._order]
        self._handles: dict[int, h5py.File] = {}
        # Dataset objects kept open: re-opening one per read throws HDF5's chunk cache away.
        self._datasets: dict[tuple[int, str], h5py.Dataset] = {}
        self._pid = os.getpid()

    @property
    def kind(self) -> str:
        return self.schema.kind

    @property
    def fields(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return self.schema.fields

    @property
    def num_rows(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        return len(self._keys)

    def keys(self) -> list[str]:
        return _decode(self._keys)

    def __contains__(self, key: str) -> bool:
        return bool(self._find([key])[1][0])

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        """Vectorised `key in cache` for many keys (bool array)."""
        if not len(keys) or not len(self._sorted_keys):  # a cache may hold only failures
            return np.zeros(len(keys), dtype=bool)
        return self._find(keys)[1]

    def _find(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(position in sorted order, found?) of each key."""
        query = np.array([k.encode() for k in keys], dtype=bytes)
        pos = np.minimum(np.searchsorted(self._sorted_keys, query), len(self._sorted_keys) - 1)
        return pos, self._sorted_keys[pos] == query

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """Row number of each key; KeyError names the first missing one."""
        pos, found = self._find(keys)
        if not np.all(found):
            raise KeyError(f"{self.path}: key {keys[int(np.argmin(found))]!r} is not in the cache")
        return self._key_rows[self._order[pos]]

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # forked: never touch the parent's handles
            self._handles, self._datasets, self._pid = {}, {}, os.getpid()
        h5 = self._handles.get(shard)
        if h5 is None:
            name = shard_dir(self.path) / self.shard_files[shard]
            try:
                h5 = h5py.File(name, "r")
            except OSError as err:
                raise CacheError(f"{name}: cannot open shard ({err})") from err
            self._handles[shard] = h5
        return h5

    def read_rows(
        self, rows: Sequence[int] | np.ndarray, fields: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Stacked fields of the given rows, in the given order (rows may repeat)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise IndexError(f"{self.path}: row out of range 0..{self.num_rows - 1}")
        fields = list(fields or self.schema.fields)
        out = {f: self._empty(f, len(rows)) for f in fields}
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        for shard in np.unique(shard_of):
            sel = np.nonzero(shard_of == shard)[0]
            local = rows[sel] - self._starts[shard]
            uniq, inverse = np.unique(local, return_inverse=True)
            for f in fields:
                data = _read_sorted(self._dataset(int(shard), f), uniq, self._item_bytes(f))
                out[f][sel] = data[inverse] if f != "text" else np.array(_decode(data))[inverse]
        return out

    def _dataset(self, shard: int, field: str) -> h5py.Dataset:
        h5 = self._file(shard)  # also resets the caches after a fork
        ds = self._datasets.get((shard, field))
        if ds is None:
            ds = self._datasets[(shard, field)] = h5[field]
        return ds

    def _item_bytes(self, field: str) -> int:
        shape, dtype = self.schema.fields[field]
        return int(np.prod(shape, dtype=np.int64)) * (
            8 if dtype == "str" else np.dtype(dtype).itemsize
        )

    def _empty(self, field: str, n: int) -> np.ndarray:
        if field not in self.schema.fields:
            raise KeyError(f"{self.path}: no field {field!r}; it has {sorted(self.schema.fields)}")
        shape, dtype = self.schema.fields[field]
        return np.empty((n, *shape), dtype=object if dtype == "str" else dtype)

    def read(
        self, keys: Sequence[str], fields: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        return self.read_rows(self.rows_of(keys), fields)

    def __getitem__(self, key: str | int) -> dict[str, np.ndarray]:
        rows = [key] if isinstance(key, int | np.integer) else self.rows_of([key])
        return {f: v[0] for f, v in self.read_rows(rows).items()}

    def close(self) -> None:
        self._datasets = {}
        if self._pid == os.getpid():
            for h5 in self._handles.values():
                h5.close()
        self._handles = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_handles"], state["_datasets"] = {}, {}
        return state

    def __del__(self):
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn h5py down
            self.close()

    def summary(self, n_samples: int = 5) -> dict:
        """What `vlpipe inspect` prints."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "schema_version": SCHEMA_VERSION,
            "items": len(self),
            "rows": self.num_rows,
            "shards": len(self.shard_files),
            "failures": len(self.failures),
            "fields": {n: {"shape": list(s), "dtype": d} for n, (s, d) in self.fields.items()},
            "sample_keys": self.keys()[:n_samples],
            "failed": [
                dict(zip(("key", "path", "reason"), f, strict=True))
                for f in self.failures[:n_samples]
            ],
            "provenance": self.provenance,
        }
