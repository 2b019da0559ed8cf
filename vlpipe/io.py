"""Small file helpers shared by the cache, checkpoints, plots and submission files: atomic
writes, pickles read only when allowed, lock files, and what to say about an I/O error.

Every atomic write goes through a temporary name beside the target: the data is written there,
fsynced, renamed over the target, and the folder is fsynced, so a reader (or a crash) sees the
old file or the new one, never half of one. Files get the permissions the process umask gives
(0o666 & ~umask, as `open` makes them), not mkstemp's 0600, so collaborators on shared storage
can read a run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import re
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vlpipe.errors import PickleRefused

# ---- atomic writes ------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: str | Path, *, tmp: str | Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` for any writer (text, HDF5, PNG) to fill; when the
    block ends cleanly the file is fsynced and renamed over `path`, else it is removed.

    `tmp`: a temporary name of the caller's (the writer creates the file); by default an empty
    `.<name>.<random>.tmp` is created here."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tmp) if tmp is not None else _new_temporary(path)
    try:
        yield tmp
        publish(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder `.<name>.tmp` beside `path` to fill; when the block ends
    cleanly every file in it and the folder are fsynced and it replaces `path` (an earlier
    folder of that name is removed), else it is removed. A temporary folder a killed process
    left is cleared first."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        publish(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8, line ends as given) to `path` atomically."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as fh:
        fh.write(text)
    return Path(path)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    with atomic_write(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def publish(tmp: Path, path: Path) -> None:
    """Make a complete temporary file or folder visible as `path`: fsync it (a folder: its
    files and itself), rename it over `path`, fsync the folder holding both."""
    if tmp.is_dir():
        for entry in tmp.iterdir():
            if entry.is_file():
                fsync_path(entry)
    fsync_path(tmp)
    os.replace(tmp, path)
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """fsync a file or a folder by name (what a folder fsync makes durable is its entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temporary(path: Path) -> Path:
    """Create an empty `.<name>.<random>.tmp` beside `path` with the umask's permissions
    (mkstemp would give 0600)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{path}: no free temporary name beside it")


# ---- pickles ------------------------------------------------------------------------------------

PICKLE_SUFFIXES = (".pkl", ".pickle")


def refuse_pickle(
    where: str | Path, *, allow_pickle: bool = False, pickled: str | None = None
) -> None:
    """Raise PickleRefused naming `where` and --allow-pickle when it is a pickle (a .pkl name,
    or `pickled`: what of it the caller found pickled) and pickles are not allowed."""
    if allow_pickle or not (pickled or Path(where).suffix in PICKLE_SUFFIXES):
        return
    raise PickleRefused(
        f"{where}: {pickled or 'a pickle'}, and unpickling runs code stored in the file: "
        "vlpipe reads one only with --allow-pickle (allow_pickle=True), where a reader takes it "
        "(Faster R-CNN .pkl checkpoints, `vlpipe import --format npz`); pass it only for files "
        "you trust"
    )


def load_pickle(path: str | Path, *, allow_pickle: bool) -> object:
    """Unpickle `path` when pickles are allowed (see `refuse_pickle`); py2-era pickles (the
    released detectron2 checkpoints) need latin1."""
    refuse_pickle(path, allow_pickle=allow_pickle, pickled="a pickle")
    with open(path, "rb") as handle:
        return pickle.load(handle, encoding="latin1")


# ---- locks --------------------------------------------------------------------------------------


class LockHeld(Exception):
    """Another process holds the lock; `holder` is what it wrote into the lock file."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {describe_holder(holder)}")


def describe_holder(holder: dict) -> str:
    if not holder:
        return "another process (it wrote no details)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}" + (
        f" ({holder['command']})" if holder.get("command") else ""
    )


class FileLock:
    """An exclusive `flock` on a lock file, taken without waiting (LockHeld if another process
    has it). The kernel releases it when the process ends, however it ends, so a killed run
    never leaves a stale lock; the file only records who held it last (pid, host, start time)
    for the message of whoever is refused. Forked children share the lock until they exit."""

    def __init__(self, path: str | Path, command: str = ""):
        self.path, self.command = Path(path), command
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeld(self.path, holder) from None
        except OSError:
            os.close(fd)
            raise
        started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started}
        self._fd = fd
        with contextlib.suppress(OSError):  # who holds it is a courtesy (a full disk refuses it)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(dict(info, command=self.command)).encode(), 0)
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *_) -> None:
        self.release()

    def __del__(self) -> None:
        self.release()


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


# ---- errors -------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_teardown():
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
