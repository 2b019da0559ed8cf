"""The vlpipe feature cache: one schema, one writer, one reader.

Layout on disk (``cache.h5`` is the only path users pass around; every file name is in
`vlpipe/cache_layout.py`)::

    cache.h5                 index: provenance, field table, shard table, key -> (shard, row)
                             and HDF5 external links /shards/<name> for h5ls/h5py browsing
    cache.shards/r0-00000.h5 a shard: one row per item, every field a dataset of N rows
    cache.shards/r0-00001.h5 ...

A shard is written under a ``.tmp`` name and renamed only when complete, so a reader never sees
a half-written shard, and ``--resume`` simply skips the keys already in complete shards. Each
writer (one per GPU or node) writes shards prefixed with its own id, under a lock of its own;
``build_index`` ties every complete shard into the index. Shards are self-describing: the index
can always be rebuilt.

The index's shard table records, per shard: file name, rows, bytes, sha256, a digest of its
keys, and the digest of its provenance identity (`vlpipe.provenance.identity_digest`: what
defines the features, not when or where they were made). `vlpipe verify` checks every shard
against that record; the reader checks the cheap part of it when it first opens a shard.
Schema v1 indexes (no keys / identity digests) are still read.

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
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from vlpipe.cache_layout import (
    SHARD_NAME,
    WRITER_ID,
    CacheBusyError,
    CacheError,
    CacheWriteError,
    check_target,
    checksum_path,
    clean_stale,
    complete_shards,
    index_state,
    index_tmp,
    lock_writer,
    missing_index_message,
    remove_cache,
    shard_dir,
    shard_path,
)
from vlpipe.io import write_text_atomic
from vlpipe.keytable import KeyTable
from vlpipe.provenance import identity_diff, identity_digest, provenance_identity, sha256_file

__all__ = [
    "CacheBusyError",
    "CacheError",
    "CacheWriteError",
    "CacheWriter",
    "FeatureCache",
    "Schema",
    "build_index",
    "checksum_path",
    "complete_shards",
    "identity_digest",
    "provenance_identity",
    "shard_dir",
]

SCHEMA_VERSION = 2  # 2: shard table with keys and identity digests
READABLE_VERSIONS = (1, 2)
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
    h5.attrs["identity_sha256"] = identity_digest(provenance)


def storable(text: str) -> str:
    """`text` if it can be stored as UTF-8, else with the undecodable bytes of a file name
    (surrogate escapes) written as backslash escapes: `caf\\xe9`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


