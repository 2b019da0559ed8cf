"""CrossFusion ("BERT + k CrossAtt"): shapes, gradients, masking, SDPA against transformers'
attention, and a few steps that fit one batch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.models.lxmert.modeling_lxmert import LxmertAttention, LxmertXLayer

from tests.fusion_fixtures import assert_fits_one_batch
from vlpipe.fusion.attention import LanguageTailXLayer, SdpaLxmertAttention
from vlpipe.fusion.cross import CrossFusion, CrossFusionConfig

TINY = dict(layers=2, hidden=32, heads=2, intermediate=64, text_dim=24, visual_feat_dim=16)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from threads; on a busy machine waiting threads cost seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(**overrides) -> CrossFusionConfig:
    return CrossFusionConfig(**{**TINY, **overrides})


def make_batch(seed: int = 0, batch: int = 3, tokens: int = 6, regions: int = 5) -> dict:
    """Padded tokens (lengths 6, 4, 2) and padded regions (5, 3, 1)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "text_feats": torch.randn(batch, tokens, TINY["text_dim"], generator=g),
        "text_mask": torch.arange(tokens)[None] < torch.tensor([6, 4, 2])[:, None],
        "region_feats": torch.randn(batch, regions, TINY["visual_feat_dim"], generator=g),
        "region_boxes": torch.rand(batch, regions, 4, generator=g),
        "region_mask": torch.arange(regions)[None] < torch.tensor([5, 3, 1])[:, None],
    }


def pooled_of(model: nn.Module, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(**{k: batch[k] for k in model.needs})


def test_forward_shape_and_interface():
    model = CrossFusion(tiny())
    assert model.output_dim == 32
    assert CrossFusion.needs == (
        "text_feats",
        "text_mask",
        "region_feats",
        "region_boxes",
        "region_mask",
    )
    assert pooled_of(model, make_batch()).shape == (3, 32)
    assert len(model.layers) == 2


def test_every_trainable_parameter_gets_a_finite_gradient():
    model = CrossFusion(tiny()).train()
    batch = make_batch()
    model(**batch).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    dead = tuple(f"layers.1.{part}." for part in ("visn_self_att", "visn_inter", "visn_output"))
    assert frozen and all(n.startswith(dead) for n in frozen)


def test_masked_regions_and_padded_tokens_do_not_change_the_output():
    model = CrossFusion(tiny())
    batch = make_batch()
    changed = dict(batch)
    changed["text_feats"] = torch.where(batch["text_mask"][..., None], batch["text_feats"], 9.0)
    pad = ~batch["region_mask"][..., None]
    changed["region_feats"] = torch.where(pad, -50.0, batch["region_feats"])
    changed["region_boxes"] = torch.where(pad, 0.25, batch["region_boxes"])
    torch.testing.assert_close(pooled_of(model, changed), pooled_of(model, batch))
    changed["text_feats"] = batch["text_feats"].clone()
    changed["text_feats"][:, 1] += 1.0  # a real token does matter
    assert not torch.allclose(pooled_of(model, changed), pooled_of(model, batch), atol=1e-4)


def test_sdpa_equals_transformers_attention():
    model = CrossFusion(tiny(dropout=0.0)).eval()
    assert sum(isinstance(m, SdpaLxmertAttention) for m in model.modules()) == 3 * 2
    stock = copy.deepcopy(model)
    for module in stock.modules():
        if isinstance(module, SdpaLxmertAttention):
            module.__class__ = LxmertAttention  # back to transformers' matmul + softmax
        if isinstance(module, LanguageTailXLayer):
            module.__class__ = LxmertXLayer  # computes the visual stream too
    batch = make_batch()
    torch.testing.assert_close(
        pooled_of(model, batch), pooled_of(stock, batch), atol=1e-5, rtol=1e-5
    )


def test_few_steps_fit_one_batch():
    torch.manual_seed(0)
    assert_fits_one_batch(CrossFusion(tiny(dropout=0.0)), make_batch())


def test_config_needs_a_layer():
    with pytest.raises(ValueError, match="layers"):
        CrossFusion(tiny(layers=0))
