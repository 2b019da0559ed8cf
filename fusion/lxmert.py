"""LXMERT (Tan & Bansal, 2019): language, object-relationship and cross-modality encoders over
word tokens and detector regions; the pooled [CLS] of the language stream feeds the task heads.

The network is transformers' `LxmertModel`, so parameter names follow the Hugging Face layout;
only its attention is switched to scaled_dot_product_attention (`attention.use_sdpa`).

Weights come from local files only, through separate functions:
- `read_lxmert_checkpoint`: a Hugging Face LXMERT folder or file (unc-nlp/lxmert-base-uncased,
  LxmertForQuestionAnswering: `lxmert.*` keys, or the bare `LxmertModel` layout), the original
  pre-trained checkpoint of airsplay/lxmert (`Epoch20_LXRT.pth`: `module.bert.*`) or its
  fine-tuned task models (`BEST.pth` / `LAST.pth`: `lxrt_encoder.model.[module.]bert.*` and
  `logit_fc.*`), sorted into backbone, answer head and the architecture they hold.
- `load_lxmert_weights` / `load_backbone`: the backbone into an LxmertFusion; a file of another
  architecture is an error unless a partial load is asked for. Heads are not loaded here (see
  pipelines/lxmert_import.py for the answer head).
- `load_bert_language`: embeddings, the first language layers and the pooler from a Hugging Face
  BERT folder, as LXMERT's code does before pre-training unless --fromScratch (which the
  released recipe passes: it pre-trains from random weights).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import LxmertConfig, LxmertModel

from vlpipe.errors import ConfigError
from vlpipe.fusion.attention import check_heads, language_only_tail, use_sdpa
from vlpipe.fusion.heads import head_names
from vlpipe.tokenizer import BERT_VOCAB_SIZE
from vlpipe.weights import LoadReport, WeightsError, load_into, read_state_dict


@dataclass
class LxmertFusionConfig:
    l_layers: int = 9
    r_layers: int = 5
    x_layers: int = 5
    hidden: int = 768
    heads: int = 12
    intermediate: int = 3072
    vocab_size: int = BERT_VOCAB_SIZE
    visual_feat_dim: int = 2048
    visual_pos_dim: int = 4  # normalised xyxy boxes, as LXMERT was pre-trained with
    dropout: float = 0.1
    max_position: int = 512
    type_vocab_size: int = 2

    def to_transformers(self) -> LxmertConfig:
        check_heads(self.hidden, self.heads, "lxmert")
        if self.x_layers < 1:
            raise ConfigError(
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

    needs = ("text_ids", "text_mask", "region_feats", "region_boxes", "region_mask")

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
        region_feats: torch.Tensor,
        region_boxes: torch.Tensor,
        region_mask: torch.Tensor,
    ) -> torch.Tensor:
        """text_ids, text_mask: B, L; region_feats: B, K, Dv; region_boxes: B, K, 4 (xyxy in
        [0, 1]); region_mask: B, K (True = real region) -> pooled B, H."""
        out = self.lxmert(
            input_ids=text_ids,
            attention_mask=text_mask,
            visual_feats=region_feats,
            visual_pos=region_boxes,
            visual_attention_mask=region_mask,
            return_dict=True,
        )
        return out.pooled_output


# --- weight loading -----------------------------------------------------------------------

# Backbone prefix of each checkpoint layout. The original code (airsplay/lxmert, LXRTModel under
# `bert`) and transformers (LxmertModel under `lxmert`) use the same module names below the
# prefix, e.g. `encoder.x_layers.0.visual_attention.att.query.weight`; `read_state_dict` has
# already removed the DataParallel `module.` of the original files. The original task models
# (VQAModel, GQAModel, NLVR2Model) hold LXRTFeatureExtraction as `lxrt_encoder.model`.
LAYOUTS = {
    "huggingface": "lxmert.",
    "original": "bert.",
    "original-task": "lxrt_encoder.model.bert.",
    "bare": "",
}
# Pre-training heads of both LxmertForPreTraining and the original LXRTPretraining.
PRETRAINING_HEADS = ("cls.", "obj_predict_head.")
# The answer head (`logit_fc`) of LxmertForQuestionAnswering and of both pre-training models
# (9,500 answers there), and of the original task models.
ANSWER_HEADS = ("answer_head.logit_fc.", "logit_fc.")
HEAD_PREFIXES = PRETRAINING_HEADS + ANSWER_HEADS
# buffers some files carry that are no weights of ours
_BUFFERS = ("embeddings.position_ids",)
_LEGACY_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}
# `--multiGPU` wraps only the encoder of a task model in DataParallel
_TASK_DATAPARALLEL = ("lxrt_encoder.model.module.", "lxrt_encoder.model.")
_BERT_LAYER = re.compile(r"encoder\.layer\.(\d+)\.")
# The architecture a file holds: layer counts from the keys, sizes from tensor shapes
# (LxmertFusionConfig field -> (backbone tensor, dimension)), all under LxmertConfig's names in a
# config.json. No tensor records the number of attention heads.
_STACKS = {
    "l_layers": "encoder.layer.",
    "r_layers": "encoder.r_layers.",
    "x_layers": "encoder.x_layers.",
}
_SIZES = {
    "hidden": ("embeddings.word_embeddings.weight", 1),
    "vocab_size": ("embeddings.word_embeddings.weight", 0),
    "max_position": ("embeddings.position_embeddings.weight", 0),
    "type_vocab_size": ("embeddings.token_type_embeddings.weight", 0),
    "intermediate": ("encoder.x_layers.0.lang_inter.dense.weight", 0),
    "visual_feat_dim": ("encoder.visn_fc.visn_fc.weight", 1),
    "visual_pos_dim": ("encoder.visn_fc.box_fc.weight", 1),
}
_CONFIG_JSON = {
    "l_layers": "l_layers",
    "r_layers": "r_layers",
    "x_layers": "x_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "intermediate": "intermediate_size",
    "vocab_size": "vocab_size",
    "max_position": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "visual_feat_dim": "visual_feat_dim",
    "visual_pos_dim": "visual_pos_dim",
}


@dataclass
class LxmertCheckpoint:
    """One LXMERT checkpoint, read and sorted. `backbone` uses LxmertModel's names, `head` the
    answer head's under ClassifierHead's (`net.1.weight`, ...; empty when the file has none);
    `ignored` / `unexpected` use the file's names."""

    source: str
    layout: str
    backbone: dict[str, torch.Tensor] = field(default_factory=dict)
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    arch: dict[str, int] = field(default_factory=dict)  # LxmertFusionConfig fields of the file
    arch_from: str = "tensor shapes"
    labels: list[str] | None = None  # the head's answers, from a config.json's id2label
    ignored: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    @property
    def head_shape(self) -> tuple[int, int] | None:
        """(inputs, answers) of the answer head, None without one."""
        if not self.head:
            return None
        return self.head["net.1.weight"].shape[1], self.head["net.4.weight"].shape[0]

    def fusion_config(self) -> LxmertFusionConfig:
        """The model this file holds. Without a config.json the attention heads are LXMERT's
        (12): no tensor shape records them."""
        config = LxmertFusionConfig(**self.arch)
        if "heads" not in self.arch and config.hidden % config.heads:
            raise WeightsError(
                f"{self.source}: hidden size {config.hidden} is not a multiple of LXMERT's "
                f"{config.heads} attention heads, and no config.json says how many it has: put "
                "its LxmertConfig config.json beside the file"
            )
        return config


