"""A full disk or an I/O error anywhere in extraction (new shard, shard data, checksum file,
index): one clear message, exit status 1 (not a crash), no temporary file left, complete
shards intact, and `--resume` completes the cache. Real processes: injected errors at each
point, a file-size limit (RLIMIT_FSIZE), and, where this machine lets us mount one, a real
tmpfs that fills up."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import vlpipe, write_image
from tests.test_crash import ENV, extract_cmd
from vlpipe.cache import FeatureCache, checksum_path, complete_shards, shard_dir
from vlpipe.provenance import sha256_file

# Real processes killed, stopped or starved: `pytest -m integration` (.ci/run runs them).
pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
# point -> which write fails (see tests/faults.py); 9 images, 2 per shard
POINTS = {"open": 2, "data": 3, "checksum": 2, "index": 1}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    for i in range(9):
        write_image(root / f"img{i}.png", size=(40, 30), seed=i)
    return root


@pytest.fixture(scope="module")
def clean(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "c.h5"
    vlpipe(*extract_cmd(folder, out)[3:])  # in-process: the same command, no start-up cost
    return FeatureCache(out)


def assert_clean_failure(proc: subprocess.CompletedProcess, out: Path) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert str(out) in errors[0] and "--resume" in errors[0]
    folder = shard_dir(out)
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert not list(out.parent.glob(f"{out.name}.tmp*"))  # the index's temporary
    for shard in complete_shards(out):  # every visible shard is complete and as recorded
        assert sha256_file(shard, cached=False) == checksum_path(shard).read_text().strip()


def assert_resumes_to(folder: Path, out: Path, clean: FeatureCache) -> None:
    vlpipe(*extract_cmd(folder, out, "--resume")[3:])  # in-process: only the failure needs one
    resumed, keys = FeatureCache(out), clean.keys()
    assert sorted(resumed.keys()) == sorted(keys) and resumed.num_rows == len(keys)
    np.testing.assert_array_equal(resumed.read(keys)["image_cls"], clean.read(keys)["image_cls"])


@pytest.mark.parametrize("point", list(POINTS))
def test_injected_write_error_is_one_message_and_resumes(folder, clean, tmp_path, point):
    out = tmp_path / "c.h5"
    cmd = [
        sys.executable,
        "-m",
        "tests.faults",
        point,
        str(POINTS[point]),
        *extract_cmd(folder, out)[3:],
    ]
    env = dict(ENV, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert_clean_failure(proc, out)
    assert "No space left on device" in proc.stderr
    assert len(complete_shards(out)) == (5 if point == "index" else 1)
    assert_resumes_to(folder, out, clean)


@pytest.mark.parametrize("limit", [120_000, 20_000])
def test_file_size_limit_is_one_message_and_resumes(folder, clean, tmp_path, limit):
    """RLIMIT_FSIZE (what a full disk does to a write): at 120 kB the third image of a shard
    does not fit, at 20 kB not even a new shard's metadata."""

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "w.h5"
    proc = subprocess.run(
        extract_cmd(folder, out, "--shard-items", "4"),
        env=ENV,
        capture_output=True,
        text=True,
        preexec_fn=limit_file_size,
    )
    assert_clean_failure(proc, out)
    assert "File too large" in proc.stderr
    assert_resumes_to(folder, out, clean)


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "4m"):
    where.mkdir()
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command")
    if mounted.returncode:
        pytest.skip("cannot mount a tmpfs here (not root?): RLIMIT_FSIZE and injected errors cover")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_full_filesystem_is_one_message_and_resumes(folder, clean, tmp_path):
    """A real 4 MB tmpfs, filled up by another file once the first shard is complete."""
    with small_tmpfs(tmp_path / "mnt") as mnt:
        out, filler = mnt / "c.h5", mnt / "filler"
        proc = subprocess.Popen(
            extract_cmd(folder, out, "--shard-items", "3"),
            env=ENV,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
        )
        deadline = time.monotonic() + 120
        while not complete_shards(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        with open(filler, "wb") as fh, contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        _, stderr = proc.communicate(timeout=120)
        assert_clean_failure(
            subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), out
        )
        assert "No space left on device" in stderr
        filler.unlink()
        assert_resumes_to(folder, out, clean)
        os.sync()