class ShardWriter:
    """Appends rows to one shard under a temporary name; `finish` makes it visible atomically."""

    def __init__(self, final_path: Path, schema: Schema, provenance: dict, writer: str):
        self.final_path = final_path
        self.tmp_path = final_path.with_name(final_path.name + ".tmp")
        self.schema = schema
        self.n = 0
        self.n_aliases = 0
        try:
            self.h5 = h5py.File(self.tmp_path, "w")
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise
        # Datasets stay open while the shard is written: a write that fails (disk full) then
        # fails in the call that made it, not later while h5py releases a dataset object.
        self._ds: dict[str, h5py.Dataset] = {}
        try:
            self._create(provenance, writer)
        except BaseException:
            self.abort()
            raise

    def _create(self, provenance: dict, writer: str) -> None:
        _write_attrs(self.h5, self.schema, provenance)
        self.h5.attrs["writer"] = writer
        self.h5.create_dataset("keys", (0,), _STR, maxshape=(None,), chunks=(1024,))
        for name, (shape, dtype) in self.schema.fields.items():
            chunks = (_chunk_rows(shape, dtype), *shape)
            self.h5.create_dataset(
                name, (0, *shape), _h5_dtype(dtype), maxshape=(None, *shape), chunks=chunks
            )
        for name in ("failed_keys", "failed_paths", "failed_reasons", "alias_keys"):
            self.h5.create_dataset(name, (0,), _STR, maxshape=(None,), chunks=(256,))
        self.h5.create_dataset("alias_rows", (0,), np.int64, maxshape=(None,), chunks=(256,))
        self._ds = {name: self.h5[name] for name in self.h5}

    def append(self, keys: Sequence[str], arrays: dict[str, np.ndarray]) -> None:
        n, m = self.n, len(keys)
        _append(self._ds["keys"], n, list(keys))
        for name, (_, dtype) in self.schema.fields.items():
            value = arrays[name] if dtype == "str" else np.asarray(arrays[name], dtype=dtype)
            _append(self._ds[name], n, value)
        self.n += m

    def append_aliases(self, keys: Sequence[str], rows: Sequence[int]) -> None:
        _append(self._ds["alias_keys"], self.n_aliases, list(keys))
        _append(self._ds["alias_rows"], self.n_aliases, np.asarray(rows, np.int64))
        self.n_aliases += len(keys)

    def append_failure(self, key: str, path: str, reason: str) -> None:
        i = len(self._ds["failed_keys"])
        for name, value in (
            ("failed_keys", key),
            ("failed_paths", path),
            ("failed_reasons", reason),
        ):
            _append(self._ds[name], i, [storable(value)])

    @property
    def n_failures(self) -> int:
        return len(self._ds["failed_keys"])

    def finish(self) -> Path:
        self.h5.attrs["n_items"] = self.n
        self.h5.flush()
        fd = self.h5.id.get_vfd_handle()
        os.fsync(fd)
        self._ds = {}
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
        with _quiet_teardown(), contextlib.suppress(RuntimeError, OSError, ValueError):
            self._ds = {}
            if hasattr(self, "h5"):
                self.h5.close()
        self.tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_teardown():
    """Releasing the objects of a file whose writes failed makes h5py print the same I/O error
    again and again (Cython prints errors in `__dealloc__` through sys.excepthook, then
    sys.unraisablehook); the error itself was already raised, so those are dropped here."""
    hooks = sys.excepthook, sys.unraisablehook

    def excepthook(kind, value, tb) -> None:
        if not isinstance(value, RuntimeError | OSError):
            hooks[0](kind, value, tb)

    def unraisablehook(unraisable) -> None:
        if not isinstance(unraisable.exc_value, RuntimeError | OSError):
            hooks[1](unraisable)

    sys.excepthook, sys.unraisablehook = excepthook, unraisablehook
    try:
        yield
    finally:
        sys.excepthook, sys.unraisablehook = hooks


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


def keys_digest(keys: Sequence[bytes], alias_keys: Sequence[bytes], alias_rows) -> str:
    """sha256 of a shard's row keys in row order and its alias keys with their rows, as the
    index records it (utf-8 bytes as h5py reads them)."""
    digest = hashlib.sha256(b"\0".join(keys))
    digest.update(b"\1" + b"\0".join(alias_keys) + b"\1")
    digest.update(np.asarray(alias_rows, "<i8").tobytes())
    return digest.hexdigest()


def _raw(values) -> list[bytes]:
    return [v if isinstance(v, bytes) else str(v).encode() for v in values]


@dataclass
class ShardInfo:
    """What one complete shard holds besides its features."""

    path: Path
    keys: list[str]
    alias_keys: list[str]
    alias_rows: np.ndarray
    failures: list[tuple[str, str, str]]
    schema: str
    provenance: dict
    keys_sha256: str
    field_rows: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.keys)

    @property
    def identity_sha256(self) -> str:
        return identity_digest(self.provenance)