def read_lxmert_checkpoint(path: str | Path) -> LxmertCheckpoint:
    """Read any of the LXMERT layouts (see LAYOUTS) and the folder's config.json when present."""
    state = {_canonical(k): v for k, v in read_state_dict(path).items()}
    layout = _detect_layout(state, path)
    prefix = LAYOUTS[layout]
    ckpt, head = LxmertCheckpoint(str(path), layout), {}
    for key, value in state.items():
        if key.startswith(ANSWER_HEADS):
            head[key.removeprefix("answer_head.")] = value
            ckpt.ignored.append(key)
        elif key.startswith(PRETRAINING_HEADS) or key.endswith(_BUFFERS):
            ckpt.ignored.append(key)
        elif key.startswith(prefix):
            ckpt.backbone[key.removeprefix(prefix)] = value
        else:
            ckpt.unexpected.append(key)
    ckpt.head = head_names(head, path) if head else {}
    config = _config_json(path)
    ckpt.arch, ckpt.arch_from = _architecture(ckpt.backbone, config, path)
    ckpt.labels = _config_labels(config, ckpt.head_shape)
    return ckpt


def load_lxmert_weights(
    model: LxmertFusion, path: str | Path, *, strict: bool = False, partial: bool = False
) -> LoadReport:
    """Load the backbone of an LXMERT checkpoint (any layout of `read_lxmert_checkpoint`) into
    `model`; see `load_backbone`. Returns a `LoadReport`."""
    return load_backbone(model, read_lxmert_checkpoint(path), strict=strict, partial=partial)


def load_backbone(
    model: LxmertFusion, ckpt: LxmertCheckpoint, *, strict: bool = False, partial: bool = False
) -> LoadReport:
    """A checkpoint whose architecture (layer counts, sizes, config.json's heads) differs from
    the model's is an error naming the file and both values, unless `partial`: then what fits
    loads and the rest is reported (missing, unexpected, skipped). Misshapen tensors are an error
    naming the file; with `strict`, so are missing and unexpected backbone tensors."""
    differences = architecture_differences(ckpt, model.config)
    if differences and not partial:
        raise WeightsError(
            f"{ckpt.source}: the checkpoint's architecture differs from the model's: "
            f"{'; '.join(differences)} (the file's from its {ckpt.arch_from}). Configure the "
            "model like the checkpoint (e.g. --model-config) or ask for a partial load "
            "(--partial-init)"
        )
    report = load_into(
        model.lxmert,
        ckpt.backbone,
        ckpt.source,
        layout=ckpt.layout,
        strict=strict,
        partial=partial,
        prefix=LAYOUTS[ckpt.layout],
        unexpected=ckpt.unexpected,
        ignored=ckpt.ignored,
    )
    if differences:
        report.notes.append(f"partial load: {'; '.join(differences)}")
    if "heads" not in ckpt.arch:
        report.notes.append(
            f"attention heads: not recorded in the file (no config.json); "
            f"the model's {model.config.heads} assumed"
        )
    return report


