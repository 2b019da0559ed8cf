"""The vlpipe feature cache: one schema, one writer, one reader. Import everything from here;
the parts live in `cache_format` (version, field table, Schema, what a shard holds),
`cache_layout` (file names, what vlpipe may replace, locks, links), `cache_reader`
(`FeatureCache`) and this module (the writer and the index).

Layout on disk (``cache.h5`` is the only path users pass around)::

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
import json
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from vlpipe.cache_format import (
    FEATURE_DTYPES,
    FIELDS,
    KINDS,
    REGION_FIELDS,
    SCHEMA_VERSION,
    STR,
    Schema,
    ShardInfo,
    index_tables,
    read_shard,
    read_shard_keys,
    region_shapes,
    shard_checksum,
    storable,
)
from vlpipe.cache_layout import (
    WRITER_ID,
    CacheBusyError,
    CacheError,
    CacheWriteError,
    check_links,
    check_replaceable,
    check_target,
    checksum_path,
    clean_stale,
    complete_shards,
    index_tmp,
    lock_writer,
    remove_cache,
    shard_dir,
)
from vlpipe.cache_reader import FeatureCache, ShardRecord
from vlpipe.io import atomic_write, describe_os_error, publish, quiet_teardown, write_text_atomic
from vlpipe.provenance import (
    describe_diff,
    identity_diff,
    identity_digest,
    provenance_identity,
    sha256_file,
)

# The public names of the cache, wherever they are defined.
__all__ = [
    "FEATURE_DTYPES",
    "FIELDS",
    "KINDS",
    "REGION_FIELDS",
    "SCHEMA_VERSION",
    "CacheBusyError",
    "CacheError",
    "CacheWriteError",
    "CacheWriter",
    "FeatureCache",
    "Schema",
    "ShardInfo",
    "ShardRecord",
    "build_index",
    "check_links",
    "checksum_path",
    "complete_shards",
    "identity_digest",
    "index_tables",
    "provenance_identity",
    "read_shard",
    "read_shard_keys",
    "region_shapes",
    "shard_dir",
    "storable",
]


def _h5_dtype(dtype: str):
    return STR if dtype == "str" else np.dtype(dtype)


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
        self.h5.create_dataset("keys", (0,), STR, maxshape=(None,), chunks=(1024,))
        for name, (shape, dtype) in self.schema.fields.items():
            chunks = (_chunk_rows(shape, dtype), *shape)
            self.h5.create_dataset(
                name, (0, *shape), _h5_dtype(dtype), maxshape=(None, *shape), chunks=chunks
            )
        for name in ("failed_keys", "failed_paths", "failed_reasons", "alias_keys"):
            self.h5.create_dataset(name, (0,), STR, maxshape=(None,), chunks=(256,))
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
        self._ds = {}
        self.h5.close()
        # The checksum sits beside the shard (a file cannot hold its own hash); `vlpipe verify`
        # compares it with the bytes on disk. It is written before the rename, so every
        # visible shard has one.
        write_text_atomic(checksum_path(self.final_path), sha256_file(self.tmp_path))
        publish(self.tmp_path, self.final_path)
        return self.final_path

    def abort(self) -> None:
        """Throw the partial shard away (after a crash-like error the file may not close)."""
        with quiet_teardown(), contextlib.suppress(RuntimeError, OSError, ValueError):
            self._ds = {}
            if hasattr(self, "h5"):
                self.h5.close()
        self.tmp_path.unlink(missing_ok=True)


def _append(ds: h5py.Dataset, start: int, values) -> None:
    if len(values) == 0:
        return
    ds.resize(start + len(values), axis=0)
    ds[start : start + len(values)] = values


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
                f"{info.path}: cannot resume, the run differs (cache -> now): "
                f"{describe_diff(diff)}; use a new --out, or --overwrite to replace the cache"
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


RESUME = "rerun the same command with --resume"


def write_error_message(path: Path, what: str, err: BaseException, then: str = RESUME) -> str:
    return (
        f"{path}: {what} failed ({describe_os_error(err)}); the complete shards are intact: fix "
        f"the cause (disk space?) and {then}"
    )


def build_index(path: str | Path, *, then: str = RESUME) -> dict:
    """Tie every complete shard beside `path` into the index file, atomically. Returns a summary.
    All shards must share one schema and one provenance identity, and no key may repeat.
    `then`: what the message of a write error tells the user to do."""
    path = Path(path)
    shards = complete_shards(path)
    if not shards:
        raise CacheError(f"{path}: no complete shards in {shard_dir(path)}")
    check_replaceable(path)
    infos = [read_shard(s) for s in shards]
    for info in infos[1:]:
        _check_same_run(path, infos[0], info)
    table = index_tables(infos)
    _check_unique(path, table["keys"], shards)
    try:
        with atomic_write(path, tmp=index_tmp(path)) as tmp:
            _write_index(tmp, path, infos, table)
    except (OSError, RuntimeError) as err:
        raise CacheWriteError(write_error_message(path, "writing the index", err, then)) from err
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
        h5.create_dataset("keys", data=np.array(table["keys"], dtype=object), dtype=STR)
        h5["key_rows"] = table["key_rows"]
        failures = np.array(table["failures"] or np.empty((0, 3)), dtype=object)
        h5.create_dataset("failures", data=failures, dtype=STR)
        links = h5.create_group("shards")
        for name in names:
            links[name] = h5py.ExternalLink(f"{shard_dir(path).name}/{name}", "/")


def _strings(values: Sequence[str]) -> np.ndarray:
    return np.array(list(values), dtype=object).astype(STR)


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
