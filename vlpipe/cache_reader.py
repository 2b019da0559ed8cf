"""`FeatureCache`: random access to a vlpipe cache by key or by row, with the index in memory
and features read on demand; the integrity checks it makes when it opens a shard."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from vlpipe.cache_format import SCHEMA_VERSION, Schema, decode, keys_digest, raw
from vlpipe.cache_layout import CacheError, check_links, missing_index_message, shard_path
from vlpipe.keytable import KeyTable
from vlpipe.provenance import identity_digest, provenance_identity, sha256_file

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
        names = decode(h5["shard_files"][:])
        self._paths = [shard_path(self.path, n) for n in names]

        def column(name: str) -> list:
            return decode(h5[name][:]) if name in h5 else [None] * len(names)

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
        self._table = KeyTable(raw(h5["keys"][:]))
        self._key_rows = h5["key_rows"][:].astype(np.int64)
        self.failures = [tuple(decode(r)) for r in h5["failures"][:]]

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
            raw(h5["keys"][:]), raw(h5["alias_keys"][:]), h5["alias_rows"][:]
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
                out[f][sel] = data[inverse] if f != "text" else np.array(decode(data))[inverse]
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
