"""The cache: round trip of every kind, random and batched access, shards, resume, safety."""

from __future__ import annotations

import pickle

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from vlpipe.cache import (
    CacheError,
    CacheWriter,
    FeatureCache,
    Schema,
    build_index,
    complete_shards,
    region_shapes,
    shard_dir,
)

REGION_SHAPES = region_shapes(36, 16)
PROV = {"backbone": "test", "model": {"arch": "x"}, "weights_sha256": "abc", "dataset": "d"}


def region_batch(start: int, n: int, rng=None) -> tuple[list[str], dict[str, np.ndarray]]:
    rng = rng or np.random.default_rng(start)
    keys = [f"img{i}" for i in range(start, start + n)]
    arrays = {
        name: rng.random((n, *shape)).astype(np.float32) for name, shape in REGION_SHAPES.items()
    }
    arrays["image_feats"][:, 0, 0] = np.arange(start, start + n)  # row identity, exact in fp16
    arrays["obj_ids"] = rng.integers(0, 1600, (n, 36))
    arrays["image_mask"] = rng.random((n, 36)) > 0.2
    return keys, arrays


def write_regions(path, n=10, batch=4, shard_items=3, dtype="float16", prov=PROV, first=0, **kw):
    schema = Schema.build("regions", REGION_SHAPES, dtype)
    written = {}
    with CacheWriter(path, schema, prov, shard_items=shard_items, **kw) as writer:
        for start in range(first, first + n, batch):
            keys, arrays = region_batch(start, min(batch, first + n - start))
            writer.add(keys, arrays)
            for i, k in enumerate(keys):
                written[k] = {f: v[i] for f, v in arrays.items()}
    return written


def test_round_trip_by_key_and_row(tmp_path):
    written = write_regions(tmp_path / "c.h5", dtype="float32")
    cache = FeatureCache(tmp_path / "c.h5")
    assert len(cache) == 10 and cache.num_rows == 10 and cache.kind == "regions"
    for key, fields in written.items():
        item = cache[key]
        for name, value in fields.items():
            np.testing.assert_array_equal(item[name], value.astype(item[name].dtype))
    assert cache[3]["image_feats"][0, 0] == 3
    assert cache.provenance["backbone"] == "test"


def test_feature_dtype_float16_by_default(tmp_path):
    write_regions(tmp_path / "c.h5")
    cache = FeatureCache(tmp_path / "c.h5")
    assert cache.fields["image_feats"][1] == "float16"
    assert cache.fields["image_boxes"][1] == "float32"  # boxes keep full precision
    assert cache["img7"]["image_feats"].dtype == np.float16


def test_batched_read_keeps_order_and_repeats(tmp_path):
    write_regions(tmp_path / "c.h5")
    cache = FeatureCache(tmp_path / "c.h5")
    keys = ["img9", "img0", "img9", "img4", "img5"]
    batch = cache.read(keys, fields=["image_feats", "obj_ids"])
    assert set(batch) == {"image_feats", "obj_ids"}
    assert batch["image_feats"][:, 0, 0].tolist() == [9, 0, 9, 4, 5]
    np.testing.assert_array_equal(batch["obj_ids"][1], cache["img0"]["obj_ids"])


def test_shards_are_bounded_and_linked(tmp_path):
    write_regions(tmp_path / "c.h5", n=10, batch=4, shard_items=3)
    shards = complete_shards(tmp_path / "c.h5")
    sizes = [h5py.File(s, "r")["keys"].shape[0] for s in shards]
    assert sizes == [3, 3, 3, 1]
    with h5py.File(tmp_path / "c.h5", "r") as h5:  # external links make the index browsable
        assert h5[f"shards/{shards[1].name}/keys"].shape == (3,)
        assert "provenance" in h5[f"shards/{shards[0].name}"].attrs


def test_missing_key_and_field_errors(tmp_path):
    write_regions(tmp_path / "c.h5")
    cache = FeatureCache(tmp_path / "c.h5")
    with pytest.raises(KeyError, match="'nope' is not in the cache"):
        cache.read(["img1", "nope"])
    with pytest.raises(KeyError, match="no field 'text'"):
        cache.read(["img1"], fields=["text"])
    assert "img1" in cache and "nope" not in cache


def test_existing_cache_is_not_overwritten(tmp_path):
    write_regions(tmp_path / "c.h5")
    with pytest.raises(CacheError, match="already exists"):
        write_regions(tmp_path / "c.h5")
    write_regions(tmp_path / "c.h5", n=4, overwrite=True)
    assert len(FeatureCache(tmp_path / "c.h5")) == 4


def test_resume_skips_done_keys_and_drops_partial_shard(tmp_path):
    path = tmp_path / "c.h5"
    schema = Schema.build("regions", REGION_SHAPES, "float16")
    writer = CacheWriter(path, schema, PROV, shard_items=4)
    for start in (0, 2, 4):
        writer.add(*region_batch(start, 2))
    writer._shard.h5.flush()  # img4, img5 sit in an unfinished .tmp shard: a crash now
    assert len(complete_shards(path)) == 1 and list(shard_dir(path).glob("*.tmp"))
    del writer
    resumed = CacheWriter(path, schema, PROV, shard_items=4, resume=True)
    assert resumed.done == {f"img{i}" for i in range(4)}
    assert not list(shard_dir(path).glob("*.tmp"))
    resumed.add(*region_batch(4, 6))
    resumed.close()
    cache = FeatureCache(path)
    assert sorted(cache.keys()) == sorted(f"img{i}" for i in range(10))
    assert cache.read([f"img{i}" for i in range(10)])["image_feats"][:, 0, 0].tolist() == list(
        range(10)
    )


