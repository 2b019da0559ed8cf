"""LXMERT (Tan & Bansal, 2019): language, object-relationship and cross-modality encoders over
word tokens and detector regions; the pooled [CLS] of the language stream feeds the task heads.

The network is transformers' `LxmertModel`, so parameter names follow the Hugging Face layout;
only its attention is switched to scaled_dot_product_attention (`attention.use_sdpa`).

Weights come from local files only, through separate functions:
- `load_lxmert_weights`: a Hugging Face LXMERT folder or file (unc-nlp/lxmert-base-uncased:
  `lxmert.*` keys, or the bare `LxmertModel` layout) or the original checkpoint of
  airsplay/lxmert (`Epoch20_LXRT.pth`: `module.bert.*` keys). Pre-training heads are ignored.
- `load_bert_language`: embeddings, the first language layers and the pooler from a Hugging Face
  BERT folder, as LXMERT initialises them before pre-training.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import LxmertConfig, LxmertModel

from vlpipe.fusion.attention import language_only_tail, use_sdpa
from vlpipe.weights import WeightsError, read_state_dict


@dataclass
class LxmertFusionConfig:
    l_layers: int = 9
    r_layers: int = 5
    x_layers: int = 5
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    vocab_size: int = 30522
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4  # normalised xyxy boxes, as LXMERT was pre-trained with
    dropout: float = 0.1
    max_position: int = 512
    type_vocab_size: int = 2

    def to_transformers(self) -> LxmertConfig:
        if self.x_layers < 1:
            raise ValueError(
                "LxmertFusion needs x_layers >= 1: the pooled output is read after "
                "the cross-modality layers"
            )
        return LxmertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden,
            num_attention_heads=self.heads,
            intermediate_size=self.intermediate,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            max_position_embeddings=self.max_position,
            type_vocab_size=self.type_vocab_size,
            l_layers=self.l_layers,
            r_layers=self.r_layers,
            x_layers=self.x_layers,
            visual_feat_dim=self.visual_feat_dim,
            visual_pos_dim=self.visual_pos_dim,
        )


class LxmertFusion(nn.Module):
    """LXMERT over token ids and region features; returns the pooled output (B, hidden).

    The last cross layer's visual stream cannot reach the pooled output, so it is neither
    computed nor trained (see `attention.language_only_tail`); its weights still load and save."""

    needs = ("text_ids", "text_mask", "image_feats", "image_boxes", "image_mask")

    def __init__(self, config: LxmertFusionConfig):
        super().__init__()
        self.config = config
        self.output_dim = config.hidden
        self.lxmert = LxmertModel(config.to_transformers())
        use_sdpa(self.lxmert)
        language_only_tail(self.lxmert.encoder.x_layers[-1])

    def forward(
        self,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        image_feats: torch.Tensor,
        image_boxes: torch.Tensor,
        image_mask: torch.Tensor,
    ) -> torch.Tensor:
        """text_ids, text_mask: B, L; image_feats: B, K, Dv; image_boxes: B, K, 4 (xyxy in
        [0, 1]); image_mask: B, K (True = real region) -> pooled B, H."""
        out = self.lxmert(
            input_ids=text_ids,
            attention_mask=text_mask,
            visual_feats=image_feats,
            visual_pos=image_boxes,
            visual_attention_mask=image_mask,
            return_dict=True,
        )
        return out.pooled_output


# --- weight loading -----------------------------------------------------------------------

# Backbone prefix of each checkpoint layout. The original code (airsplay/lxmert, LXRTModel under
# `bert`) and transformers (LxmertModel under `lxmert`) use the same module names below the
# prefix, e.g. `encoder.x_layers.0.visual_attention.att.query.weight`; `read_state_dict` has
# already removed the DataParallel `module.` of the original files.
LAYOUTS = {"huggingface": "lxmert.", "original": "bert.", "bare": ""}
# Pre-training heads of both LxmertForPreTraining and the original LXRTPretraining, and the
# answer head of LxmertForQuestionAnswering: not part of the fusion model.
HEAD_PREFIXES = ("cls.", "obj_predict_head.", "answer_head.")
_LEGACY_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
_BERT_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")


@dataclass
class LoadReport:
    """What a weight loader did. `loaded` / `missing` use the model's names (below `lxmert.`);
    `unexpected` / `ignored` use the file's names."""

    source: str
    layout: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"{self.source} ({self.layout} layout): loaded {len(self.loaded)} tensors"]
        groups = (
            ("missing (model keeps its initial values)", self.missing),
            ("unexpected (in the file, not in the model; not loaded)", self.unexpected),
            ("ignored (heads / layers the model does not use)", self.ignored),
        )
        for what, keys in groups:
            if keys:
                lines.append(f"  {len(keys)} {what}: {_preview(keys)}")
        return "\n".join(lines)


