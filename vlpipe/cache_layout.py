"""The files of a cache on disk: their names, which files are vlpipe's, who may write them.

    cache.h5                          the index (written as cache.h5.tmp<pid>, then renamed)
    cache.shards/r0-00000.h5          a complete shard (`<writer>-<seq>.h5`)
    cache.shards/r0-00000.h5.sha256   its checksum, written before the shard is renamed
    cache.shards/r0-00001.h5.tmp      the shard being written
    cache.shards/.lock-r0             writer r0's lock (flock; names the holder)
    cache.shards/r0-00002.h5.foreign  a shard `vlpipe verify --repair` moved aside (also
                                      .corrupt, .duplicate), with its .sha256 beside it

vlpipe only ever deletes or replaces files it recognises: an index that carries vlpipe's
schema attributes and files in the shards folder whose names follow the patterns above. Every
path the index names must resolve inside `<cache>.shards/`.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import h5py

from vlpipe.errors import VlpipeError
from vlpipe.io import FileLock, LockHeld, describe_holder

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
WRITER_ID = re.compile(r"[A-Za-z0-9_]+")
SHARD_NAME = re.compile(r"(?P<writer>[A-Za-z0-9_]+)-(?P<seq>\d{5,})\.h5")
MOVED_ASIDE = ("corrupt", "foreign", "duplicate")
# Everything vlpipe writes into a shards folder (shards, partial shards, checksums and their
# temporaries, locks, shards moved aside by `verify --repair`).
_OURS = re.compile(
    r"(?P<shard>[A-Za-z0-9_]+-\d{5,}\.h5)"
    r"(\.tmp|\.sha256|\.(corrupt|foreign|duplicate)(\.\d+)?(\.sha256)?)?"
    r"|\.[A-Za-z0-9_]+-\d{5,}\.h5\.sha256\.[^/]+\.tmp"
    r"|\.lock-[A-Za-z0-9_]+"
)
REQUIRED_ATTRS = ("schema_version", "kind", "schema", "provenance")


class CacheError(VlpipeError, RuntimeError):
    """Anything wrong with a cache on disk; the message names the file."""


class CacheWriteError(CacheError):
    """Writing failed (disk full, file-size limit, I/O error); complete shards are intact."""


class CacheBusyError(CacheError):
    """Another process is writing the cache (it holds the writer's lock)."""


def shard_dir(path: str | Path) -> Path:
    """cache.h5 -> cache.shards/ beside it."""
    path = Path(path)
    return path.with_name(path.stem + ".shards")


def checksum_path(shard: Path) -> Path:
    return shard.with_name(shard.name + ".sha256")


def complete_shards(path: str | Path) -> list[Path]:
    """The complete shards of a cache (files named `<writer>-<seq>.h5`), sorted by name."""
    folder = shard_dir(path)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if SHARD_NAME.fullmatch(p.name))


def shard_path(path: str | Path, name: str) -> Path:
    """The file of shard `name` of the cache at `path`; a name that is not a plain shard name,
    or a file that resolves outside `<cache>.shards/` (a symlink), is an error."""
    folder = shard_dir(path)
    if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
        raise CacheError(
            f"{path}: the shard table names {name!r}, which is not a shard file name "
            f"(<writer>-<seq>.h5 inside {folder.name}/); the index is damaged or crafted: "
            f"run `vlpipe verify --repair {path}`"
        )
    file = folder / name
    if os.path.dirname(os.path.realpath(file)) != os.path.realpath(folder):
        raise CacheError(
            f"{file}: resolves to {os.path.realpath(file)}, outside {folder}; vlpipe reads "
            "shards only from the cache's own folder"
        )
    return file


def ours(name: str) -> bool:
    """Whether a file name in a shards folder is one vlpipe writes."""
    return bool(_OURS.fullmatch(name))


# ---- what is at a path ------------------------------------------------------------------------


def index_state(path: Path) -> str:
    """absent | ours (a vlpipe index) | damaged (HDF5 signature, unreadable) | foreign."""
    if not path.exists() and not path.is_symlink():
        return "absent"
    if path.is_dir():
        raise CacheError(
            f"{path} is a directory; --out names the cache index file, e.g. {path / 'cache.h5'}"
        )
    if not path.is_file():
        return "foreign"
    try:
        with h5py.File(path, "r") as h5:
            has = all(a in h5.attrs for a in REQUIRED_ATTRS) and "shard_files" in h5
    except OSError:
        with open(path, "rb") as fh:
            return "damaged" if fh.read(8) == HDF5_SIGNATURE else "foreign"
    return "ours" if has else "foreign"


