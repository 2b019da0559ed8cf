"""Fault injection on a cache: flipped bytes, truncation, a lost index, orphaned shards."""

from __future__ import annotations

import pytest

from tests.test_cache import write_regions
from vlpipe.cache import FeatureCache, complete_shards
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