def read_shard(shard: Path) -> ShardInfo:
    """Keys, aliases, failures, schema and provenance of one complete shard."""
    try:
        with h5py.File(shard, "r") as h5:
            keys, akeys = _raw(h5["keys"][:]), _raw(h5["alias_keys"][:])
            arows = h5["alias_rows"][:]
            failures = list(
                zip(
                    _decode(h5["failed_keys"][:]),
                    _decode(h5["failed_paths"][:]),
                    _decode(h5["failed_reasons"][:]),
                    strict=True,
                )
            )
            schema, prov = h5.attrs["schema"], json.loads(h5.attrs["provenance"])
            rows = {n: len(h5[n]) for n in Schema.from_json(schema).fields}
    except (OSError, KeyError, ValueError) as err:
        raise CacheError(f"{shard}: unreadable shard ({err})") from err
    return ShardInfo(
        shard,
        _decode(keys),
        _decode(akeys),
        arows,
        failures,
        schema,
        prov,
        keys_digest(keys, akeys, arows),
        rows,
    )


def read_shard_keys(shard: Path) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """(row keys, alias keys, alias rows, failed keys) of one complete shard."""
    info = read_shard(shard)
    return info.keys, info.alias_keys, info.alias_rows, [f[0] for f in info.failures]


class CacheWriter:
    """Writes items into bounded shards of one cache; the index is built on `close`.

    writer: an id unique per concurrent writer (e.g. "r0", "r1" for torch.distributed ranks);
    each writer holds a lock of its own, so a second process with the same id is refused.
    resume: keep complete shards and skip their keys; otherwise an existing cache is an error
    unless overwrite=True. Only a vlpipe cache is ever continued or replaced.
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
        if not WRITER_ID.fullmatch(writer):
            raise ValueError(f"writer id {writer!r}: letters, digits and _ only")
        self._shard: ShardWriter | None = None
        self._lock = self._prepare(resume, overwrite)
        try:
            self.done = self._load_done() if resume else set()
            self._seq = self._next_seq()
        except BaseException:
            self._lock.release()
            raise

    def _prepare(self, resume: bool, overwrite: bool):
        """Check what is at the path, take this writer's lock, then clear what may go."""
        check_target(self.path, resume=resume, overwrite=overwrite)
        with self._write_errors("creating the shards folder"):
            shard_dir(self.path).mkdir(parents=True, exist_ok=True)
        lock = lock_writer(self.path, self.writer)
        try:
            if overwrite and not resume:
                remove_cache(self.path, keep=(lock.path,))
            clean_stale(self.path, self.writer)
        except BaseException:
            lock.release()
            raise
        return lock

    def _load_done(self) -> set[str]:
        done: set[str] = set()
        for shard in complete_shards(self.path):
            info = read_shard(shard)
            self._check_compatible(info)
            done.update(info.keys, info.alias_keys, (f[0] for f in info.failures))
        return done

    def _check_compatible(self, info: ShardInfo) -> None:
        schema = Schema.from_json(info.schema)
        if schema != self.schema:
            raise CacheError(
                f"{info.path}: written with schema {schema.to_json()}, this run writes "
                f"{self.schema.to_json()}; use a new --out or --overwrite"
            )
        diff = identity_diff(self.provenance, info.provenance)
        if diff:
            raise CacheError(
                f"{info.path}: cannot resume, the run differs (cache, now): {diff}; use a new "
                "--out, or --overwrite to replace the cache"
            )

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
            with self._write_errors(f"creating shard {name}"):
                self._shard = ShardWriter(
                    shard_dir(self.path) / name, self.schema, prov, self.writer
                )
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
        self._validate(keys, arrays, aliases or {})
        start = 0
        while start < len(keys):
            shard = self._current()
            stop = min(len(keys), start + self.shard_items - shard.n)
            part = list(keys[start:stop])
            with self._write_errors(f"writing shard {shard.final_path.name}"):
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
        """Record an item that could not be read; `storable(key)` is what lands in `done`."""
        shard = self._current()
        with self._write_errors(f"writing shard {shard.final_path.name}"):
            shard.append_failure(key, path, reason)
        self.done.add(storable(key))

    def _validate(
        self, keys: Sequence[str], arrays: dict[str, np.ndarray], aliases: dict[str, str]
    ) -> None:
        for key in (*keys, *aliases):
            if storable(key) != key:
                raise CacheError(f"{self.path}: key {key!r} is not valid UTF-8 text")
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
            with self._write_errors(f"finishing shard {self._shard.final_path.name}"):
                if self._shard.n or self._shard.n_failures:
                    self._shard.finish()
                else:
                    self._shard.abort()
            self._shard = None

    @contextlib.contextmanager
    def _write_errors(self, what: str):
        """A full disk or file-size limit surfaces from HDF5 as OSError or RuntimeError: drop the
        partial shard and say what to do; complete shards are untouched."""
        try:
            yield
        except CacheError:
            raise
        except (OSError, RuntimeError) as err:
            self.abort()
            raise CacheWriteError(write_error_message(self.path, what, err)) from err

    def close(self) -> None:
        try:
            self.flush()
            if self.build_index_on_close:
                build_index(self.path)
        finally:
            self._lock.release()

    def abort(self) -> None:
        """Drop the partial shard; complete shards stay for --resume."""
        shard, self._shard = self._shard, None
        if shard is not None:
            shard.abort()
        if hasattr(self, "_lock"):
            self._lock.release()

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_error_message(path: Path, what: str, err: BaseException) -> str:
    return (
        f"{path}: {what} failed ({describe_os_error(err)}); the complete shards are intact: fix "
        "the cause (disk space?) and rerun the same command with --resume"
    )


