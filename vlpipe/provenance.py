"""Provenance: what made a cache, recorded in every shard so features never lose their origin."""

from __future__ import annotations

import hashlib
import json
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RANDOM_INIT = "random-init"
_HASH_CACHE: dict[tuple[str, int, int], str] = {}

# The provenance fields that define what the features are. Two caches (or two shards of one)
# with the same identity hold interchangeable features; everything else in provenance (time,
# host, package versions, dataset root, shard name) is incidental. A field a cache lacks counts
# as None. The seed defines the features only for random-init weights.
IDENTITY_FIELDS = (
    "backbone",
    "model",
    "weights_sha256",
    "seed",
    "preprocessing",
    "dtype",
    "precision",
    "dataset",
    "split",
    "box_policy",
    "box_convention",
    "impl",
    "source_format",  # `vlpipe import`: the file format, key rule and box count it read
    "key_rule",
    "img_id_format",
    "max_boxes",
)


def provenance_identity(provenance: dict) -> dict:
    """The identity part of a cache's provenance (see IDENTITY_FIELDS), JSON-normalised."""
    identity = json.loads(json.dumps({n: provenance.get(n) for n in IDENTITY_FIELDS}, default=str))
    if identity["weights_sha256"] != RANDOM_INIT:
        identity["seed"] = None
    prep = identity.get("preprocessing")
    if isinstance(prep, dict) and "vocab_sha256" in prep:  # the vocab's content, not its path
        prep.pop("vocab", None)
    return json.loads(json.dumps(identity, sort_keys=True))


def identity_digest(provenance: dict) -> str:
    """sha256 of `provenance_identity(provenance)`: equal digests, interchangeable features."""
    text = json.dumps(provenance_identity(provenance), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def describe_diff(diff: dict[str, tuple], limit: int = 6) -> str:
    """`identity_diff` as "field.sub: theirs -> ours; ...", down to the leaves that differ."""
    leaves: list[str] = []

    def walk(path: str, a: Any, b: Any) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(a.keys() | b.keys()):
                if a.get(key) != b.get(key):
                    walk(f"{path}.{key}", a.get(key), b.get(key))
        else:
            leaves.append(f"{path}: {a!r} -> {b!r}")

    for name, (theirs, ours) in diff.items():
        walk(name, theirs, ours)
    more = f" (+{len(leaves) - limit} more)" if len(leaves) > limit else ""
    return "; ".join(leaves[:limit]) + more


def identity_diff(ours: dict, theirs: dict) -> dict[str, tuple]:
    """Identity fields that differ between two provenances: name -> (theirs, ours)."""
    a, b = provenance_identity(ours), provenance_identity(theirs)
    return {k: (b[k], a[k]) for k in IDENTITY_FIELDS if a[k] != b[k]}


def sha256_file(path: str | Path, chunk: int = 1 << 22, cached: bool = True) -> str:
    """sha256 of a file, or of every file of a folder (sorted, names included). `cached`
    reuses an earlier digest of the same path, size and mtime (weights are hashed often)."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(str(f.relative_to(path)).encode())
            digest.update(sha256_file(f).encode())
        return digest.hexdigest()
    stat = path.stat()
    cache_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if cache_key not in _HASH_CACHE or not cached:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
        _HASH_CACHE[cache_key] = digest.hexdigest()
    return _HASH_CACHE[cache_key]


def package_versions(*names: str) -> dict[str, str]:
    """Installed versions of vlpipe and the given packages ("absent" when not installed)."""
    versions = {}
    for name in ("vlpipe", "torch", "numpy", "h5py", *names):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def weights_record(path: str | Path | None) -> dict[str, str]:
    """{"weights": file name, "weights_sha256": hex} or the loud random-init marker."""
    if path is None:
        return {"weights": RANDOM_INIT, "weights_sha256": RANDOM_INIT}
    from vlpipe.weights import resolve_weights_file

    file = resolve_weights_file(path)  # a model folder's weights file, not its README
    return {
        "weights": file.name,
        "weights_path": str(file.resolve()),
        "weights_sha256": sha256_file(file),
    }


def host_record() -> dict[str, str]:
    return {"host": platform.node(), "python": platform.python_version()}


# What a cache's data are, as opposed to what made its features: training and evaluation caches
# of one encoder differ here by design (train vs val split) and are compared without them.
DATA_FIELDS = ("dataset", "split")


def encoder_identity(prov: dict | None) -> dict:
    """The identity of the encoder that made a cache's features: `provenance_identity` without
    the dataset and split. {} for no cache."""
    if prov is None:
        return {}
    identity = provenance_identity(prov)
    return {k: v for k, v in identity.items() if k not in DATA_FIELDS}
