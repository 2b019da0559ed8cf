"""Run the vlpipe command line with one write failing as a full disk makes it fail:

    python -m tests.faults POINT N vlpipe-arguments...

POINT is where the N-th write fails with OSError(ENOSPC), after the file in question exists
(so a test sees whether it is cleaned up):
    open      creating the N-th shard (its file is created, its datasets are not)
    data      the N-th append of rows to a shard (the rows are written, then it fails)
    checksum  the N-th checksum file, at its fsync (its temporary file exists)
    index     the N-th index file, once it is written under its temporary name
Used by tests/test_write_errors.py in a real subprocess, so the exit status is the real one.
"""

from __future__ import annotations

import errno
import os
import sys


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, "No space left on device (injected)")


class _Nth:
    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls == self.n


def inject(point: str, n: int) -> None:
    from vlpipe import cache

    due = _Nth(n)
    if point == "open":
        create = cache.ShardWriter._create

        def failing_create(self, *args):
            if due():
                raise _enospc()
            create(self, *args)

        cache.ShardWriter._create = failing_create
    elif point == "data":
        append = cache.ShardWriter.append

        def failing_append(self, *args):
            append(self, *args)
            if due():
                raise _enospc()

        cache.ShardWriter.append = failing_append
    elif point == "checksum":
        fsync = os.fsync

        def failing_fsync(fd):
            name = os.readlink(f"/proc/self/fd/{fd}")
            if ".sha256." in name and name.endswith(".tmp") and due():
                raise _enospc()
            fsync(fd)

        os.fsync = failing_fsync
    elif point == "index":
        write_index = cache._write_index

        def failing_write_index(tmp, *args):
            write_index(tmp, *args)
            if due():
                raise _enospc()

        cache._write_index = failing_write_index
    else:
        raise SystemExit(f"unknown fault point {point!r}")


def main() -> None:
    point, n, *args = sys.argv[1:]
    inject(point, int(n))
    from vlpipe.pipelines.cli import main as cli

    sys.argv = ["vlpipe", *args]
    cli()


if __name__ == "__main__":
    main()