_HDF5_ERRNO = re.compile(r"errno = (\d+), error message = '([^']*)'")


def describe_os_error(err: BaseException) -> str:
    """One line for an I/O error: the OS's words when known (HDF5 buries them in a long
    multi-line report), else the error's own first 200 characters."""
    found = _HDF5_ERRNO.search(str(err))
    if found:
        return f"{found.group(2)}, errno {found.group(1)}"
    if isinstance(err, OSError) and err.strerror:
        return " ".join(err.strerror.split())[:200]
    return " ".join(str(err).split())[:200]


def build_index(path: str | Path) -> dict:
    """Tie every complete shard beside `path` into the index file, atomically. Returns a summary.
    All shards must share one schema and one provenance identity, and no key may repeat."""
    path = Path(path)
    shards = complete_shards(path)
    if not shards:
        raise CacheError(f"{path}: no complete shards in {shard_dir(path)}")
    if index_state(path) == "foreign":
        raise CacheError(f"{path} exists and is not a vlpipe index; it is not replaced")
    infos = [read_shard(s) for s in shards]
    for info in infos[1:]:
        _check_same_run(path, infos[0], info)
    table = index_tables(infos)
    _check_unique(path, table["keys"], shards)
    tmp = index_tmp(path)
    try:
        _write_index(tmp, path, infos, table)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CacheWriteError(write_error_message(path, "writing the index", err)) from err
    return {
        "rows": int(table["offsets"][-1]),
        "keys": len(table["keys"]),
        "failures": len(table["failures"]),
        "shards": len(infos),
    }


def _check_same_run(path: Path, first: ShardInfo, info: ShardInfo) -> None:
    hint = f"run `vlpipe verify --repair {path}` to move shards that do not belong aside"
    if info.schema != first.schema:
        raise CacheError(f"{info.path}: schema differs from {first.path.name}'s; {hint}")
    diff = identity_diff(first.provenance, info.provenance)
    if diff:
        raise CacheError(
            f"{info.path}: from another run than {first.path.name} (differs: {diff}); {hint}"
        )


def index_tables(infos: Sequence[ShardInfo]) -> dict:
    """The key table (row keys, then alias keys) and row offsets an index holds for `infos`."""
    rows_keys, alias_keys, alias_rows, failures = [], [], [], []
    offsets = [0]
    for info in infos:
        rows_keys += info.keys
        alias_keys += info.alias_keys
        alias_rows += [offsets[-1] + int(r) for r in info.alias_rows]
        failures += info.failures
        offsets.append(offsets[-1] + info.rows)
    n = offsets[-1]
    key_rows = np.concatenate([np.arange(n), np.asarray(alias_rows, np.int64)]).astype(np.int64)
    return {
        "keys": rows_keys + alias_keys,
        "key_rows": key_rows,
        "failures": failures,
        "offsets": np.asarray(offsets, np.int64),
    }