def load_lxmert_weights(
    model: LxmertFusion, path: str | Path, *, strict: bool = False
) -> LoadReport:
    """Load an LXMERT checkpoint (Hugging Face folder / file, or the original `*_LXRT.pth`) into
    `model`. Misshapen tensors are an error naming the file; with `strict`, so are missing and
    unexpected backbone tensors. Returns a `LoadReport`."""
    state = {_modern_name(k): v for k, v in read_state_dict(path).items()}
    layout = _detect_layout(state, path)
    prefix = LAYOUTS[layout]
    mapped, report = {}, LoadReport(str(path), layout)
    for key, value in state.items():
        if key.startswith(HEAD_PREFIXES):
            report.ignored.append(key)
        elif key.startswith(prefix):
            mapped[key.removeprefix(prefix)] = value
        else:
            report.unexpected.append(key)
    _copy_into(model.lxmert, mapped, report, model.lxmert.state_dict().keys(), prefix)
    if strict and (report.missing or report.unexpected):
        raise WeightsError(f"strict load failed:\n{report}")
    return report


def load_bert_language(model: LxmertFusion, bert_folder: str | Path) -> LoadReport:
    """Initialise the word / position / type embeddings, the first min(l_layers, BERT layers)
    language layers and the pooler from a Hugging Face BERT folder (BertModel or
    BertForPreTraining keys). The original LXMERT code loads the same tensors from
    bert-base-uncased, the pooler included; BERT layers beyond l_layers are ignored."""
    state = {_modern_name(k): v for k, v in read_state_dict(bert_folder).items()}
    if any(k.startswith("bert.") for k in state):  # BertForPreTraining / old BERT releases
        state = {k.removeprefix("bert."): v for k, v in state.items()}
    _check_hidden(state, model.config.hidden, bert_folder)
    target = model.lxmert.state_dict()
    language = [k for k in target if _is_language_key(k, model.config.l_layers)]
    mapped, report = {}, LoadReport(str(bert_folder), "bert")
    for key, value in state.items():
        if _is_language_key(key, model.config.l_layers) and key in target:
            mapped[key] = value
        else:
            report.ignored.append(key)
    _copy_into(model.lxmert, mapped, report, language)
    return report


def _detect_layout(state: dict[str, torch.Tensor], path: str | Path) -> str:
    """The layout whose prefix holds cross-modality layers; a BERT checkpoint (`bert.encoder.
    layer.*` without `x_layers`) is refused rather than half-loaded as an original one."""
    for layout, prefix in LAYOUTS.items():
        if any(k.startswith(prefix + "encoder.x_layers.") for k in state):
            return layout
    bert = any(".layer." in k for k in state)
    hint = " (a BERT checkpoint? load it with load_bert_language)" if bert else ""
    raise WeightsError(
        f"{path}: no LXMERT cross-modality layers (lxmert.encoder.x_layers.*, "
        f"bert.encoder.x_layers.* or encoder.x_layers.*){hint}; first keys: {list(state)[:5]}"
    )


def _modern_name(key: str) -> str:
    """Old BERT checkpoints (TF-converted, e.g. bert-base-uncased's pytorch_model.bin) name
    LayerNorm parameters gamma / beta."""
    for old, new in _LEGACY_NAMES.items():
        if key.endswith(old):
            return key.removesuffix(old) + new
    return key


def _is_language_key(key: str, l_layers: int) -> bool:
    if key.startswith("embeddings."):
        return key != "embeddings.position_ids"  # a buffer some BERT files carry; not ours
    if key.startswith("pooler."):
        return True
    layer = _BERT_LAYER.match(key)
    return layer is not None and int(layer.group(1)) < l_layers


def _check_hidden(state: dict[str, torch.Tensor], hidden: int, path: str | Path) -> None:
    words = state.get("embeddings.word_embeddings.weight")
    if words is None:
        raise WeightsError(f"{path}: no embeddings.word_embeddings.weight: not a BERT checkpoint")
    if words.shape[1] != hidden:
        raise WeightsError(
            f"{path}: BERT hidden size {words.shape[1]} does not match the "
            f"LXMERT hidden size {hidden}"
        )


def _copy_into(
    target: nn.Module,
    mapped: dict[str, torch.Tensor],
    report: LoadReport,
    expected: Iterable[str],
    prefix: str = "",
) -> None:
    """Copy `mapped` (target's names; the file's names less `prefix`) into `target` after
    checking every shape; fills the report's loaded / missing / unexpected lists."""
    own = target.state_dict()
    report.unexpected += sorted(prefix + k for k in mapped if k not in own)
    known = {k: v for k, v in mapped.items() if k in own}
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in known.items()
        if v.shape != own[k].shape
    ]
    if wrong:
        raise WeightsError(
            f"{report.source}: {len(wrong)} tensors do not fit the model "
            f"({report.layout} layout): {_preview(wrong)}"
        )
    target.load_state_dict(known, strict=False)
    report.loaded = sorted(known)
    report.missing = sorted(k for k in expected if k not in known)


def _preview(keys: list[str], limit: int = 8) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more
