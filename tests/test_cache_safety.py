"""What a writer may touch: only vlpipe caches are replaced, one writer per cache (and per
writer id), leftovers of killed runs are cleaned, keys that cost memory by their total length,
and the provenance identity that decides what may be resumed or mixed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import vlpipe
from tests.test_cache import PROV, REGION_SHAPES, region_batch, write_regions
from vlpipe.cache import (
    CacheBusyError,
    CacheError,
    CacheWriter,
    FeatureCache,
    Schema,
    shard_dir,
)
from vlpipe.keytable import KeyTable
from vlpipe.provenance import identity_digest, provenance_identity
from vlpipe.verify import repair

SCHEMA = Schema.build("regions", REGION_SHAPES, "float16")


def user_hdf5(path: Path) -> Path:
    with h5py.File(path, "w") as h5:
        h5["results"] = np.arange(5)
    return path


def test_overwrite_refuses_an_unrelated_hdf5_file(tmp_path):
    path = user_hdf5(tmp_path / "results.h5")
    before = path.read_bytes()
    for kw in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(CacheError, match=r"results.h5 exists and is not a vlpipe cache"):
            CacheWriter(path, SCHEMA, PROV, **kw)
    assert path.read_bytes() == before and not shard_dir(path).exists()


def test_overwrite_refuses_a_shards_folder_holding_other_files(tmp_path):
    folder = tmp_path / "notes.shards"
    folder.mkdir()
    (folder / "draft.txt").write_text("mine")
    user_hdf5(folder / "data.h5")
    for kw in ({"overwrite": True}, {"resume": True}, {}):
        with pytest.raises(CacheError, match=r"notes.shards holds files vlpipe did not write"):
            CacheWriter(tmp_path / "notes.h5", SCHEMA, PROV, **kw)
    assert sorted(p.name for p in folder.iterdir()) == ["data.h5", "draft.txt"]


def test_overwrite_replaces_a_vlpipe_cache_and_only_its_files(tmp_path):
    path = tmp_path / "c.h5"
    write_regions(path, n=10)
    write_regions(path, n=4, overwrite=True)
    assert len(FeatureCache(path)) == 4
    names = sorted(p.name for p in shard_dir(path).iterdir())
    assert names == [".lock-r0", *(f"r0-0000{i}.h5{s}" for i in range(2) for s in ("", ".sha256"))]


def test_cli_refuses_other_files_and_a_directory(tmp_path, image_folder):
    from tests.test_extract import vit_args

    path = user_hdf5(tmp_path / "results.h5")
    before = path.read_bytes()
    out = vlpipe(*vit_args(image_folder, path, "--overwrite"), code=1).output
    assert "results.h5 exists and is not a vlpipe cache" in out and "Traceback" not in out
    out = vlpipe(*vit_args(image_folder, tmp_path, "--overwrite"), code=1).output
    assert "is a directory" in out and "Traceback" not in out
    tsv = write_tsv(tmp_path / "x.tsv", 1)
    out = vlpipe("import", tsv, "--format", "lxmert-tsv", "--out", path, "--overwrite", code=1)
    assert "results.h5 exists and is not a vlpipe cache" in out.output
    assert path.read_bytes() == before


def write_tsv(path: Path, n: int) -> Path:
    """n one-box images in LXMERT's TSV format, img_id 0..n-1."""
    from vlpipe.extract.interop import _b64_text

    ids, conf, boxes = np.zeros(1, "<i8"), np.ones(1, "<f4"), np.zeros((1, 4), "<f4")
    rows = []
    for i in range(n):
        feats = np.full((1, 8), i, "<f4")
        fields = [str(i), "10", "10", *map(_b64_text, (ids, conf, ids, conf)), "1"]
        rows.append("\t".join([*fields, _b64_text(boxes), _b64_text(feats)]))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_import_resumes(tmp_path):
    tsv, out = write_tsv(tmp_path / "x.tsv", 5), tmp_path / "c.h5"
    vlpipe("import", tsv, "--format", "lxmert-tsv", "--out", out, "--limit", 2)
    vlpipe("import", tsv, "--format", "lxmert-tsv", "--out", out, code=1)  # exists
    vlpipe("import", tsv, "--format", "lxmert-tsv", "--out", out, "--resume")
    cache = FeatureCache(out)
    assert len(cache) == 5 and len(cache.shard_files) == 2
    assert cache.read(["4", "0"])["image_feats"][:, 0, 0].tolist() == [4, 0]