def _write_index(tmp: Path, path: Path, infos: Sequence[ShardInfo], table: dict) -> None:
    prov = {k: v for k, v in infos[0].provenance.items() if k != "shard"}
    names = [i.path.name for i in infos]
    with h5py.File(tmp, "w") as h5:
        h5.attrs["schema_version"] = SCHEMA_VERSION
        h5.attrs["kind"] = Schema.from_json(infos[0].schema).kind
        h5.attrs["schema"] = infos[0].schema
        h5.attrs["provenance"] = json.dumps(prov, sort_keys=True)
        h5.attrs["identity"] = json.dumps(provenance_identity(prov), sort_keys=True)
        h5.attrs["identity_sha256"] = identity_digest(prov)
        h5.attrs["n_rows"] = int(table["offsets"][-1])
        h5.attrs["n_keys"] = len(table["keys"])
        h5.attrs["n_failures"] = len(table["failures"])
        h5["shard_files"] = _strings(names)
        h5["shard_rows"] = np.array([i.rows for i in infos], np.int64)
        h5["shard_bytes"] = np.array([i.path.stat().st_size for i in infos], np.int64)
        h5["shard_sha256"] = _strings([shard_checksum(i.path) for i in infos])
        h5["shard_keys_sha256"] = _strings([i.keys_sha256 for i in infos])
        h5["shard_identity_sha256"] = _strings([i.identity_sha256 for i in infos])
        h5.create_dataset("keys", data=np.array(table["keys"], dtype=object), dtype=_STR)
        h5["key_rows"] = table["key_rows"]
        failures = np.array(table["failures"] or np.empty((0, 3)), dtype=object)
        h5.create_dataset("failures", data=failures, dtype=_STR)
        links = h5.create_group("shards")
        for name in names:
            links[name] = h5py.ExternalLink(f"{shard_dir(path).name}/{name}", "/")
        h5.flush()
        os.fsync(h5.id.get_vfd_handle())


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=object).astype(_STR)


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


CHECKS = ("none", "light", "full")


@dataclass(frozen=True)
class ShardRecord:
    """One row of the index's shard table (the two digests are None in schema v1 indexes)."""

    name: str
    rows: int
    bytes: int
    sha256: str
    keys_sha256: str | None
    identity_sha256: str | None


def check_links(h5: h5py.File, where: Path, *, index: bool) -> None:
    """Refuse objects that pull data from other files: soft and external links (except the
    index's /shards/<name> links into the cache's own folder), external raw storage and
    virtual datasets. Only top-level objects are read by vlpipe, so only they are checked."""
    for name in h5:
        link = h5.get(name, getlink=True)
        if not isinstance(link, h5py.HardLink):
            target = getattr(link, "filename", "") + ":" + getattr(link, "path", "")
            raise CacheError(
                f"{where}: /{name} is a {type(link).__name__} to {target}; a vlpipe file holds "
                "its data itself, so it is not read"
            )
        obj = h5[name]
        if index and name == "shards" and isinstance(obj, h5py.Group):
            _check_shard_links(obj, where)
        elif isinstance(obj, h5py.Dataset) and (obj.is_virtual or obj.external):
            raise CacheError(
                f"{where}: dataset /{name} keeps its data in other files (external or virtual "
                "storage); a vlpipe file holds its data itself, so it is not read"
            )


def _check_shard_links(group: h5py.Group, index: Path) -> None:
    for member in group:
        link = group.get(member, getlink=True)
        expected = f"{shard_dir(index).name}/{member}"
        if not (
            isinstance(link, h5py.ExternalLink)
            and link.filename == expected
            and link.path == "/"
            and SHARD_NAME.fullmatch(member)
        ):
            target = getattr(link, "filename", type(link).__name__)
            raise CacheError(
                f"{index}: /shards/{member} links to {target}, not to {expected}; the index is "
                f"damaged or crafted: run `vlpipe verify --repair {index}`"
            )


