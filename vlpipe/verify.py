"""`vlpipe verify`: check every shard of a cache against its checksum file and against what the
index recorded of it; `--repair` moves aside what does not belong and rebuilds the index.

Per shard on disk: its checksum file matches its bytes, it opens, every field has one row per
key, it pulls no data from other files, it lies inside the shards folder. Against the index:
every shard of the shard table exists with the sha256, rows, keys digest and provenance
identity recorded there (schema v1 indexes recorded no digests: their shards are compared with
the index's key table and provenance instead), the key -> row table is exactly the one the
shards define, and no key is in two shards.

`--repair` never deletes and never adopts a shard that does not belong. It moves aside
  <name>.corrupt    a shard that fails its checksum or cannot be read
  <name>.foreign    another schema or provenance identity than the cache (other run, split...)
  <name>.duplicate  a shard holding keys that a shard kept before it holds (a copy)
(checksum files go with them) and rebuilds the index from the rest, so `vlpipe extract
--resume` re-extracts exactly the items that went. Which identity is the cache's: the index's,
when an intact shard has it; else the one most shards share.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from vlpipe.cache import (
    CacheError,
    FeatureCache,
    Schema,
    ShardInfo,
    build_index,
    check_links,
    checksum_path,
    complete_shards,
    index_tables,
    read_shard,
    shard_dir,
)
from vlpipe.cache_layout import all_locks
from vlpipe.provenance import identity_diff, sha256_file


@dataclass
class Report:
    path: str
    shards: int = 0
    items: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be checked, and why
    corrupt: list[Path] = field(default_factory=list)
    foreign: dict[Path, str] = field(default_factory=dict)  # shard -> why it does not belong
    duplicate: dict[Path, str] = field(default_factory=dict)
    ambiguous: str | None = None  # no way to tell which shards are the cache's
    moved: list[tuple[Path, Path]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def report_dict(report: Report) -> dict:
    """The report as JSON values (`vlpipe verify --json`)."""
    return {
        "path": report.path,
        "ok": report.ok,
        "shards": report.shards,
        "items": report.items,
        "problems": report.problems,
        "notes": report.notes,
        "moved": [[str(old), str(new)] for old, new in report.moved],
    }


@dataclass
class _Shard:
    """One shard on disk as verify sees it: its info (None unless intact) and sha256."""

    path: Path
    info: ShardInfo | None = None
    sha256: str | None = None
    outside: bool = False  # a link to a file outside the shards folder

    @property
    def key(self) -> tuple[str, str]:
        assert self.info is not None
        return Schema.from_json(self.info.schema).to_json(), self.info.identity_sha256


def check_shard(shard: Path) -> tuple[list[str], _Shard]:
    """Problems of one shard file on its own: location, checksum, readability, row counts."""
    found = _Shard(shard)
    real = os.path.realpath(shard)
    if os.path.dirname(real) != os.path.realpath(shard.parent):
        found.outside = True
        return [f"{shard.name}: a link to {real}, outside the shards folder"], found
    side = checksum_path(shard)
    if not side.exists():
        return [f"{shard.name}: no recorded checksum ({side.name} missing)"], found
    found.sha256 = sha256_file(shard, cached=False)
    if found.sha256 != side.read_text().strip():
        return [f"{shard.name}: checksum mismatch (file changed or truncated)"], found
    try:
        info = read_shard(shard)
        with h5py.File(shard, "r") as h5:
            check_links(h5, shard, index=False)
            n_items = int(h5.attrs.get("n_items", info.rows))
    except (CacheError, OSError) as err:
        return [f"{shard.name}: unreadable ({err})"], found
    bad = [
        f"field {n} has a different row count" for n, r in info.field_rows.items() if r != info.rows
    ]
    if n_items != info.rows:
        bad.append(f"n_items attribute {n_items} != {info.rows} keys")
    rows = np.asarray(info.alias_rows)
    if len(info.alias_keys) != len(rows) or (
        len(rows) and (rows.min() < 0 or rows.max() >= info.rows)
    ):
        bad.append("alias rows do not fit its rows")
    found.info = None if bad else info
    return [f"{shard.name}: {b}" for b in bad], found


def verify(path: str | Path) -> Report:
    path = Path(path)
    report = Report(str(path))
    on_disk: dict[str, _Shard] = {}
    for shard in complete_shards(path):
        problems, found = check_shard(shard)
        report.problems += problems
        on_disk[shard.name] = found
        if found.outside:
            report.foreign[shard] = "a link to a file outside the shards folder"
        elif found.info is None:
            report.corrupt.append(shard)
    report.shards = len(on_disk)
    cache = _open_index(path, report)
    listed = cache.shard_files if cache else []
    readable = {n: s for n, s in on_disk.items() if s.info is not None}
    ref = _reference(cache, listed, readable, report)
    if ref is not None:
        _classify(listed, readable, ref, report)
    if cache is not None:
        _check_against_index(cache, on_disk, report)
    return report


def _open_index(path: Path, report: Report) -> FeatureCache | None:
    if not path.exists():
        report.problems.append(f"{path}: index missing (run `vlpipe verify --repair {path}`)")
        return None
    try:
        cache = FeatureCache(path, check="none")
    except (OSError, KeyError, ValueError, CacheError) as err:
        report.problems.append(
            f"{path}: index unreadable ({err}); run `vlpipe verify --repair {path}`"
        )
        return None
    report.items = len(cache)
    if cache.schema_version < 2:
        report.notes.append(
            f"{path}: a schema v{cache.schema_version} index records no keys or provenance "
            "digest per shard; its shards were compared with its sha256 and row records, its "
            "key table and its provenance instead"
        )
    return cache


def _reference(
    cache: FeatureCache | None, listed: list[str], readable: dict[str, _Shard], report: Report
) -> tuple[tuple[str, str], dict] | None:
    """(schema, identity digest) of the cache and a provenance that has it."""
    if cache is not None:
        ref = (cache.schema.to_json(), cache.identity_sha256)
        if any(readable[n].key == ref for n in listed if n in readable):
            return ref, cache.provenance
    counts = Counter(s.key for s in readable.values())
    if not counts:
        return None
    (top, n), *rest = counts.most_common()
    if rest and rest[0][1] == n:
        report.ambiguous = (
            f"{shard_dir(report.path)}: {n} shards of one run and {n} of another, and no "
            "intact index says which is this cache: move the shards that are not this cache's "
            "out of the folder"
        )
        report.problems.append(report.ambiguous)
        return None
    return top, next(s.info.provenance for s in readable.values() if s.key == top)


def _classify(
    listed: list[str],
    readable: dict[str, _Shard],
    ref: tuple[tuple[str, str], dict],
    report: Report,
) -> None:
    """Which readable shards belong: the reference's schema and identity, keys of their own.
    Shards the index lists come first, so a copy loses to its original."""
    (key, prov), owner = ref, {}
    order = [n for n in listed if n in readable] + sorted(n for n in readable if n not in listed)
    for name in order:
        shard = readable[name]
        info = shard.info
        assert info is not None
        if shard.key != key:
            diff = identity_diff(prov, info.provenance) or "its schema"
            report.foreign[shard.path] = f"another run or dataset (differs: {diff})"
            report.problems.append(f"{name}: does not belong to this cache: {diff}")
            continue
        keys = [*info.keys, *info.alias_keys]
        clash = next((k for k in keys if k in owner), None)
        if clash is not None:
            why = f"holds keys of {owner[clash]} (e.g. {clash!r})"
            report.duplicate[shard.path] = why
            report.problems.append(f"{name}: a duplicate: it {why}")
            continue
        owner.update(dict.fromkeys(keys, name))


def _check_against_index(cache: FeatureCache, on_disk: dict[str, _Shard], report: Report) -> None:
    """Each shard against the index's record of it, and the key table against the shards."""
    index = cache.path
    for rec in cache.shard_table:
        shard = on_disk.get(rec.name)
        if shard is None:
            report.problems.append(f"{rec.name}: in the index but missing on disk")
            continue
        if shard.info is None:
            continue  # already reported
        report.problems += [f"{rec.name}: {p}" for p in _record_problems(cache, rec, shard)]
    extra = sorted(set(on_disk) - set(cache.shard_files))
    report.problems += [f"{n}: on disk but not in the index" for n in extra]
    listed = [on_disk.get(n) for n in cache.shard_files]
    if all(s is not None and s.info is not None for s in listed):
        report.problems += _table_problems(cache, [s.info for s in listed])  # type: ignore[union-attr]
    else:
        report.notes.append(f"{index}: key table not compared (shards of the index are missing)")


