"""What a vlpipe cache is, defined once: the schema version, the field table, the kinds of
cache, the `Schema` that travels inside every shard and index as attributes, what one shard
holds (`read_shard`) and the digests the index records of it. `vlpipe.cache` writes and reads
caches in this format; `vlpipe.cache_layout` says where their files live.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from vlpipe.cache_layout import CacheError, checksum_path
from vlpipe.provenance import identity_digest, sha256_file

SCHEMA_VERSION = 3  # 2: shard table with keys and identity digests; 3: declared facts
FEATURE_DTYPES = ("float16", "float32")

# name: (dtype, meaning). dtype None = the cache's feature dtype (float16 unless asked).
FIELDS: dict[str, tuple[str | None, str]] = {
    "image_feats": (None, "K x D visual features (regions, patch tokens or grid cells)"),
    "image_cls": (None, "D ViT CLS token or globally pooled CNN feature"),
    "image_boxes": ("float32", "K x 4 absolute x1, y1, x2, y2 in original image pixels"),
    "image_mask": ("bool", "K True for real regions"),
    "image_hw": ("int32", "2 original image height, width"),
    "obj_ids": ("int64", "K object class id (0-based, background excluded)"),
    "obj_conf": ("float32", "K object class confidence"),
    "attr_ids": ("int64", "K attribute id (0-based, 'no attribute' excluded)"),
    "attr_conf": ("float32", "K attribute confidence"),
    "text_feats": (None, "L x D last-layer token features (see the encoder_block fact)"),
    "text_cls": (None, "D last-layer [CLS] feature (see the encoder_block fact)"),
    "text_ids": ("int32", "L WordPiece token ids"),
    "text_mask": ("bool", "L attention mask"),
    "text": ("str", "the text that was encoded"),
}
# The per-region fields of a `regions` cache, K rows each (`region_shapes` gives their shapes).
REGION_FIELDS = ("image_boxes", "image_mask", "obj_ids", "obj_conf", "attr_ids", "attr_conf")
# Which fields each kind of cache may hold; `required` ones must always be present.
KINDS: dict[str, dict[str, tuple[str, ...]]] = {
    "regions": {"required": ("image_feats", "image_hw", *REGION_FIELDS), "optional": ()},
    "patches": {"required": ("image_cls", "image_hw"), "optional": ("image_feats",)},
    "grid": {"required": ("image_cls", "image_hw"), "optional": ("image_feats",)},
    "tokens": {
        "required": ("text_cls", "text_mask", "text_ids", "text"),
        "optional": ("text_feats",),
    },
}
STR = h5py.string_dtype("utf-8")


def region_shapes(max_boxes: int, feature_dim: int) -> dict[str, tuple[int, ...]]:
    """Per-item shapes of a `regions` cache: K = max_boxes regions of D = feature_dim
    features. The order is the one shards record in their schema."""
    k = max_boxes
    shapes = {"image_feats": (k, feature_dim), "image_boxes": (k, 4), "image_hw": (2,)}
    return shapes | {name: (k,) for name in REGION_FIELDS if name not in shapes}


# Facts a later stage needs about a cache's fields, declared with the schema (not dug out of
# free-form provenance): name -> (the kinds that declare it, meaning).
FACTS: dict[str, tuple[tuple[str, ...], str]] = {
    "box_unit": (("regions",), "image_boxes are absolute x1, y1, x2, y2 in original pixels"),
    "grid": (("patches", "grid"), "[rows, cols] of image_feats, row-major"),
    "vocab_sha256": (("tokens",), "sha256 of the WordPiece vocab.txt that made text_ids"),
    "vocab_size": (("tokens",), "tokens in that vocab"),
    "max_length": (("tokens",), "text_ids per text, [CLS] / [SEP] included"),
    "encoder_block": (
        ("patches", "tokens"),
        "[N, L]: the features are the tokens after N of the encoder's L blocks, before the final "
        "norm (image_cls / text_cls: the CLS token's row); absent: the last layer's output",
    ),
}
KIND_FACTS = {"regions": {"box_unit": "pixels"}}  # what every cache of a kind declares


@dataclass(frozen=True)
class Schema:
    """The fields one cache holds: name -> (per-item shape, dtype), and the declared facts."""

    kind: str
    fields: dict[str, tuple[tuple[int, ...], str]]
    facts: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        kind: str,
        shapes: dict[str, tuple[int, ...]],
        feature_dtype: str,
        facts: dict[str, Any] | None = None,
    ) -> Schema:
        if kind not in KINDS:
            raise ValueError(f"unknown cache kind {kind!r}; known: {sorted(KINDS)}")
        if feature_dtype not in FEATURE_DTYPES:
            raise ValueError(
                f"feature dtype must be one of {FEATURE_DTYPES}, got {feature_dtype!r}"
            )
        allowed = KINDS[kind]["required"] + KINDS[kind]["optional"]
        missing = [f for f in KINDS[kind]["required"] if f not in shapes]
        extra = [f for f in shapes if f not in allowed]
        if missing or extra:
            raise ValueError(f"{kind} cache: missing fields {missing}, unexpected fields {extra}")
        facts = {**KIND_FACTS.get(kind, {}), **(facts or {})}
        wrong = [k for k in facts if k not in FACTS or kind not in FACTS[k][0]]
        if wrong:
            raise ValueError(f"{kind} cache: facts {wrong} are not declared for this kind")
        fields = {n: (tuple(s), FIELDS[n][0] or feature_dtype) for n, s in shapes.items()}
        return cls(kind, fields, json.loads(json.dumps(facts)))

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "fields": self.fields, "facts": self.facts})

    @classmethod
    def from_json(cls, text: str) -> Schema:
        raw = json.loads(text)
        fields = {n: (tuple(s), d) for n, (s, d) in raw["fields"].items()}
        return cls(raw["kind"], fields, raw.get("facts", {}))  # before v3: no facts


def storable(text: str) -> str:
    """`text` if it can be stored as UTF-8, else with the undecodable bytes of a file name
    (surrogate escapes) written as backslash escapes: `caf\\xe9`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text


