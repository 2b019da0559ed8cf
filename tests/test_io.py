"""vlpipe.io: atomic writes (whole file or nothing, the umask's permissions) and pickles."""

from __future__ import annotations

import os
import pickle
import stat

import h5py
import pytest

from vlpipe.errors import PickleRefused
from vlpipe.io import (
    atomic_folder,
    atomic_write,
    load_pickle,
    refuse_pickle,
    write_bytes_atomic,
    write_text_atomic,
)


@pytest.fixture(params=[0o022, 0o002, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_umask_permissions(tmp_path, umask):
    """Not mkstemp's 0600: collaborators on shared storage read a run."""
    text = write_text_atomic(tmp_path / "a" / "LATEST", "ckpt-0000001")
    data = write_bytes_atomic(tmp_path / "b.bin", b"\0\1")
    with atomic_write(tmp_path / "c.h5") as tmp, h5py.File(tmp, "w") as h5:
        h5["x"] = [1, 2]
    with atomic_folder(tmp_path / "ckpt") as folder:
        (folder / "run.json").write_text("{}")
    for path in (text, data, tmp_path / "c.h5", tmp_path / "ckpt" / "run.json"):
        assert mode(path) == 0o666 & ~umask, path
    assert mode(tmp_path / "ckpt") == 0o777 & ~umask
    assert text.read_text() == "ckpt-0000001" and data.read_bytes() == b"\0\1"
    with h5py.File(tmp_path / "c.h5", "r") as h5:
        assert h5["x"][:].tolist() == [1, 2]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text_atomic(tmp_path / "log.csv", "old")
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.csv"]


def test_a_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    with atomic_folder(tmp_path / "ckpt") as folder:
        (folder / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(tmp_path / "ckpt") as folder:
        (folder / "b").write_text("2")
        raise RuntimeError("killed")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["a"]
    with atomic_folder(tmp_path / "ckpt") as folder:
        (folder / "b").write_text("2")
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_pickles_are_read_only_when_allowed(tmp_path):
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": [1.0]}}))
    with pytest.raises(PickleRefused) as refused:
        load_pickle(path, allow_pickle=False)
    message = str(refused.value)
    assert str(path) in message and "--allow-pickle" in message and "runs code" in message
    assert load_pickle(path, allow_pickle=True) == {"model": {"w": [1.0]}}
    refuse_pickle(tmp_path / "weights.pth")  # not a pickle by name: nothing to refuse
    with pytest.raises(PickleRefused, match=r"x\.npz: its `info` is pickled"):
        refuse_pickle(tmp_path / "x.npz", pickled="its `info` is pickled")