def _record_problems(cache: FeatureCache, rec, shard: _Shard) -> list[str]:
    info = shard.info
    assert info is not None
    problems = []
    if shard.sha256 != rec.sha256:
        problems.append(
            "its sha256 is not the one the index recorded (the file was replaced, swapped or "
            "edited, with its checksum file)"
        )
    if info.rows != rec.rows:
        problems.append(f"{info.rows} rows, the index recorded {rec.rows}")
    if rec.keys_sha256 is not None and info.keys_sha256 != rec.keys_sha256:
        problems.append("its keys are not the ones the index recorded")
    if info.identity_sha256 != (rec.identity_sha256 or cache.identity_sha256):
        diff = identity_diff(cache.provenance, info.provenance)
        problems.append(f"its provenance identity is not the index's (differs: {diff})")
    if Schema.from_json(info.schema) != cache.schema:
        problems.append("its schema is not the index's")
    return problems


def _table_problems(cache: FeatureCache, infos: list[ShardInfo]) -> list[str]:
    expected = index_tables(infos)
    keys, rows = cache.index_entries()
    problems = []
    if keys != expected["keys"] or not np.array_equal(rows, expected["key_rows"]):
        want = dict(zip(expected["keys"], expected["key_rows"].tolist(), strict=True))
        have = dict(zip(keys, rows.tolist(), strict=True))
        wrong = [k for k in want if have.get(k) != want[k]] + [k for k in have if k not in want]
        example = wrong[0] if wrong else keys[0]
        problems.append(
            f"{cache.path}: the key -> row table is not the one its shards define "
            f"({len(wrong) or 'order of'} keys differ, e.g. {example!r}: index row "
            f"{have.get(example)}, shards row {want.get(example)}); the reader would return "
            "wrong items"
        )
    if cache.num_rows != int(expected["offsets"][-1]):
        problems.append(
            f"{cache.path}: index counts {cache.num_rows} rows, the shards hold "
            f"{int(expected['offsets'][-1])}"
        )
    if sorted(cache.failures) != sorted(tuple(f) for f in expected["failures"]):
        problems.append(f"{cache.path}: the failure table is not the one its shards hold")
    return problems