HOLD = """
import sys
from vlpipe.cache import CacheWriter, Schema
schema = Schema.build("patches", {"image_cls": (4,), "image_hw": (2,)}, "float32")
writer = CacheWriter(sys.argv[1], schema, {}, writer=sys.argv[2])
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.integration
def test_second_writer_is_refused_naming_the_holder_until_it_dies(tmp_path, image_folder):
    from tests.test_extract import vit_args

    path = tmp_path / "c.h5"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), "r0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        schema = Schema.build("patches", {"image_cls": (4,), "image_hw": (2,)}, "float32")
        with pytest.raises(CacheBusyError, match=rf"being written by pid {holder.pid} on host"):
            CacheWriter(path, schema, {}, resume=True)
        out = vlpipe(*vit_args(image_folder, path), code=1).output
        assert f"pid {holder.pid}" in out and ".lock-r0" in out
        with pytest.raises(CacheBusyError, match=rf"pid {holder.pid}"):
            CacheWriter(path, schema, {}, writer="r2", overwrite=True)  # would delete its files
        with pytest.raises(CacheBusyError, match=rf"pid {holder.pid}"):
            repair(path)
        with CacheWriter(path, schema, {}, writer="r1", resume=True, build_index_on_close=False):
            pass  # another writer id (another torchrun rank) has a lock of its own
    finally:
        holder.kill()
        holder.wait()
    CacheWriter(path, schema, {}, resume=True).abort()  # the kernel released the dead one's lock


def test_same_writer_id_twice_in_one_process_is_refused(tmp_path):
    first = CacheWriter(tmp_path / "c.h5", SCHEMA, PROV, writer="r1")
    with pytest.raises(CacheBusyError, match=r"lock-r1"):
        CacheWriter(tmp_path / "c.h5", SCHEMA, PROV, writer="r1", resume=True)
    first.abort()


def test_leftover_temporaries_are_cleaned_on_the_next_run(tmp_path):
    import os

    path = tmp_path / "c.h5"
    write_regions(path, n=4)
    folder = shard_dir(path)
    dead = [
        path.with_name("c.h5.tmp4194305"),  # above the kernel's pid limit: never alive
        folder / "r0-00009.h5.tmp",
        folder / ".r0-00009.h5.sha256.k2j3h4.tmp",
        folder / "r0-00009.h5.sha256",  # checksum whose shard was never renamed
    ]
    alive = path.with_name(f"c.h5.tmp{os.getppid()}")  # another live process's index build
    for p in [*dead, alive]:
        p.write_bytes(b"partial")
    with CacheWriter(path, SCHEMA, PROV, resume=True) as writer:
        writer.add(*region_batch(4, 2))
    assert not any(p.exists() for p in dead) and alive.exists()
    assert len(FeatureCache(path)) == 6


def test_long_keys_cost_memory_by_their_total_length(tmp_path):
    keys = [f"k{i}".encode() for i in range(3000)] + [b"x" * 200_000, b"x" * 199_999 + b"y"]
    table = KeyTable(keys)
    assert table.nbytes < 3 * sum(map(len, keys)) + 40 * len(keys)  # not 200 kB x 3002
    queries = ["x" * 200_000, "k17", "x" * 199_999 + "y", "x" * 199_999, "nope", "k2999"]
    assert table.find(queries).tolist() == [3000, 17, 3001, -1, -1, 2999]
    assert table.key(3001).endswith("y") and len(table.keys()) == 3002


def test_cache_with_a_very_long_key_reads_every_key(tmp_path):
    path = tmp_path / "c.h5"
    long = "q" * 100_000
    schema = Schema.build("patches", {"image_cls": (2,), "image_hw": (2,)}, "float32")
    with CacheWriter(path, schema, PROV) as writer:
        keys = [long, *(f"img{i}" for i in range(500))]
        cls = np.arange(len(keys), dtype=np.float32)[:, None].repeat(2, 1)
        writer.add(keys, {"image_cls": cls, "image_hw": np.ones((len(keys), 2))})
    cache = FeatureCache(path)
    assert cache._table.nbytes < 400_000  # fixed-width keys would take 100 kB x 501
    assert cache[long]["image_cls"][0] == 0 and cache["img499"]["image_cls"][0] == 500
    assert cache.contains([long, long + "!", "img3"]).tolist() == [True, False, True]


def test_provenance_identity_keeps_what_defines_the_features():
    base = dict(PROV, precision="fp32", created="t1", host="a", versions={"torch": "1"})
    later = dict(base, created="t2", host="b", versions={"torch": "2"}, dataset_root="/x")
    assert identity_digest(base) == identity_digest(later)
    assert identity_digest(dict(base, precision="bf16")) != identity_digest(base)
    assert identity_digest(dict(base, split="val")) != identity_digest(base)
    # the seed defines random-init features only
    assert identity_digest(dict(base, seed=1)) == identity_digest(dict(base, seed=2))
    rand = dict(base, weights_sha256="random-init")
    assert identity_digest(dict(rand, seed=1)) != identity_digest(dict(rand, seed=2))
    identity = provenance_identity(base)
    assert identity["backbone"] == "test" and "created" not in identity
