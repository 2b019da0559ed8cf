"""SIGKILL a real extraction or training process at several points, or stop one with SIGINT /
SIGTERM, resume, and compare with a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TINY_VIT_ARGS, vlpipe, write_image
from tests.fusion_fixtures import gqa_color_task, logged_losses
from vlpipe.cache import FeatureCache, complete_shards, shard_dir

# Real processes killed, stopped or starved: `pytest -m integration` (.ci/run runs them).
pytestmark = pytest.mark.integration

ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")


def extract_cmd(root: Path, out: Path, *extra) -> list[str]:
    args = [
        "extract",
        "--dataset",
        "folder",
        "--root",
        root,
        "--out",
        out,
        *TINY_VIT_ARGS,
        "--batch-size",
        "1",
        "--shard-items",
        "2",
        *extra,
    ]
    return [sys.executable, "-m", "vlpipe", *map(str, args)]


def kill_when(cmd: list[str], ready, timeout: float = 120) -> None:
    """Start cmd, SIGKILL it as soon as ready() holds (or fail if it exits first)."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"process ended before the kill point: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("kill point never reached")
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    for i in range(9):
        write_image(root / f"img{i}.png", size=(40, 30), seed=i)
    return root


@pytest.fixture(scope="module")
def clean(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "c.h5"
    subprocess.run(extract_cmd(folder, out), env=ENV, check=True, capture_output=True)
    return FeatureCache(out)


def _n_shards(out: Path, suffix: str) -> int:
    folder = shard_dir(out)
    return len(list(folder.glob(f"*{suffix}"))) if folder.exists() else 0


KILL_POINTS = {
    "first partial shard": lambda out: _n_shards(out, ".h5.tmp") >= 1,
    "after two shards": lambda out: _n_shards(out, ".h5") >= 2,
    "mid third shard": lambda out: _n_shards(out, ".h5") >= 2 and _n_shards(out, ".tmp") >= 1,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_killed_extraction_resumes_to_the_clean_result(folder, clean, tmp_path, point):
    out = tmp_path / "k.h5"
    kill_when(extract_cmd(folder, out), lambda: KILL_POINTS[point](out))
    if out.exists():  # a reader never sees a half-written shard
        assert set(FeatureCache(out).keys()) < set(clean.keys())
    elif complete_shards(out):  # no index yet: inspect says the shards are there, and what to do
        said = vlpipe("inspect", out, code=1).output
        assert "no index yet" in said and "complete shards" in said and "--resume" in said
    subprocess.run(extract_cmd(folder, out, "--resume"), env=ENV, check=True, capture_output=True)
    resumed = FeatureCache(out)
    keys = clean.keys()
    assert sorted(resumed.keys()) == sorted(keys) and resumed.num_rows == len(keys)
    for field in ("image_cls", "image_feats", "image_hw"):
        np.testing.assert_array_equal(resumed.read(keys)[field], clean.read(keys)[field])
    assert not list(shard_dir(out).glob("*.tmp"))


def test_killed_training_resumes_on_the_same_loss_trajectory(tmp_path):
    data = gqa_color_task(tmp_path)
    base = [
        sys.executable,
        "-m",
        "vlpipe",
        "train",
        *data,
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--ckpt-every",
        "2",
        "--no-progress",
    ]
    subprocess.run([*base, "--out", str(tmp_path / "a")], env=ENV, check=True, capture_output=True)
    run = tmp_path / "b"

    def past_step_8() -> bool:
        latest = run / "LATEST"
        return latest.exists() and int(latest.read_text().split("-")[1]) >= 8

    kill_when([*base, "--out", str(run)], past_step_8)
    subprocess.run([*base, "--out", str(run), "--resume"], env=ENV, check=True, capture_output=True)
    assert logged_losses(run) == pytest.approx(logged_losses(tmp_path / "a"), abs=1e-6)
    assert len(logged_losses(run)) == 24


def test_kill_early_in_a_resumed_run_keeps_the_log(tmp_path):
    """The resumed run rewrites train_log.csv (dropping rows logged past its checkpoint): a kill
    right after that must leave the earlier rows, not an empty file."""
    data = gqa_color_task(tmp_path)
    base = [sys.executable, "-m", "vlpipe", "train", *data, "--epochs", "4", "--batch-size", "4"]
    base += ["--lr", "1e-2", "--no-progress", "--out", str(tmp_path / "run")]
    subprocess.run([*base, "--max-steps", "6"], env=ENV, check=True, capture_output=True)
    log = tmp_path / "run" / "train_log.csv"
    before = log.stat()

    def log_rewritten() -> bool:
        now = log.stat() if log.exists() else None
        return now is None or (now.st_ino, now.st_mtime_ns) != (before.st_ino, before.st_mtime_ns)

    kill_when([*base, "--resume"], log_rewritten)
    assert len(logged_losses(tmp_path / "run")) >= 6


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    """60 images: long enough a run to stop in the middle of."""
    root = tmp_path_factory.mktemp("many")
    for i in range(60):
        write_image(root / f"img{i:02d}.png", size=(40, 30), seed=i)
    out = tmp_path_factory.mktemp("many_clean") / "c.h5"
    vlpipe(*extract_cmd(root, out)[3:])  # the uninterrupted run, in-process
    return root, FeatureCache(out)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_stop_signal_finishes_the_shard_and_the_index(many, tmp_path, sig):
    """Ctrl-C (SIGINT to the whole process group, DataLoader worker included) or a scheduler's
    SIGTERM in the middle of a run whose one shard is still open (as with the default ~1 GiB
    shards): that shard is finished, the index written, and --resume completes the cache."""
    root, clean = many
    out = tmp_path / "s.h5"
    cmd = extract_cmd(root, out, "--shard-items", "1000", "--num-workers", "1")
    proc = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True, start_new_session=True)
    partial = shard_dir(out) / "r0-00000.h5.tmp"
    deadline = time.monotonic() + 120
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    signum = getattr(signal, sig)
    if sig == "SIGINT":
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, stderr[-2000:]
    assert f"stopped by {sig}" in stderr and "--resume" in stderr and "Traceback" not in stderr
    stopped = FeatureCache(out)
    assert 0 < len(stopped) < 60 and stopped.shard_files == ["r0-00000.h5"]
    assert vlpipe("verify", out).exit_code == 0
    assert f"items {len(stopped)} " in vlpipe("inspect", out).output
    vlpipe(*extract_cmd(root, out, "--resume", "--shard-items", "1000")[3:])
    resumed, keys = FeatureCache(out), clean.keys()
    assert sorted(resumed.keys()) == sorted(keys) and len(resumed.shard_files) == 2
    np.testing.assert_array_equal(resumed.read(keys)["image_cls"], clean.read(keys)["image_cls"])