def move_aside(shard: Path, why: str) -> Path:
    """Rename `shard` (and its checksum file) to `<name>.<why>[.N]` in the same folder."""
    target, n = shard.with_name(f"{shard.name}.{why}"), 0
    while target.exists() or checksum_path(target).exists():
        n += 1
        target = shard.with_name(f"{shard.name}.{why}.{n}")
    shard.rename(target)
    if checksum_path(shard).exists():
        checksum_path(shard).rename(checksum_path(target))
    return target


def repair(path: str | Path, report: Report | None = None) -> tuple[Report, dict]:
    """Move aside the shards that are corrupt, foreign or duplicates, and rebuild the index
    from the others. Refused while an extraction writes the cache (it holds a lock)."""
    path = Path(path)
    report = report or verify(path)
    if report.ambiguous:
        raise CacheError(report.ambiguous)
    with all_locks(path):
        for shards, why in (
            (report.corrupt, "corrupt"),
            (list(report.foreign), "foreign"),
            (list(report.duplicate), "duplicate"),
        ):
            for shard in shards:
                report.moved.append((shard, move_aside(shard, why)))
        if not complete_shards(path):
            raise CacheError(f"{path}: no intact shard left in {shard_dir(path)}")
        return report, build_index(path, then=f"rerun `vlpipe verify --repair {path}`")