class FeatureCache:
    """Random access to a cache by key or by row, safe to hand to DataLoader workers.

    Only the index (keys and row numbers) is held in memory; features are read on demand. HDF5
    handles are opened lazily and re-opened after a fork, so no handle crosses a process boundary.

    check: what is verified when a shard is first opened in a process: "light" (default) its
    size, rows, schema, provenance identity and keys against the index's record (cost measured
    in docs/benchmarks.md), "full" also its sha256 (reads the whole shard once), "none"
    nothing. Always: every shard the index names lies inside `<cache>.shards/`, and neither the
    index nor a shard pulls data from other files.
    """

    def __init__(self, path: str | Path, *, check: str = "light"):
        if check not in CHECKS:
            raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
        self.path, self.check = Path(path), check
        if self.path.is_dir():
            raise CacheError(f"{self.path} is a directory, not a cache index file")
        if not self.path.exists():
            raise CacheError(missing_index_message(self.path))
        try:
            with h5py.File(self.path, "r") as h5:
                self._load_index(h5)
        except OSError as err:
            raise CacheError(
                f"{self.path}: not a readable cache index ({err}); `vlpipe verify --repair "
                f"{self.path}` rebuilds it from its shards"
            ) from err
        except KeyError as err:
            raise CacheError(f"{self.path}: the index lacks {err}; it is damaged") from err
        self._starts = np.concatenate([[0], np.cumsum([r.rows for r in self.shard_table])])
        self._starts = self._starts.astype(np.int64)
        self._check_tables()
        self._handles: dict[int, h5py.File] = {}
        # Dataset objects kept open: re-opening one per read throws HDF5's chunk cache away.
        self._datasets: dict[tuple[int, str], h5py.Dataset] = {}
        self._checked: set[int] = set()
        self._pid = os.getpid()

    def _load_index(self, h5: h5py.File) -> None:
        if not all(a in h5.attrs for a in ("schema_version", "schema", "provenance")):
            raise CacheError(f"{self.path}: not a vlpipe cache (no vlpipe schema attributes)")
        self.schema_version = int(h5.attrs["schema_version"])
        if self.schema_version > SCHEMA_VERSION:
            raise CacheError(
                f"{self.path}: schema version {self.schema_version} is newer than this "
                f"vlpipe ({SCHEMA_VERSION}); upgrade vlpipe"
            )
        check_links(h5, self.path, index=True)
        self.schema = Schema.from_json(h5.attrs["schema"])
        self._schema_json = str(h5.attrs["schema"])
        self.provenance = json.loads(h5.attrs["provenance"])
        self.identity = provenance_identity(self.provenance)
        self.identity_sha256 = identity_digest(self.provenance)
        names = _decode(h5["shard_files"][:])
        self._paths = [shard_path(self.path, n) for n in names]

        def column(name: str) -> list:
            return _decode(h5[name][:]) if name in h5 else [None] * len(names)

        self.shard_table = [
            ShardRecord(*row)
            for row in zip(
                names,
                h5["shard_rows"][:].tolist(),
                h5["shard_bytes"][:].tolist(),
                column("shard_sha256"),
                column("shard_keys_sha256"),
                column("shard_identity_sha256"),
                strict=True,
            )
        ]
        # keys as utf-8 bytes in one buffer: memory follows their total length (vlpipe.keytable)
        self._table = KeyTable(_raw(h5["keys"][:]))
        self._key_rows = h5["key_rows"][:].astype(np.int64)
        self.failures = [tuple(_decode(r)) for r in h5["failures"][:]]

    def _check_tables(self) -> None:
        rows = self._key_rows
        if len(rows) != len(self._table) or (
            len(rows) and (rows.min() < 0 or rows.max() >= self.num_rows)
        ):
            raise CacheError(
                f"{self.path}: the key table does not fit the shard table (damaged index); "
                f"run `vlpipe verify --repair {self.path}`"
            )

    @property
    def kind(self) -> str:
        return self.schema.kind

    @property
    def fields(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return self.schema.fields

    @property
    def shard_files(self) -> list[str]:
        return [r.name for r in self.shard_table]

    @property
    def num_rows(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        return len(self._table)

    def keys(self) -> list[str]:
        return self._table.keys()

    def index_entries(self) -> tuple[list[str], np.ndarray]:
        """The key table as the index stores it: keys and their rows (for `vlpipe verify`)."""
        return self._table.keys(), self._key_rows.copy()

    def __contains__(self, key: str) -> bool:
        return bool(self._table.find([key])[0] >= 0)

    def contains(self, keys: Sequence[str]) -> np.ndarray:
        """Vectorised `key in cache` for many keys (bool array)."""
        return self._table.find(keys) >= 0

    def rows_of(self, keys: Sequence[str]) -> np.ndarray:
        """Row number of each key; KeyError names the first missing one."""
        pos = self._table.find(keys)
        if np.any(pos < 0):
            raise KeyError(f"{self.path}: key {keys[int(np.argmin(pos))]!r} is not in the cache")
        return self._key_rows[pos]

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # forked: never touch the parent's handles
            self._handles, self._datasets, self._pid = {}, {}, os.getpid()
        h5 = self._handles.get(shard)
        if h5 is None:
            name = self._paths[shard]
            try:
                h5 = h5py.File(name, "r")
            except OSError as err:
                raise CacheError(f"{name}: cannot open shard ({err})") from err
            try:
                self._check_shard(shard, h5)
            except BaseException:
                h5.close()
                raise
            self._handles[shard] = h5
        return h5

    def _check_shard(self, i: int, h5: h5py.File) -> None:
        path, rec = self._paths[i], self.shard_table[i]
        check_links(h5, path, index=False)
        if self.check == "none" or i in self._checked:
            return
        try:
            problems = self._shard_problems(rec, path, h5)
        except (KeyError, ValueError, OSError) as err:
            problems = [f"unreadable ({err})"]
        if problems:
            raise CacheError(
                f"{path}: does not match the index {self.path}: {'; '.join(problems)}; run "
                f"`vlpipe verify {self.path}`"
            )
        self._checked.add(i)

    def _shard_problems(self, rec: ShardRecord, path: Path, h5: h5py.File) -> list[str]:
        problems = []
        size = path.stat().st_size
        if size != rec.bytes:
            problems.append(f"{size} bytes, the index recorded {rec.bytes}")
        if len(h5["keys"]) != rec.rows:
            problems.append(f"{len(h5['keys'])} rows, the index recorded {rec.rows}")
        if str(h5.attrs["schema"]) != self._schema_json:
            problems.append("another schema")
        if identity_digest(json.loads(h5.attrs["provenance"])) != (
            rec.identity_sha256 or self.identity_sha256
        ):
            problems.append("another provenance identity (a shard of another run?)")
        if rec.keys_sha256 is not None and rec.keys_sha256 != keys_digest(
            _raw(h5["keys"][:]), _raw(h5["alias_keys"][:]), h5["alias_rows"][:]
        ):
            problems.append("other keys than the index recorded")
        if self.check == "full" and sha256_file(path) != rec.sha256:
            problems.append("its sha256 differs from the index's record")
        return problems

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
            "schema_version": self.schema_version,
            "items": len(self),
            "rows": self.num_rows,
            "shards": len(self.shard_table),
            "failures": len(self.failures),
            "fields": {n: {"shape": list(s), "dtype": d} for n, (s, d) in self.fields.items()},
            "sample_keys": [self._table.key(i) for i in range(min(n_samples, len(self)))],
            "failed": [
                dict(zip(("key", "path", "reason"), f, strict=True))
                for f in self.failures[:n_samples]
            ],
            "identity_sha256": self.identity_sha256,
            "provenance": self.provenance,
        }
