"""Every registered backbone through one tiny extraction (timm's tests over list_models()): the
cache holds the fields and declared facts the extractor announces, for every item."""

from __future__ import annotations

import json

import pytest

from tests.conftest import TINY_BERT, TINY_VIT, vlpipe, write_image
from vlpipe.cache import FeatureCache
from vlpipe.extract.registry import BACKBONES

# The tiny random model of each backbone and what it runs over. A backbone added to the
# registry fails test_every_backbone_has_a_tiny_config until it gets one here.
TINY = {
    "vit": ["--arch", "vit_tiny_patch16_224", "--model-config", TINY_VIT, "--image-size", "32"],
    "resnet": ["--arch", "resnet18", "--image-size", "32"],
    "cnn": ["--arch", "tf_efficientnet_lite0", "--image-size", "32", "--layer", "blocks.4"],
    "frcnn": ["--model-config", '{"tiny": true}', "--image-size", "64", "--max-size", "128"],
    "bert": ["--model-config", TINY_BERT],
}
KIND = {"vit": "patches", "resnet": "grid", "cnn": "grid", "frcnn": "regions", "bert": "tokens"}


def test_every_backbone_has_a_tiny_config():
    assert set(TINY) == set(BACKBONES)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_tiny_extraction(tmp_path, name, minilm_dir):
    if name == "bert":
        questions = {f"q{i}": {"imageId": "i", "question": f"is it {i}?"} for i in range(3)}
        (tmp_path / "q.json").write_text(json.dumps(questions))
        data = ["--dataset", "gqa", "--annotations", tmp_path / "q.json"]
        data += ["--vocab", minilm_dir / "vocab.txt"]
    else:
        for i in range(3):
            write_image(tmp_path / "imgs" / f"img{i}.png", size=(48, 40), seed=i)
        data = ["--dataset", "folder", "--root", tmp_path / "imgs", "--num-workers", "0"]
    out = tmp_path / "c.h5"
    vlpipe("extract", "--backbone", name, *data, "--weights", "random", *TINY[name],
           "--no-progress", "--out", out)  # fmt: skip
    cache = FeatureCache(out)
    assert cache.kind == KIND[name] and len(cache) == 3 and not cache.failures
    item = cache[cache.keys()[0]]
    assert set(item) == set(cache.fields)
    for field, (shape, dtype) in cache.fields.items():
        value = item[field]
        assert isinstance(value, str) if dtype == "str" else value.shape == tuple(shape), field
    assert cache.provenance["backbone"] == name and cache.provenance["weights"] == "random-init"
    assert cache.provenance["config"]["backbone"] == name  # the resolved job, recorded
    facts = {
        "vit": {"grid": [2, 2]},  # 32 px / 16 px patches
        "resnet": {"grid": [1, 1]},  # 32 px / stride 32
        "cnn": {"grid": [2, 2]},  # 32 px / stride 16
        "frcnn": {"box_unit": "pixels"},
        "bert": {"max_length": 20, "vocab_size": 30522},
    }[name]
    assert facts.items() <= cache.schema.facts.items()
