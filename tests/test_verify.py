"""Fault injection on a cache: flipped bytes, truncation, a lost index, orphaned shards, and
damage only the index's record reveals: edited key tables, swapped or foreign shards, copies,
paths and links out of the cache's folder; schema v1 caches."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.test_cache import PROV, REGION_SHAPES, region_batch, write_regions
from vlpipe.cache import (
    SCHEMA_VERSION,
    CacheError,
    CacheWriter,
    FeatureCache,
    Schema,
    checksum_path,
    complete_shards,
    shard_dir,
)
from vlpipe.verify import repair, verify


@pytest.fixture
def cache(tmp_path):
    write_regions(tmp_path / "c.h5", n=10, batch=4, shard_items=3)
    return tmp_path / "c.h5"


def test_clean_cache_verifies(cache):
    report = verify(cache)
    assert report.ok and report.shards == 4 and report.items == 10


def test_flipped_byte_is_detected_and_repair_drops_the_shard(cache):
    shard = complete_shards(cache)[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify(cache)
    assert not report.ok and any("checksum mismatch" in p for p in report.problems)
    report, summary = repair(cache)
    assert summary["rows"] == 7 and verify(cache).ok
    assert shard.with_name(shard.name + ".corrupt").exists()
    assert "img4" not in FeatureCache(cache) and "img0" in FeatureCache(cache)


def test_truncated_shard_is_detected(cache):
    shard = complete_shards(cache)[0]
    shard.write_bytes(shard.read_bytes()[:2000])
    assert any(shard.name in p for p in verify(cache).problems)


def test_deleted_index_is_rebuilt(cache):
    before = FeatureCache(cache).read(["img3", "img9"])["image_feats"]
    cache.unlink()
    assert any("index missing" in p for p in verify(cache).problems)
    repair(cache)
    assert verify(cache).ok
    after = FeatureCache(cache).read(["img3", "img9"])["image_feats"]
    assert (before == after).all()


def test_truncated_index_is_rebuilt(cache):
    cache.write_bytes(cache.read_bytes()[:100])
    assert any("unreadable" in p for p in verify(cache).problems)
    repair(cache)
    assert len(FeatureCache(cache)) == 10


def test_shard_missing_from_disk_is_reported(cache):
    complete_shards(cache)[2].unlink()
    assert any("missing on disk" in p for p in verify(cache).problems)


def test_verify_cli_exit_status_and_repair(cache):
    from typer.testing import CliRunner

    from vlpipe.pipelines.cli import app

    run = CliRunner()
    assert run.invoke(app, ["verify", str(cache)]).exit_code == 0
    cache.unlink()
    result = run.invoke(app, ["verify", str(cache)])
    assert result.exit_code == 1 and "index missing" in result.output
    result = run.invoke(app, ["verify", str(cache), "--repair"])
    assert result.exit_code == 0 and "repaired" in result.output and "OK" in result.output


# ---- damage that each shard's own checksum cannot see: checked against the index ----------

SCHEMA = Schema.build("regions", REGION_SHAPES, "float16")


def _swap(a: Path, b: Path) -> None:
    tmp = a.with_name("swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def _rewrite(index: Path, name: str, values) -> None:
    with h5py.File(index, "r+") as h5:
        dtype = h5[name].dtype
        del h5[name]
        h5.create_dataset(name, data=values, dtype=dtype)


def test_edited_key_table_is_detected_and_repaired(cache):
    with h5py.File(cache, "r+") as h5:
        rows = h5["key_rows"][:]
        rows[[0, 5]] = rows[[5, 0]]
        h5["key_rows"][:] = rows
    assert FeatureCache(cache)["img0"]["image_feats"][0, 0] == 5  # a wrong item, silently
    problems = verify(cache).problems
    assert any("key -> row table is not the one its shards define" in p for p in problems)
    repair(cache)
    assert verify(cache).ok and FeatureCache(cache)["img0"]["image_feats"][0, 0] == 0


def test_shards_swapped_with_their_checksums_are_detected(cache):
    a, b = complete_shards(cache)[:2]
    _swap(a, b)
    _swap(checksum_path(a), checksum_path(b))
    problems = verify(cache).problems
    assert sum("sha256 is not the one the index recorded" in p for p in problems) == 2
    with pytest.raises(CacheError, match=r"r0-00000.h5: does not match the index.*other keys"):
        FeatureCache(cache)["img0"]
    repair(cache)  # both shards are intact and belong: the rebuilt index maps their keys
    assert verify(cache).ok and FeatureCache(cache)["img0"]["image_feats"][0, 0] == 0


def test_shard_of_another_run_is_detected_and_moved_aside(tmp_path):
    ours, theirs = tmp_path / "c.h5", tmp_path / "other" / "c.h5"
    random_init = dict(PROV, weights_sha256="random-init", seed=0)
    write_regions(ours, prov=random_init)
    write_regions(theirs, prov=dict(random_init, seed=1))  # same keys, another seed
    mine, foreign = complete_shards(ours)[1], complete_shards(theirs)[1]
    shutil.copy(foreign, mine)
    shutil.copy(checksum_path(foreign), checksum_path(mine))
    problems = verify(ours).problems
    assert any("provenance identity is not the index's" in p and "'seed'" in p for p in problems)
    with pytest.raises(CacheError, match="another provenance identity"):
        FeatureCache(ours).read(["img3"])
    report, summary = repair(ours)
    assert [new.name for _, new in report.moved] == ["r0-00001.h5.foreign"]
    assert summary["rows"] == 7 and verify(ours).ok and "img3" not in FeatureCache(ours)
    writer = CacheWriter(ours, SCHEMA, random_init, resume=True)  # as --resume does
    assert writer.done == {f"img{i}" for i in (0, 1, 2, 6, 7, 8, 9)}
    writer.add(*region_batch(3, 3))
    writer.close()
    assert FeatureCache(ours)["img4"]["image_feats"][0, 0] == 4 and verify(ours).ok


def test_repair_never_adopts_a_shard_of_another_split(cache, tmp_path):
    other = tmp_path / "val" / "c.h5"
    write_regions(other, n=3, first=100, prov=dict(PROV, split="val"), writer="r1")
    for src in (complete_shards(other)[0], checksum_path(complete_shards(other)[0])):
        shutil.copy(src, shard_dir(cache) / src.name)
    problems = verify(cache).problems
    assert any(p.startswith("r1-00000.h5: does not belong") and "'split'" in p for p in problems)
    report, summary = repair(cache)
    assert [new.name for _, new in report.moved] == ["r1-00000.h5.foreign"]
    assert (shard_dir(cache) / "r1-00000.h5.foreign.sha256").exists()
    assert summary["rows"] == 10 and "img100" not in FeatureCache(cache) and verify(cache).ok


def test_repair_moves_a_duplicate_copy_aside(cache):
    shard = complete_shards(cache)[1]
    shutil.copy(shard, shard_dir(cache) / "r5-00000.h5")
    shutil.copy(checksum_path(shard), shard_dir(cache) / "r5-00000.h5.sha256")
    assert any("r5-00000.h5: a duplicate" in p for p in verify(cache).problems)
    report, summary = repair(cache)
    assert [new.name for _, new in report.moved] == ["r5-00000.h5.duplicate"]
    assert summary["rows"] == 10 and verify(cache).ok


@pytest.mark.parametrize("entry", ["../../outside.h5", "/etc/passwd", "r0-00000.h5/../x.h5"])
def test_shard_table_naming_a_file_outside_is_refused(cache, entry):
    names = [n.decode() for n in h5py.File(cache, "r")["shard_files"][:]]
    _rewrite(cache, "shard_files", np.array([entry, *names[1:]], dtype=object))
    with pytest.raises(CacheError, match="not a shard file name"):
        FeatureCache(cache)
    assert any("index unreadable" in p for p in verify(cache).problems)
    repair(cache)
    assert verify(cache).ok and len(FeatureCache(cache)) == 10


def test_shard_that_links_outside_the_folder_is_refused(cache, tmp_path):
    shard = complete_shards(cache)[1]
    outside = tmp_path / "elsewhere.h5"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CacheError, match="outside"):
        FeatureCache(cache)
    assert any("outside the shards folder" in p for p in verify(cache).problems)
    report, _ = repair(cache)
    assert [new.name for _, new in report.moved] == ["r0-00001.h5.foreign"] and outside.exists()


def test_links_and_storage_in_other_files_are_refused(cache, tmp_path):
    outside = tmp_path / "outside.h5"
    with h5py.File(outside, "w") as h5:
        h5["keys"] = np.array([b"img0"], dtype=object)
    with h5py.File(cache, "r+") as h5:
        del h5["shards/r0-00000.h5"]
        h5["shards/r0-00000.h5"] = h5py.ExternalLink(str(outside), "/")
    with pytest.raises(CacheError, match="links to .*outside.h5, not to c.shards/r0-00000.h5"):
        FeatureCache(cache)
    repair(cache)
    with h5py.File(cache, "r+") as h5:
        del h5["keys"]
        h5["keys"] = h5py.ExternalLink(str(outside), "/keys")
    with pytest.raises(CacheError, match="/keys is a ExternalLink"):
        FeatureCache(cache)
    repair(cache)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(np.full((3, 2), 7, np.int32).tobytes())
    with h5py.File(complete_shards(cache)[0], "r+") as h5:
        del h5["image_hw"]
        h5.create_dataset("image_hw", (3, 2), np.int32, external=[(str(raw), 0, 24)])
    with pytest.raises(CacheError, match="image_hw keeps its data in other files"):
        FeatureCache(cache, check="none")["img0"]  # refused at any check level


def test_light_check_on_open_catches_a_replaced_shard_of_the_same_size(cache, tmp_path):
    write_regions(tmp_path / "b" / "c.h5", prov=dict(PROV, weights_sha256="other"))
    other = complete_shards(tmp_path / "b" / "c.h5")[0]
    shutil.copy(other, complete_shards(cache)[0])
    assert FeatureCache(cache, check="none")["img0"] is not None  # unchecked: read as is
    with pytest.raises(CacheError, match="another provenance identity"):
        FeatureCache(cache)["img0"]


def test_full_check_on_open_compares_sha256(cache):
    shard = complete_shards(cache)[2]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # a byte no lighter check reads
    shard.write_bytes(bytes(data))
    FeatureCache(cache)["img6"]  # light: size, rows, keys and identity still match
    with pytest.raises(CacheError, match="sha256 differs"):
        FeatureCache(cache, check="full")["img6"]


V1 = Path(__file__).parent / "data" / "v1"


@pytest.fixture
def v1_cache(tmp_path):
    shutil.copytree(V1, tmp_path / "v1")
    return tmp_path / "v1" / "c.h5"


def test_schema_v1_cache_reads_and_verifies_what_it_recorded(v1_cache):
    cache = FeatureCache(v1_cache)
    assert cache.schema_version == 1 and len(cache) == 7
    assert cache.read(["img6", "img0"])["image_cls"][:, 0].tolist() == [6, 0]
    report = verify(v1_cache)
    assert report.ok and any("schema v1 index records no keys" in n for n in report.notes)
    a, b = complete_shards(v1_cache)
    _swap(a, b)
    _swap(checksum_path(a), checksum_path(b))
    assert any("sha256 is not the one the index recorded" in p for p in verify(v1_cache).problems)
    with pytest.raises(CacheError, match="does not match the index"):
        FeatureCache(v1_cache)["img0"]
    repair(v1_cache)  # the rebuilt index is the current version, with every digest
    assert FeatureCache(v1_cache).schema_version == SCHEMA_VERSION and verify(v1_cache).ok


def test_missing_index_says_the_shards_are_there_and_how_to_resume(cache):
    cache.unlink()
    with pytest.raises(
        CacheError, match=r"no index yet, but 4 complete shards \(10 items\) .* --resume"
    ):
        FeatureCache(cache)


def test_verify_cli_names_what_it_moves_aside(cache, tmp_path):
    from typer.testing import CliRunner

    from vlpipe.pipelines.cli import app

    write_regions(tmp_path / "val" / "c.h5", n=3, first=100, prov=dict(PROV, split="val"))
    src = complete_shards(tmp_path / "val" / "c.h5")[0]
    shutil.copy(src, shard_dir(cache) / "r7-00000.h5")
    shutil.copy(checksum_path(src), shard_dir(cache) / "r7-00000.h5.sha256")
    result = CliRunner().invoke(app, ["verify", str(cache), "--repair"])
    assert result.exit_code == 0, result.output
    assert "moved aside: r7-00000.h5 -> r7-00000.h5.foreign" in result.output
    assert "10 items, OK" in result.output
