"""`vlpipe verify`: check every shard of a cache against its recorded checksum and counts, and
rebuild a lost or damaged index from the shards (`--repair`).

A shard that fails its checksum or cannot be read is moved aside as `<name>.corrupt` by
`--repair`, so its items disappear from the index and `vlpipe extract --resume` re-extracts
exactly them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import h5py

from vlpipe.cache import (
    CacheError,
    FeatureCache,
    build_index,
    checksum_path,
    complete_shards,
    read_shard_keys,
    shard_dir,
)
from vlpipe.provenance import sha256_file


@dataclass
class Report:
    path: str
    shards: int = 0
    items: int = 0
    problems: list[str] = field(default_factory=list)
    corrupt: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_shard(shard: Path) -> list[str]:
    """Problems of one shard file: checksum, readability, field lengths."""
    side = checksum_path(shard)
    if not side.exists():
        return [f"{shard.name}: no recorded checksum ({side.name} missing)"]
    if sha256_file(shard, cached=False) != side.read_text().strip():
        return [f"{shard.name}: checksum mismatch (file changed or truncated)"]
    try:
        with h5py.File(shard, "r") as h5:
            n = len(h5["keys"])
            bad = [
                name
                for name in h5
                if name not in ("keys",)
                and not name.startswith(("failed_", "alias_"))
                and len(h5[name]) != n
            ]
            if int(h5.attrs.get("n_items", n)) != n:
                bad.append(f"n_items attribute {h5.attrs['n_items']} != {n} keys")
    except (OSError, KeyError) as err:
        return [f"{shard.name}: unreadable ({err})"]
    return [f"{shard.name}: field {b} has a different row count" for b in bad]


def verify(path: str | Path) -> Report:
    path = Path(path)
    report = Report(str(path))
    shards = complete_shards(path)
    report.shards = len(shards)
    for shard in shards:
        problems = check_shard(shard)
        report.problems += problems
        if problems:
            report.corrupt.append(shard)
    report.problems += _check_index(path, [s for s in shards if s not in report.corrupt], report)
    return report


def _check_index(path: Path, good: list[Path], report: Report) -> list[str]:
    if not path.exists():
        return [f"{path}: index missing (run `vlpipe verify --repair {path}`)"]
    try:
        cache = FeatureCache(path)
    except (OSError, KeyError, CacheError) as err:
        return [f"{path}: index unreadable ({err}); run `vlpipe verify --repair {path}`"]
    report.items = len(cache)
    problems = []
    listed = set(cache.shard_files)
    on_disk = {s.name for s in complete_shards(path)}
    problems += [f"{n}: in the index but missing on disk" for n in sorted(listed - on_disk)]
    problems += [f"{n}: on disk but not in the index" for n in sorted(on_disk - listed)]
    keys = [k for s in good for k in read_shard_keys(s)[0]]
    if len(keys) != len(set(keys)):
        problems.append("duplicate keys across shards")
    if listed == on_disk and cache.num_rows != len(keys) and not report.corrupt:
        problems.append(f"index counts {cache.num_rows} rows, the shards hold {len(keys)}")
    return problems


def repair(path: str | Path) -> tuple[Report, dict]:
    """Move corrupt shards aside and rebuild the index from the intact ones."""
    report = verify(path)
    for shard in report.corrupt:
        shard.rename(shard.with_name(shard.name + ".corrupt"))
        checksum_path(shard).unlink(missing_ok=True)
    if not complete_shards(path):
        raise CacheError(f"{path}: no intact shard left in {shard_dir(path)}")
    return report, build_index(path)