def test_resume_refuses_a_different_run(tmp_path):
    write_regions(tmp_path / "c.h5")
    schema = Schema.build("regions", REGION_SHAPES, "float16")
    with pytest.raises(CacheError, match="weights_sha256"):
        CacheWriter(tmp_path / "c.h5", schema, dict(PROV, weights_sha256="other"), resume=True)
    other = Schema.build("regions", dict(REGION_SHAPES, image_feats=(36, 8)), "float16")
    with pytest.raises(CacheError, match="schema"):
        CacheWriter(tmp_path / "c.h5", other, PROV, resume=True)


def test_writers_write_their_own_shards_and_index_ties_them(tmp_path):
    path = tmp_path / "c.h5"
    schema = Schema.build("regions", REGION_SHAPES, "float16")
    for rank, start in (("r0", 0), ("r1", 5)):
        with CacheWriter(
            path, schema, PROV, writer=rank, resume=True, build_index_on_close=False
        ) as writer:
            writer.add(*region_batch(start, 5))
    assert not path.exists()
    summary = build_index(path)
    assert summary["rows"] == 10 and summary["shards"] == 2
    assert FeatureCache(path)["img7"]["image_feats"][0, 0] == 7


def test_duplicate_keys_across_shards_are_an_error(tmp_path):
    path = tmp_path / "c.h5"
    schema = Schema.build("regions", REGION_SHAPES, "float16")
    for rank in ("r0", "r1"):
        with CacheWriter(
            path, schema, PROV, writer=rank, resume=True, build_index_on_close=False
        ) as writer:
            writer.add(*region_batch(0, 2))
    with pytest.raises(CacheError, match="duplicate keys"):
        build_index(path)


def test_failures_are_recorded(tmp_path):
    path = tmp_path / "c.h5"
    with CacheWriter(path, Schema.build("regions", REGION_SHAPES, "float16"), PROV) as writer:
        writer.add(*region_batch(0, 2))
        writer.add_failure("bad1", "/data/bad1.jpg", "truncated")
    cache = FeatureCache(path)
    assert cache.failures == [("bad1", "/data/bad1.jpg", "truncated")]
    assert "bad1" not in cache
    assert cache.summary()["failed"][0]["reason"] == "truncated"


def test_shape_mismatch_is_refused_before_writing(tmp_path):
    schema = Schema.build("regions", REGION_SHAPES, "float16")
    keys, arrays = region_batch(0, 2)
    arrays["image_feats"] = arrays["image_feats"][:, :10]
    with (
        pytest.raises(CacheError, match="'image_feats'.*expects"),
        CacheWriter(tmp_path / "c.h5", schema, PROV) as writer,
    ):
        writer.add(keys, arrays)
    assert not (tmp_path / "c.h5").exists()


def test_schema_rejects_wrong_fields():
    with pytest.raises(ValueError, match="missing fields"):
        Schema.build("regions", {"image_feats": (36, 4)}, "float16")
    with pytest.raises(ValueError, match="unexpected fields"):
        Schema.build("patches", {"image_cls": (4,), "image_hw": (2,), "text": ()}, "float16")


def test_text_cache_with_aliases(tmp_path):
    path = tmp_path / "t.h5"
    schema = Schema.build(
        "tokens", {"text_cls": (4,), "text_ids": (3,), "text_mask": (3,), "text": ()}, "float32"
    )
    arrays = {
        "text_cls": np.eye(4)[:2],
        "text_ids": np.ones((2, 3)),
        "text_mask": np.ones((2, 3)),
        "text": np.array(["what color?", "what shape?"], dtype=object),
    }
    with CacheWriter(path, schema, PROV) as writer:
        writer.add(["q0", "q1"], arrays, aliases={"q2": "q0", "q3": "q1", "q4": "q0"})
    cache = FeatureCache(path)
    assert len(cache) == 5 and cache.num_rows == 2
    batch = cache.read(["q4", "q1", "q2"])
    assert batch["text"].tolist() == ["what color?", "what shape?", "what color?"]
    np.testing.assert_array_equal(batch["text_cls"][0], np.eye(4)[0])


class _Reads(Dataset):
    def __init__(self, cache):
        self.cache = cache

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.from_numpy(self.cache[f"img{i}"]["image_feats"][0, :1].astype(np.float32))


def test_reader_works_in_forked_workers(tmp_path):
    write_regions(tmp_path / "c.h5")
    cache = FeatureCache(tmp_path / "c.h5")
    cache["img0"]  # the parent opens a handle first: workers must not reuse it
    loader = DataLoader(_Reads(cache), batch_size=5, num_workers=2)
    values = torch.cat([b[:, 0] for b in loader]).tolist()
    assert values == list(range(10))
    clone = pickle.loads(pickle.dumps(cache))
    assert clone["img9"]["image_feats"][0, 0] == 9
