"""Small file helpers shared by the cache, checkpoints and submission files: atomic writes,
lock files, and what to say about an I/O error."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import sys
import tempfile
import time
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, fsync it, then rename it over `path`:
    a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


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


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
