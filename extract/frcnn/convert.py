"""Checkpoint converters: three released BUTD checkpoints -> our (HF / detectron2) key layout.

- Hugging Face `unc-nlp/frcnn-vg-finetuned` folder (pytorch_model.bin + config.yaml): already
  our layout; detectron2 box convention.
- py-bottom-up-attention `faster_rcnn_from_caffe_attr.pkl`: pickle of {"model": {key: float32
  ndarray}}, our keys minus `num_batches_tracked` and the cell anchors; detectron2 convention.
  Unpickling runs code, so it is only done for a path the user named and allowed.
- MILVLG `bua-caffe-frcn-r101-k*.pth`: Caffe conventions, translated here:
  objectness (2A, C, 1, 1) softmax pairs [A background | A foreground] (MILVLG views the
  channels as (2, A) and takes index 1 as foreground) -> A sigmoid logits fg - bg;
  cls_score / cls_embed rows background-first -> background-last; bbox_pred (4 (C + 1), D)
  -> drop the background's 4 rows; attr_linear2 rows "no attribute"-first -> last;
  cls_embed / attr_linear1 / attr_linear2 -> cls_embedding / fc_attr / attr_score;
  BatchNorm `num_batches_tracked` dropped (the stats become frozen-norm buffers as they are).
  "+1" widths, (1, 1, 1, 1) weights and Caffe anchors are carried by the returned convention.

Every loader returns `(state_dict, BoxConvention)`; `load_frcnn_state` checks names and shapes
(`vlpipe.weights.load_into`). An HF
folder's config.yaml is read (yaml.safe_load) for the delta weights it states; its test-time
values are the `hf` conventions' business (conventions.py). `default_conventions` names the
test-time set each kind of checkpoint defaults to.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from vlpipe.io import load_pickle
from vlpipe.weights import LoadReport, load_into, read_state_dict, state_dict_of

from .config import BoxConvention, FrcnnConfig
from .conventions import (
    FrcnnConventions,
    hf_config_box_weights,
    read_hf_config,
    resolve_conventions,
)

ANCHOR_KEY = "proposal_generator.anchor_generator.cell_anchors.0"
_PREDICTOR = "roi_heads.box_predictor."
_OBJECTNESS = "proposal_generator.rpn_head.objectness_logits."
_IGNORED = ("num_batches_tracked", "pixel_mean", "pixel_std")
_CAFFE_RENAMES = {
    "cls_embed.": "cls_embedding.",
    "attr_linear1.": "fc_attr.",
    "attr_linear2.": "attr_score.",
}
HF_CONFIG_FILE = "config.yaml"

StateDict = dict[str, Tensor]


def _tensors(raw: Mapping[str, object]) -> StateDict:
    """Drop bookkeeping entries; NumPy arrays -> float32 / int64 tensors."""
    out: StateDict = {}
    for key, value in raw.items():
        if key.rsplit(".", 1)[-1] in _IGNORED:
            continue
        tensor = value if isinstance(value, Tensor) else torch.from_numpy(np.array(value))
        out[key] = tensor.float() if tensor.is_floating_point() else tensor
    return out


def convert_detectron2_state_dict(raw: Mapping[str, object]) -> StateDict:
    """HF or py-bottom-up-attention weights: same names as ours, bookkeeping dropped."""
    return _tensors(raw)


def _move_first_row_last(tensor: Tensor) -> Tensor:
    return torch.cat([tensor[1:], tensor[:1]], dim=0)


def convert_caffe_state_dict(raw: Mapping[str, object]) -> StateDict:
    """MILVLG Caffe-converted weights -> our layout (see the module docstring)."""
    out: StateDict = {}
    for key, tensor in _tensors(raw).items():
        if key == ANCHOR_KEY:
            continue  # runtime anchors come from the Caffe convention, not a config artefact
        if key.startswith(_PREDICTOR):
            key, tensor = _caffe_predictor_entry(key, tensor)
        elif key.startswith(_OBJECTNESS):
            half = tensor.shape[0] // 2
            tensor = tensor[half:] - tensor[:half]  # softmax(fg, bg)[fg] == sigmoid(fg - bg)
        out[key] = tensor
    return out


def _caffe_predictor_entry(key: str, tensor: Tensor) -> tuple[str, Tensor]:
    name = key[len(_PREDICTOR) :]
    for old, new in _CAFFE_RENAMES.items():
        if name.startswith(old):
            name = new + name[len(old) :]
    if name.startswith(("cls_score.", "cls_embedding.", "attr_score.")):
        tensor = _move_first_row_last(tensor)  # background / "no attribute" first -> last
    elif name.startswith("bbox_pred."):
        tensor = tensor[4:]  # the background's (dx, dy, dw, dh) rows
    return _PREDICTOR + name, tensor


def is_caffe_layout(state_dict: Mapping[str, object]) -> bool:
    """MILVLG names its attribute head cls_embed / attr_linear*, and keeps 2A objectness rows."""
    if any(k.startswith(_PREDICTOR + "cls_embed.") for k in state_dict):
        return True
    obj = state_dict.get(_OBJECTNESS + "weight")
    deltas = state_dict.get("proposal_generator.rpn_head.anchor_deltas.weight")
    return obj is not None and deltas is not None and obj.shape[0] * 2 == deltas.shape[0]


def config_from_state_dict(
    state_dict: Mapping[str, Tensor], convention: BoxConvention, **overrides
) -> FrcnnConfig:
    """Architecture sizes read off the tensor shapes (our layout); test-time settings default."""
    sd = state_dict

    def rows(key: str) -> int:
        return sd[key].shape[0]

    def count(prefix: str) -> int:
        return sum(1 for k in sd if k.startswith(prefix) and k.endswith(".conv1.weight"))

    inferred = dict(
        stage_blocks=(count("backbone.res2."), count("backbone.res3."), count("backbone.res4.")),
        res5_blocks=count("roi_heads.res5."),
        stem_channels=rows("backbone.stem.conv1.weight"),
        res2_channels=rows("backbone.res2.0.conv3.weight"),
        bottleneck_channels=rows("backbone.res2.0.conv1.weight"),
        rpn_channels=rows("proposal_generator.rpn_head.conv.weight"),
        num_classes=rows(_PREDICTOR + "cls_score.weight") - 1,
        num_attributes=rows(_PREDICTOR + "attr_score.weight") - 1,
        class_embed_dim=sd[_PREDICTOR + "cls_embedding.weight"].shape[1],
        attr_hidden_dim=rows(_PREDICTOR + "fc_attr.weight"),
        convention=convention,
    )
    inferred.update(overrides)
    return FrcnnConfig(**inferred)


def load_frcnn_state(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "state dict"
) -> LoadReport:
    """Copy `state_dict` into `model` (strictly: see `vlpipe.weights.load_into`). The cell
    anchors may be absent (then the model keeps the ones its box convention generated)."""
    provided = dict(state_dict)
    expected = model.state_dict()
    if ANCHOR_KEY in expected:
        provided.setdefault(ANCHOR_KEY, expected[ANCHOR_KEY])
    return load_into(model, provided, source)


def hf_config_file(path: str | Path) -> Path | None:
    """The config.yaml of an HF model folder, if `path` is one and has it."""
    candidate = Path(path) / HF_CONFIG_FILE
    return candidate if Path(path).is_dir() and candidate.is_file() else None


def load_hf_folder(path: str | Path) -> tuple[StateDict, BoxConvention]:
    """`unc-nlp/frcnn-vg-finetuned`-style folder (model.safetensors or pytorch_model.bin, and
    config.yaml, whose ROI_BOX_HEAD / RPN BBOX_REG_WEIGHTS are honoured when present)."""
    convention = BoxConvention.detectron2()
    config = hf_config_file(path)
    if config is not None:
        convention = replace(convention, **hf_config_box_weights(read_hf_config(config)))
    return convert_detectron2_state_dict(read_state_dict(path)), convention


def load_detectron2_pickle(
    path: str | Path, *, allow_pickle: bool = False
) -> tuple[StateDict, BoxConvention]:
    """py-bottom-up-attention .pkl, only with `allow_pickle` (unpickling executes code: only
    for a file you trust)."""
    raw = state_dict_of(load_pickle(path, allow_pickle=allow_pickle), path)
    return convert_detectron2_state_dict(raw), BoxConvention.detectron2()


def load_torch_file(path: str | Path) -> tuple[StateDict, BoxConvention]:
    """A .pth / .pt / .bin state dict; the layout (MILVLG Caffe or HF) is read off the keys."""
    raw = read_state_dict(path)
    if is_caffe_layout(raw):
        return convert_caffe_state_dict(raw), BoxConvention.caffe()
    return convert_detectron2_state_dict(raw), BoxConvention.detectron2()


def load_checkpoint(
    path: str | Path, *, allow_pickle: bool = False
) -> tuple[StateDict, BoxConvention]:
    """Read any of the three checkpoints -> (state dict in our layout, its box convention).

    A folder is read as a Hugging Face download; `.pkl` as a py-bottom-up-attention pickle,
    only with `allow_pickle=True`; anything else with `torch.load(weights_only=True)`.
    """
    path = Path(path)
    if path.is_dir():
        return load_hf_folder(path)
    if path.suffix == ".pkl":
        return load_detectron2_pickle(path, allow_pickle=allow_pickle)
    return load_torch_file(path)


def default_conventions(path: str | Path, convention: BoxConvention) -> str:
    """The test-time set a checkpoint defaults to: `hf` for a Hugging Face folder or an
    HF-layout file (the port is where they come from), `caffe` for the Caffe-trained MILVLG
    .pth and the py-bottom-up-attention .pkl (converted from the Caffe model whose
    generate_tsv.py features LXMERT used)."""
    path = Path(path)
    if convention.name == "caffe" or path.suffix == ".pkl":
        return "caffe"
    return "hf"


def checkpoint_conventions(
    path: str | Path, convention: BoxConvention, name: str | None = None, **resolve_options
) -> tuple[FrcnnConventions, dict]:
    """Resolve the test-time set for a checkpoint: `name` or its default, the folder's
    config.yaml applied when the set is `hf` (see `resolve_conventions`)."""
    config = hf_config_file(path)
    return resolve_conventions(
        name,
        default=default_conventions(path, convention),
        hf_config=read_hf_config(config) if config is not None else None,
        hf_config_path=str(config) if config is not None else None,
        **resolve_options,
    )


def model_from_state_dict(
    state_dict: StateDict,
    convention: BoxConvention,
    conventions: FrcnnConventions,
    *,
    source: str = "state dict",
    **overrides,
) -> nn.Module:
    """A `BUTDFasterRCNN` sized from the shapes (`overrides` for config fields), filled with
    `state_dict`, in eval mode."""
    from .model import BUTDFasterRCNN

    model = BUTDFasterRCNN(config_from_state_dict(state_dict, convention, **overrides), conventions)
    load_frcnn_state(model, state_dict, source=source)
    return model.eval()


def build_from_checkpoint(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    conventions: FrcnnConventions | None = None,
    **overrides,
) -> nn.Module:
    """Load `path`, build a matching `BUTDFasterRCNN` (sizes from the shapes, `overrides` for
    config fields such as anchor_sizes), fill it and switch it to eval mode. `conventions`:
    the test-time set (default: the checkpoint's, with an HF folder's config.yaml)."""
    state_dict, convention = load_checkpoint(path, allow_pickle=allow_pickle)
    if conventions is None:
        conventions, _ = checkpoint_conventions(path, convention)
    return model_from_state_dict(state_dict, convention, conventions, source=str(path), **overrides)