def decode(values: Iterable) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def keys_digest(keys: Sequence[bytes], alias_keys: Sequence[bytes], alias_rows) -> str:
    """sha256 of a shard's row keys in row order and its alias keys with their rows, as the
    index records it (utf-8 bytes as h5py reads them)."""
    digest = hashlib.sha256(b"\0".join(keys))
    digest.update(b"\1" + b"\0".join(alias_keys) + b"\1")
    digest.update(np.asarray(alias_rows, "<i8").tobytes())
    return digest.hexdigest()


def raw(values) -> list[bytes]:
    return [v if isinstance(v, bytes) else str(v).encode() for v in values]


@dataclass
class ShardInfo:
    """What one complete shard holds besides its features."""

    path: Path
    keys: list[str]
    alias_keys: list[str]
    alias_rows: np.ndarray
    failures: list[tuple[str, str, str]]
    schema: str
    provenance: dict
    keys_sha256: str
    field_rows: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.keys)

    @property
    def identity_sha256(self) -> str:
        return identity_digest(self.provenance)


def read_shard(shard: Path) -> ShardInfo:
    """Keys, aliases, failures, schema and provenance of one complete shard."""
    try:
        with h5py.File(shard, "r") as h5:
            keys, akeys = raw(h5["keys"][:]), raw(h5["alias_keys"][:])
            arows = h5["alias_rows"][:]
            failures = list(
                zip(
                    decode(h5["failed_keys"][:]),
                    decode(h5["failed_paths"][:]),
                    decode(h5["failed_reasons"][:]),
                    strict=True,
                )
            )
            schema, prov = h5.attrs["schema"], json.loads(h5.attrs["provenance"])
            rows = {n: len(h5[n]) for n in Schema.from_json(schema).fields}
    except (OSError, KeyError, ValueError) as err:
        raise CacheError(f"{shard}: unreadable shard ({err})") from err
    return ShardInfo(
        shard,
        decode(keys),
        decode(akeys),
        arows,
        failures,
        schema,
        prov,
        keys_digest(keys, akeys, arows),
        rows,
    )


def read_shard_keys(shard: Path) -> tuple[list[str], list[str], np.ndarray, list[str]]:
    """(row keys, alias keys, alias rows, failed keys) of one complete shard."""
    info = read_shard(shard)
    return info.keys, info.alias_keys, info.alias_rows, [f[0] for f in info.failures]


def index_tables(infos: Sequence[ShardInfo]) -> dict:
    """The key table (row keys, then alias keys) and row offsets an index holds for `infos`."""
    rows_keys, alias_keys, alias_rows, failures = [], [], [], []
    offsets = [0]
    for info in infos:
        rows_keys += info.keys
        alias_keys += info.alias_keys
        alias_rows += [offsets[-1] + int(r) for r in info.alias_rows]
        failures += info.failures
        offsets.append(offsets[-1] + info.rows)
    n = offsets[-1]
    key_rows = np.concatenate([np.arange(n), np.asarray(alias_rows, np.int64)]).astype(np.int64)
    return {
        "keys": rows_keys + alias_keys,
        "key_rows": key_rows,
        "failures": failures,
        "offsets": np.asarray(offsets, np.int64),
    }


def shard_checksum(shard: Path) -> str:
    """The recorded sha256 of a shard (computed now for shards written without one)."""
    side = checksum_path(shard)
    return side.read_text().strip() if side.exists() else sha256_file(shard)