def architecture_differences(ckpt: LxmertCheckpoint, config: LxmertFusionConfig) -> list[str]:
    """'name file-value vs model-value' for every architecture field that differs."""
    return [
        f"{name} {value} (file) vs {getattr(config, name)} (model)"
        for name, value in ckpt.arch.items()
        if getattr(config, name) != value
    ]


def load_bert_language(model: nn.Module, bert_folder: str | Path) -> LoadReport:
    """Initialise the word / position / type embeddings, the first min(l_layers, BERT layers)
    language layers and the pooler of `model.lxmert` (an LxmertFusion or the pre-training
    model) from a Hugging Face BERT folder (BertModel or BertForPreTraining keys). The original
    LXMERT code loads the same tensors from bert-base-uncased, the pooler included; BERT
    layers beyond l_layers are ignored."""
    config = getattr(model.config, "backbone", model.config)
    state = {_canonical(k): v for k, v in read_state_dict(bert_folder).items()}
    if any(k.startswith("bert.") for k in state):  # BertForPreTraining / old BERT releases
        state = {k.removeprefix("bert."): v for k, v in state.items()}
    _check_hidden(state, config.hidden, bert_folder)
    l_layers = config.l_layers
    return load_into(
        model.lxmert,
        state,
        bert_folder,
        layout="bert",
        strict=False,
        ignore=lambda key: not _is_language_key(key, l_layers),
    )


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
        f"bert.encoder.x_layers.*, lxrt_encoder.model.bert.encoder.x_layers.* or "
        f"encoder.x_layers.*){hint}; first keys: {list(state)[:5]}"
    )


def _canonical(key: str) -> str:
    """Old BERT checkpoints (TF-converted, e.g. bert-base-uncased's pytorch_model.bin) name
    LayerNorm parameters gamma / beta; task models trained with --multiGPU hold the encoder as
    `lxrt_encoder.model.module`."""
    if key.startswith(_TASK_DATAPARALLEL[0]):
        key = _TASK_DATAPARALLEL[1] + key.removeprefix(_TASK_DATAPARALLEL[0])
    for old, new in _LEGACY_NAMES.items():
        if key.endswith(old):
            return key.removesuffix(old) + new
    return key


def _config_json(path: str | Path) -> dict | None:
    """The LxmertConfig saved with the weights (a folder's config.json, or the one beside a
    weights file), None when there is none."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not file.is_file():
        return None
    try:
        config = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise WeightsError(f"{file}: unreadable config.json ({err})") from err
    return config if isinstance(config, dict) and config.get("model_type") == "lxmert" else None


def _architecture(
    backbone: dict[str, torch.Tensor], config: dict | None, path: str | Path
) -> tuple[dict[str, int], str]:
    """Layer counts and sizes the tensors hold, with config.json's values (heads) when there is
    one; a config.json that contradicts the tensors is an error."""
    arch = {name: _depth(backbone, stem) for name, stem in _STACKS.items()}
    for name, (key, dim) in _SIZES.items():
        if key in backbone:
            arch[name] = backbone[key].shape[dim]
    if config is None:
        return arch, "tensor shapes"
    stated = {ours: config[theirs] for ours, theirs in _CONFIG_JSON.items() if theirs in config}
    wrong = [f"{k} {stated[k]} vs {arch[k]}" for k in arch if k in stated and stated[k] != arch[k]]
    if wrong:
        raise WeightsError(f"{path}: config.json contradicts the weights: {', '.join(wrong)}")
    return {**arch, **stated}, "config.json and tensor shapes"


def _depth(backbone: dict[str, torch.Tensor], stem: str) -> int:
    """Number of layers of one stack: the largest index under `stem`, plus one."""
    indices = [int(k[len(stem) :].split(".", 1)[0]) for k in backbone if k.startswith(stem)]
    return max(indices, default=-1) + 1


def _config_labels(config: dict | None, head_shape: tuple[int, int] | None) -> list[str] | None:
    """config.json's id2label when it names every answer of the head (not transformers'
    placeholder LABEL_0, LABEL_1, ...)."""
    if config is None or head_shape is None:
        return None
    id2label = {str(k): v for k, v in (config.get("id2label") or {}).items()}
    labels = [id2label.get(str(i)) for i in range(head_shape[1])]
    if None in labels or all(re.fullmatch(r"LABEL_\d+", str(label)) for label in labels):
        return None
    return [str(label) for label in labels]


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
