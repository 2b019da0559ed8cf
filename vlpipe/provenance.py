"""Provenance: what made a cache, recorded in every shard so features never lose their origin."""

from __future__ import annotations

import hashlib
import platform
import time
from importlib import metadata
from pathlib import Path

RANDOM_INIT = "random-init"
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


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


# What defines the features themselves, whatever dataset or split they were computed over: the
# same encoder with the same weights and preprocessing gives the same features. The seed only
# matters for random-init weights. Training and evaluation caches are compared on these.
ENCODER_IDENTITY = (
    "backbone",
    "model",
    "weights_sha256",
    "seed",
    "preprocessing",
    "dtype",
    "precision",
    "box_policy",
)


def encoder_identity(prov: dict | None) -> dict:
    """The provenance fields that define an encoder's features (see ENCODER_IDENTITY)."""
    if prov is None:
        return {}
    keys = [k for k in ENCODER_IDENTITY if k != "seed" or prov.get("weights") == RANDOM_INIT]
    return {k: prov.get(k) for k in keys}