def foreign_entries(folder: Path) -> list[Path]:
    """Entries of a shards folder that vlpipe did not write."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() or not ours(p.name))


def check_replaceable(path: Path) -> str:
    """The `index_state` of `path`; a file there that is not a vlpipe index is an error naming
    it (vlpipe replaces only its own caches)."""
    state = index_state(path)
    if state == "foreign":
        raise CacheError(
            f"{path} exists and is not a vlpipe cache (no vlpipe schema attributes); vlpipe "
            "replaces only its own caches: choose another --out or move the file away"
        )
    return state


def check_target(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse, naming the file, to write a cache at `path` unless what is there is a vlpipe
    cache that --resume continues or --overwrite replaces (or nothing is there)."""
    folder = shard_dir(path)
    state = check_replaceable(path)
    if folder.exists() and not folder.is_dir():
        raise CacheError(f"{folder} exists and is not a folder; choose another --out")
    foreign = foreign_entries(folder)
    if foreign:
        names = ", ".join(p.name for p in foreign[:3]) + (" ..." if len(foreign) > 3 else "")
        raise CacheError(
            f"{folder} holds files vlpipe did not write ({names}); vlpipe writes shards only "
            "into a folder of its own: choose another --out or move them away"
        )
    shards = complete_shards(path)
    if state == "damaged" and not shards:
        raise CacheError(
            f"{path}: an unreadable HDF5 file without vlpipe shards beside it, not "
            "recognisably a vlpipe cache: choose another --out or move it away"
        )
    if (state != "absent" or shards) and not (resume or overwrite):
        raise CacheError(
            f"{path} already exists: pass --resume to continue it or --overwrite to replace it"
        )


def lock_writer(path: Path, writer: str) -> FileLock:
    """Take writer `writer`'s lock of the cache at `path` (the shards folder must exist)."""
    lock = FileLock(shard_dir(path) / f".lock-{writer}", command=_command())
    try:
        return lock.acquire()
    except LockHeld as held:
        raise CacheBusyError(
            f"{path} is being written by {describe_holder(held.holder)} (lock {held.path}); "
            "two writers would corrupt each other's shards: wait for it to finish or stop it"
        ) from None
    except OSError as err:
        raise CacheError(
            f"{lock.path}: cannot take the writer's lock ({err.strerror or err}); vlpipe "
            "writes a cache only under a lock (does this filesystem support flock?)"
        ) from None


@contextlib.contextmanager
def all_locks(path: Path, keep: tuple[Path, ...] = ()):
    """Hold every writer lock of the cache (except those in `keep`, held by the caller), so
    nothing writes while the cache is removed or repaired."""
    held = []
    try:
        for lock_file in sorted(shard_dir(path).glob(".lock-*")):
            if lock_file not in keep:
                try:
                    held.append(FileLock(lock_file).acquire())
                except LockHeld as busy:
                    raise CacheBusyError(
                        f"{path} is being written by {describe_holder(busy.holder)} "
                        f"(lock {busy.path}): wait for it to finish or stop it"
                    ) from None
        yield
    finally:
        for lock in held:
            lock.release()


def remove_cache(path: Path, keep: tuple[Path, ...] = ()) -> None:
    """Delete a cache that `check_target(overwrite=True)` recognised: the index and the files
    of the shards folder that vlpipe wrote (lock files stay; they are released, not owned)."""
    folder = shard_dir(path)
    with all_locks(path, keep):
        if index_state(path) in ("ours", "damaged"):
            path.unlink()
        if folder.is_dir():
            for entry in folder.iterdir():
                if ours(entry.name) and not entry.name.startswith(".lock-"):
                    entry.unlink()


def clean_stale(path: Path, writer: str) -> None:
    """What a killed run of `writer` left: its partial shard, checksum temporaries, a checksum
    whose shard was never renamed, and index temporaries of processes that are gone."""
    folder = shard_dir(path)
    for stale in folder.glob(f"{writer}-*.h5.tmp"):
        stale.unlink(missing_ok=True)
    for stale in folder.glob(f".{writer}-*.h5.sha256.*.tmp"):
        stale.unlink(missing_ok=True)
    for side in folder.glob(f"{writer}-*.h5.sha256"):
        if not side.with_suffix("").exists():
            side.unlink(missing_ok=True)
    for tmp in path.parent.glob(f"{path.name}.tmp*"):
        pid = tmp.name[len(path.name) + 4 :]
        if pid.isdigit() and not _alive(int(pid)):
            tmp.unlink(missing_ok=True)


def index_tmp(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _command() -> str:
    import sys

    return " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:300]


def missing_index_message(path: Path) -> str:
    """Why `path` cannot be opened as a cache, and what to do when its shards are there."""
    shards = complete_shards(path)
    if not shards:
        return f"{path}: no such cache"
    items = 0
    for shard in shards:
        with contextlib.suppress(OSError, KeyError, ValueError), h5py.File(shard, "r") as h5:
            items += int(h5.attrs["n_items"])
    return (
        f"{path}: no index yet, but {len(shards)} complete shards ({items} items) are in "
        f"{shard_dir(path)}: the extraction stopped before it finished; rerun the same `vlpipe "
        f"extract` command with --resume to complete it (or `vlpipe verify --repair {path}` to "
        "index the shards as they are)"
    )


# ---- what a cache's files may point to ----------------------------------------------------


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
