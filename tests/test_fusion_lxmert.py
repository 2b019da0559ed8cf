"""LxmertFusion: shapes, gradients, masking, SDPA against transformers' own attention, and weight
loading from tiny synthetic checkpoints in the Hugging Face, bare and original LXMERT layouts."""

from __future__ import annotations

import collections

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import BertConfig, BertModel, LxmertForPreTraining, LxmertModel

from tests.fusion_fixtures import assert_fits_one_batch
from vlpipe.fusion.attention import SdpaLxmertAttention
from vlpipe.fusion.lxmert import (
    LxmertFusion,
    LxmertFusionConfig,
    load_bert_language,
    load_lxmert_weights,
)
from vlpipe.weights import WeightsError

TINY = dict(
    l_layers=2,
    r_layers=1,
    x_layers=1,
    hidden=32,
    heads=2,
    intermediate=64,
    vocab_size=100,
    visual_feat_dim=16,
    max_position=40,
)
DEAD_TAIL = ("visn_self_att.", "visn_inter.", "visn_output.")  # of the last cross layer


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine OpenMP threads that wait for
    each other make a 20 ms step take a second."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**overrides) -> LxmertFusionConfig:
    return LxmertFusionConfig(**{**TINY, **overrides})


def make_batch(seed: int = 0, batch: int = 3, tokens: int = 6, regions: int = 5) -> dict:
    """A batch with padded tokens (lengths 6, 4, 2) and padded regions (5, 3, 1)."""
    g = torch.Generator().manual_seed(seed)
    text_mask = torch.arange(tokens)[None] < torch.tensor([6, 4, 2])[:, None]
    region_mask = torch.arange(regions)[None] < torch.tensor([5, 3, 1])[:, None]
    text_ids = torch.randint(1, TINY["vocab_size"], (batch, tokens), generator=g) * text_mask
    return {
        "text_ids": text_ids,
        "text_mask": text_mask,
        "region_feats": torch.randn(batch, regions, TINY["visual_feat_dim"], generator=g),
        "region_boxes": torch.rand(batch, regions, 4, generator=g),
        "region_mask": region_mask,
    }


def stock_inputs(batch: dict) -> dict:
    """The same batch under transformers' LxmertModel argument names."""
    return {
        "input_ids": batch["text_ids"],
        "attention_mask": batch["text_mask"],
        "visual_feats": batch["region_feats"],
        "visual_pos": batch["region_boxes"],
        "visual_attention_mask": batch["region_mask"],
    }


@torch.no_grad()
def scramble(module: nn.Module, seed: int = 1) -> nn.Module:
    """Perturb every parameter (LayerNorms included), so two tensors swapped by a wrong name
    mapping change the output."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def pooled_of(model: LxmertFusion, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**{k: batch[k] for k in model.needs})


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def test_forward_shape_and_interface():
    model = LxmertFusion(tiny())
    assert model.output_dim == 32
    assert LxmertFusion.needs == (
        "text_ids",
        "text_mask",
        "region_feats",
        "region_boxes",
        "region_mask",
    )
    assert pooled_of(model, make_batch()).shape == (3, 32)


def test_every_trainable_parameter_gets_a_finite_gradient():
    model = LxmertFusion(tiny()).train()
    head = nn.Linear(model.output_dim, 4)
    batch = make_batch()
    loss = head(model(**{k: batch[k] for k in model.needs})).logsumexp(-1).sum()
    loss.backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    tail = "lxmert.encoder.x_layers.0."
    assert frozen and all(n.startswith(tuple(tail + d for d in DEAD_TAIL)) for n in frozen)


def test_last_cross_layer_skips_its_visual_stream():
    model = LxmertFusion(tiny(x_layers=2)).eval()
    calls = []
    for i, layer in enumerate(model.lxmert.encoder.x_layers):
        for part in ("visn_self_att", "visn_inter", "visn_output"):
            getattr(layer, part).register_forward_hook(lambda *_, i=i, p=part: calls.append((i, p)))
    model(**make_batch())
    assert calls == [(0, "visn_self_att"), (0, "visn_inter"), (0, "visn_output")]


def test_masked_regions_and_padded_tokens_do_not_change_the_output():
    model = LxmertFusion(tiny())
    batch = make_batch()
    changed = dict(batch)
    changed["text_ids"] = torch.where(batch["text_mask"], batch["text_ids"], 7)
    pad = ~batch["region_mask"][..., None]
    changed["region_feats"] = torch.where(pad, 100.0, batch["region_feats"])
    changed["region_boxes"] = torch.where(pad, 0.5, batch["region_boxes"])
    torch.testing.assert_close(pooled_of(model, changed), pooled_of(model, batch))
    # ...while a real region does change it (the mask is not hiding everything).
    changed["region_feats"] = batch["region_feats"].clone()
    changed["region_feats"][:, 0] += 1.0
    assert not torch.allclose(pooled_of(model, changed), pooled_of(model, batch), atol=1e-4)


def test_sdpa_equals_transformers_attention():
    model = scramble(LxmertFusion(tiny(dropout=0.0)))
    n_attention = TINY["l_layers"] + TINY["r_layers"] + 3 * TINY["x_layers"]
    assert sum(isinstance(m, SdpaLxmertAttention) for m in model.modules()) == n_attention
    stock = LxmertModel(model.config.to_transformers())
    stock.load_state_dict(model.lxmert.state_dict())
    assert not any(isinstance(m, SdpaLxmertAttention) for m in stock.modules())
    batch = make_batch()
    ours = model(**batch)
    theirs = stock.eval()(**stock_inputs(batch)).pooled_output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # Gradients agree too (dropout 0, so train mode is deterministic).
    model.train()(**batch).sum().backward()
    stock.train()(**stock_inputs(batch)).pooled_output.sum().backward()
    for (name, p), q in zip(model.lxmert.named_parameters(), stock.parameters(), strict=True):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_attention_probabilities_fall_back_to_the_stock_path():
    model = LxmertFusion(tiny()).eval()
    out = model.lxmert(**stock_inputs(make_batch()), output_attentions=True)
    assert out.cross_encoder_attentions[0].shape == (3, 2, 6, 5)


def test_few_steps_fit_one_batch():
    torch.manual_seed(0)
    assert_fits_one_batch(LxmertFusion(tiny(dropout=0.0)), make_batch())


def test_config_needs_a_cross_layer():
    with pytest.raises(ValueError, match="x_layers"):
        LxmertFusion(tiny(x_layers=0))


# --------------------------------------------------------------------------------------------
# Weights: Hugging Face layout
# --------------------------------------------------------------------------------------------
def test_load_huggingface_pretraining_folder(tmp_path):
    source = LxmertForPreTraining(tiny().to_transformers())
    scramble(source)
    source.save_pretrained(tmp_path / "lxmert-hf")  # config.json + model.safetensors
    assert (tmp_path / "lxmert-hf" / "model.safetensors").is_file()
    assert (tmp_path / "lxmert-hf" / "config.json").is_file()

    model = LxmertFusion(tiny())
    report = load_lxmert_weights(model, tmp_path / "lxmert-hf")
    assert report.layout == "huggingface"
    assert report.missing == [] and report.unexpected == []
    assert len(report.loaded) == len(model.lxmert.state_dict())
    assert report.ignored and all(
        k.startswith(("cls.", "obj_predict_head.", "answer_head.")) for k in report.ignored
    )
    assert "answer_head.logit_fc.3.weight" in report.ignored
    assert "loaded" in str(report) and "ignored" in str(report)
    batch = make_batch()
    with torch.no_grad():
        expected = source.lxmert(**stock_inputs(batch)).pooled_output
    torch.testing.assert_close(pooled_of(model, batch), expected, atol=1e-5, rtol=1e-5)


def test_load_bare_lxmert_model_bin(tmp_path):
    source = scramble(LxmertModel(tiny().to_transformers()))
    (tmp_path / "bare").mkdir()
    torch.save(source.state_dict(), tmp_path / "bare" / "pytorch_model.bin")
    model = LxmertFusion(tiny())
    report = load_lxmert_weights(model, tmp_path / "bare")
    assert report.layout == "bare" and not report.missing and not report.ignored
    batch = make_batch()
    with torch.no_grad():
        expected = source(**stock_inputs(batch)).pooled_output
    torch.testing.assert_close(pooled_of(model, batch), expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Weights: the original airsplay/lxmert layout, spelled from src/lxrt/modeling.py
# --------------------------------------------------------------------------------------------
def _put(out: dict, name: str, module: nn.Module) -> None:
    out[f"{name}.weight"] = module.weight.detach().clone()
    if getattr(module, "bias", None) is not None:
        out[f"{name}.bias"] = module.bias.detach().clone()


def _original_attention_block(out: dict, name: str, attention, output) -> None:
    """BertSelfattLayer / BertCrossattLayer: an attention (query, key, value) and BertAttOutput."""
    for proj in ("query", "key", "value"):
        _put(
            out,
            f"{name}.{'att' if name.endswith('visual_attention') else 'self'}.{proj}",
            getattr(attention, proj),
        )
    _put(out, f"{name}.output.dense", output.dense)
    _put(out, f"{name}.output.LayerNorm", output.LayerNorm)


def _original_bert_layer(out: dict, name: str, layer) -> None:
    """BertLayer: attention (BertSelfattLayer), intermediate.dense, output.{dense, LayerNorm}."""
    _original_attention_block(
        out, f"{name}.attention", layer.attention.self, layer.attention.output
    )
    _put(out, f"{name}.intermediate.dense", layer.intermediate.dense)
    _put(out, f"{name}.output.dense", layer.output.dense)
    _put(out, f"{name}.output.LayerNorm", layer.output.LayerNorm)


def _original_x_layer(out: dict, name: str, x) -> None:
    """LXRTXLayer: visual_attention (BertCrossattLayer), lang_self_att / visn_self_att
    (BertSelfattLayer), lang_inter / visn_inter (BertIntermediate), lang_output / visn_output
    (BertOutput)."""
    _original_attention_block(
        out, f"{name}.visual_attention", x.visual_attention.att, x.visual_attention.output
    )
    _original_attention_block(
        out, f"{name}.lang_self_att", x.lang_self_att.self, x.lang_self_att.output
    )
    _original_attention_block(
        out, f"{name}.visn_self_att", x.visn_self_att.self, x.visn_self_att.output
    )
    for side, inter, output in (
        ("lang", x.lang_inter, x.lang_output),
        ("visn", x.visn_inter, x.visn_output),
    ):
        _put(out, f"{name}.{side}_inter.dense", inter.dense)
        _put(out, f"{name}.{side}_output.dense", output.dense)
        _put(out, f"{name}.{side}_output.LayerNorm", output.LayerNorm)


def original_checkpoint(source: LxmertModel) -> dict[str, torch.Tensor]:
    """What airsplay/lxmert's LXRTPretraining, wrapped in DataParallel, saves for `source`'s
    weights: names from the original module tree, values from the matching transformers module
    (found by attribute, not by name), plus the pre-training heads."""
    out: dict[str, torch.Tensor] = collections.OrderedDict()
    emb, enc = source.embeddings, source.encoder
    for part in ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm"):
        _put(out, f"module.bert.embeddings.{part}", getattr(emb, part))
    for part in ("visn_fc", "visn_layer_norm", "box_fc", "box_layer_norm"):  # VisualFeatEncoder
        _put(out, f"module.bert.encoder.visn_fc.{part}", getattr(enc.visn_fc, part))
    for i, layer in enumerate(enc.layer):
        _original_bert_layer(out, f"module.bert.encoder.layer.{i}", layer)
    for i, layer in enumerate(enc.r_layers):
        _original_bert_layer(out, f"module.bert.encoder.r_layers.{i}", layer)
    for i, layer in enumerate(enc.x_layers):
        _original_x_layer(out, f"module.bert.encoder.x_layers.{i}", layer)
    _put(out, "module.bert.pooler.dense", source.pooler.dense)
    h = source.config.hidden_size
    heads = {
        "module.cls.predictions.bias": (source.config.vocab_size,),
        "module.cls.predictions.transform.dense.weight": (h, h),
        "module.cls.predictions.transform.LayerNorm.weight": (h,),
        "module.cls.predictions.decoder.weight": (source.config.vocab_size, h),
        "module.cls.seq_relationship.weight": (2, h),
        "module.obj_predict_head.transform.dense.weight": (h, h),
        "module.obj_predict_head.decoder_dict.obj.weight": (1600, h),
        "module.obj_predict_head.decoder_dict.attr.weight": (400, h),
        "module.obj_predict_head.decoder_dict.feat.weight": (source.config.visual_feat_dim, h),
        "module.answer_head.logit_fc.0.weight": (2 * h, h),
        "module.answer_head.logit_fc.0.bias": (2 * h,),
        "module.answer_head.logit_fc.2.weight": (2 * h,),
        "module.answer_head.logit_fc.2.bias": (2 * h,),
        "module.answer_head.logit_fc.3.weight": (9500, 2 * h),
        "module.answer_head.logit_fc.3.bias": (9500,),
    }
    out.update({k: torch.randn(shape) for k, shape in heads.items()})
    return out


def test_original_checkpoint_names_cover_the_whole_model():
    source = LxmertModel(tiny().to_transformers())
    ckpt = original_checkpoint(source)
    backbone = [k for k in ckpt if k.startswith("module.bert.")]
    assert len(backbone) == len(source.state_dict())
    for key in (  # spelled out from src/lxrt/modeling.py
        "module.bert.embeddings.word_embeddings.weight",
        "module.bert.encoder.layer.0.attention.self.query.weight",
        "module.bert.encoder.layer.1.attention.output.LayerNorm.bias",
        "module.bert.encoder.r_layers.0.intermediate.dense.weight",
        "module.bert.encoder.x_layers.0.visual_attention.att.query.weight",
        "module.bert.encoder.x_layers.0.visual_attention.output.dense.bias",
        "module.bert.encoder.x_layers.0.lang_self_att.self.value.weight",
        "module.bert.encoder.x_layers.0.visn_self_att.output.LayerNorm.weight",
        "module.bert.encoder.x_layers.0.lang_inter.dense.weight",
        "module.bert.encoder.x_layers.0.visn_output.LayerNorm.bias",
        "module.bert.encoder.visn_fc.visn_fc.weight",
        "module.bert.encoder.visn_fc.box_layer_norm.bias",
        "module.bert.pooler.dense.weight",
    ):
        assert key in ckpt, key


def test_load_original_lxrt_checkpoint(tmp_path):
    source = scramble(LxmertModel(tiny().to_transformers()))
    path = tmp_path / "Epoch20_LXRT.pth"
    torch.save(original_checkpoint(source), path)
    model = LxmertFusion(tiny())
    report = load_lxmert_weights(model, path, strict=True)
    assert report.layout == "original"
    assert len(report.loaded) == len(model.lxmert.state_dict())
    assert len(report.ignored) == 15 and "answer_head.logit_fc.3.weight" in report.ignored
    batch = make_batch()
    with torch.no_grad():
        expected = source(**stock_inputs(batch)).pooled_output
    torch.testing.assert_close(pooled_of(model, batch), expected, atol=1e-5, rtol=1e-5)


def test_other_feature_size_is_refused_unless_partial(tmp_path):
    state = {
        f"lxmert.{k}": v for k, v in LxmertModel(tiny().to_transformers()).state_dict().items()
    }
    state["lxmert.encoder.visn_fc.visn_fc.weight"] = torch.zeros(32, 2048)  # 2048-d features
    path = tmp_path / "wrong_feat_dim.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    with pytest.raises(WeightsError, match=r"wrong_feat_dim\.safetensors.*visual_feat_dim 2048"):
        load_lxmert_weights(LxmertFusion(tiny()), path)
    # partial: everything else loads, the misshapen tensor is reported and keeps its init
    report = load_lxmert_weights(LxmertFusion(tiny()), path, partial=True)
    assert report.skipped == ["lxmert.encoder.visn_fc.visn_fc.weight"]
    assert report.missing == ["encoder.visn_fc.visn_fc.weight"]
    assert "visual_feat_dim 2048 (file) vs 16 (model)" in str(report)


def test_missing_tensors_are_reported_and_strict_refuses_them(tmp_path):
    state = LxmertModel(tiny().to_transformers()).state_dict()
    del state["pooler.dense.weight"], state["pooler.dense.bias"]
    state["encoder.x_layers.7.lang_inter.dense.weight"] = torch.zeros(1)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"partial\.pth.*x_layers 8 \(file\) vs 1 \(model\)"):
        load_lxmert_weights(LxmertFusion(tiny()), path)
    report = load_lxmert_weights(LxmertFusion(tiny()), path, partial=True)
    assert report.missing == ["pooler.dense.bias", "pooler.dense.weight"]
    assert report.unexpected == ["encoder.x_layers.7.lang_inter.dense.weight"]
    assert "2 missing" in str(report) and "1 unexpected" in str(report)
    with pytest.raises(WeightsError, match=r"partial\.pth.*2 missing.*1 unexpected"):
        load_lxmert_weights(LxmertFusion(tiny()), path, strict=True, partial=True)


def test_not_an_lxmert_checkpoint(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"backbone.conv.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsError, match="other.pth"):
        load_lxmert_weights(LxmertFusion(tiny()), path)


# --------------------------------------------------------------------------------------------
# Weights: BERT into the language layers
# --------------------------------------------------------------------------------------------
def tiny_bert(hidden: int = 32, layers: int = 3) -> BertModel:
    config = BertConfig(
        vocab_size=TINY["vocab_size"],
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=TINY["max_position"],
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return scramble(BertModel(config))


def test_load_bert_language_layers(tmp_path):
    bert = tiny_bert(layers=3)  # one layer more than l_layers: it is ignored
    bert.save_pretrained(tmp_path / "bert")
    model = LxmertFusion(tiny())
    report = load_bert_language(model, tmp_path / "bert")
    assert report.missing == [] and report.unexpected == []
    assert any(k.startswith("encoder.layer.2.") for k in report.ignored)
    assert not any(k.startswith("encoder.layer.1.") for k in report.ignored)
    assert "pooler.dense.weight" in report.loaded
    assert not any(k.startswith(("encoder.x_layers", "encoder.r_layers")) for k in report.loaded)

    # LXMERT's language stream now computes BERT's first two layers.
    batch = make_batch()
    ids, mask = batch["text_ids"], batch["text_mask"]
    lx = model.lxmert.eval()
    with torch.no_grad():
        hidden = lx.embeddings(ids, torch.zeros_like(ids))
        additive = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
        for layer in lx.encoder.layer:
            hidden = layer(hidden, additive)[0]
        expected = bert(ids, attention_mask=mask.long(), output_hidden_states=True)
    real = mask[..., None]
    torch.testing.assert_close(
        hidden * real, expected.hidden_states[2] * real, atol=1e-5, rtol=1e-5
    )


def test_load_bert_legacy_names(tmp_path):
    """Old BERT releases: BertForPreTraining keys under `bert.`, LayerNorm gamma / beta."""
    bert = tiny_bert(layers=2)
    legacy = {
        "bert."
        + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
            "LayerNorm.bias", "LayerNorm.beta"
        ): v
        for k, v in bert.state_dict().items()
    }
    legacy["cls.predictions.bias"] = torch.zeros(TINY["vocab_size"])
    (tmp_path / "old-bert").mkdir()
    torch.save(legacy, tmp_path / "old-bert" / "pytorch_model.bin")
    model = LxmertFusion(tiny())
    report = load_bert_language(model, tmp_path / "old-bert")
    assert report.missing == [] and report.ignored == ["cls.predictions.bias"]
    torch.testing.assert_close(
        model.lxmert.encoder.layer[1].output.LayerNorm.weight,
        bert.encoder.layer[1].output.LayerNorm.weight,
    )


def test_bert_checkpoint_is_not_taken_for_an_lxmert_one(tmp_path):
    legacy = {"bert." + k: v for k, v in tiny_bert(layers=2).state_dict().items()}
    torch.save(legacy, tmp_path / "bert.pth")
    with pytest.raises(WeightsError, match=r"bert\.pth.*load_bert_language"):
        load_lxmert_weights(LxmertFusion(tiny()), tmp_path / "bert.pth")


def test_load_bert_hidden_size_must_match(tmp_path):
    tiny_bert(hidden=48).save_pretrained(tmp_path / "bert48")
    with pytest.raises(WeightsError, match="bert48.*hidden size 48"):
        load_bert_language(LxmertFusion(tiny()), tmp_path / "bert48")
