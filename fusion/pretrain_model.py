"""LXMERT's pre-training model: the LXMERT backbone with the heads of its five tasks.

Parameter names are those of transformers' `LxmertForPreTraining` (`lxmert.*`, `cls.*`,
`obj_predict_head.*`, `answer_head.*`), which are the original LXRTPretraining's below its
`bert.` prefix; the heads are transformers' own modules, so `export_huggingface` is a copy
and `export_original` a renaming.

The tasks (names as logged, in LXMERT's order Mask_LM, Matched, Obj, Attr, Feat, QA):
    mlm      masked cross-modality language modelling (`cls.predictions`, tied to the words)
    matched  cross-modality matching on the pooled output (`cls.seq_relationship`)
    obj      masked object label classification (`obj_predict_head.decoder_dict.obj`)
    attr     masked attribute classification (`obj_predict_head.decoder_dict.attr`)
    feat     masked object feature regression (`obj_predict_head.decoder_dict.feat`)
    qa       image question answering over the answer table (`answer_head`)
Every head transformers builds for the tasks' config flags exists here too, so an export
loads with nothing missing; the heads of tasks that are off are frozen (they receive no
gradient, and DistributedDataParallel must not wait for one).

The losses are computed outside the model (`pretrain_losses.py`); `forward` returns the
head outputs, the language-model scores only at the masked positions.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import LxmertConfig, LxmertModel
from transformers.models.lxmert.modeling_lxmert import (
    LxmertPreTrainingHeads,
    LxmertVisualAnswerHead,
    LxmertVisualObjHead,
)

from vlpipe.errors import ConfigError
from vlpipe.fusion.attention import language_only_tail, use_sdpa
from vlpipe.fusion.heads import bert_init
from vlpipe.fusion.lxmert import LxmertFusionConfig

TASKS = ("mlm", "matched", "obj", "attr", "feat", "qa")
VISUAL_TASKS = ("obj", "attr", "feat")
# The original's names of the tasks (`LOSSES_NAME`, lxmert_pretrain.py), for its users.
ORIGINAL_NAMES = dict(zip(TASKS, ("Mask_LM", "Matched", "Obj", "Attr", "Feat", "QA"), strict=True))
TIED = "cls.predictions.decoder.weight"  # the word embeddings, under a second name


@dataclasses.dataclass
class PretrainModelConfig:
    """What a pre-training model is: the backbone, the tasks, and its heads' sizes."""

    backbone: LxmertFusionConfig = dataclasses.field(default_factory=LxmertFusionConfig)
    tasks: tuple[str, ...] = TASKS
    num_answers: int = 9500  # rows of the QA head: the answer table
    num_objects: int = 1600  # Visual Genome object classes of the detector
    num_attrs: int = 400  # and its attribute classes

    def __post_init__(self):
        if isinstance(self.backbone, dict):
            self.backbone = LxmertFusionConfig(**self.backbone)
        self.tasks = tuple(self.tasks)
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ConfigError(f"pre-training tasks {list(self.tasks)}: choose from {list(TASKS)}")
        if "qa" in self.tasks and self.num_answers < 1:
            raise ConfigError("the qa task needs an answer table with at least one answer")

    def to_transformers(self) -> LxmertConfig:
        """The LxmertConfig of `LxmertForPreTraining` with the same heads."""
        config = self.backbone.to_transformers()
        visual = [t for t in VISUAL_TASKS if t in self.tasks]
        config.update(
            {
                "task_mask_lm": "mlm" in self.tasks,
                "task_matched": "matched" in self.tasks,
                "task_obj_predict": bool(visual),
                "task_qa": "qa" in self.tasks,
                "visual_obj_loss": "obj" in self.tasks,
                "visual_attr_loss": "attr" in self.tasks,
                "visual_feat_loss": "feat" in self.tasks,
                "num_qa_labels": self.num_answers if "qa" in self.tasks else 0,
                "num_object_labels": self.num_objects,
                "num_attr_labels": self.num_attrs,
                "visual_loss_normalizer": 1 / 0.15,
            }
        )
        return config

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class LxmertPretraining(nn.Module):
    """LXMERT with its pre-training heads. `forward(batch)` -> {task: head output}."""

    tied_weights = (TIED,)  # checkpoints store the word embeddings once

    def __init__(self, config: PretrainModelConfig):
        super().__init__()
        self.config = config
        hf = config.to_transformers()
        self.lxmert = LxmertModel(hf)
        use_sdpa(self.lxmert)
        self.cls = LxmertPreTrainingHeads(hf)
        heads = [self.cls]
        if hf.task_obj_predict:
            self.obj_predict_head = LxmertVisualObjHead(hf)
            heads.append(self.obj_predict_head)
        if hf.task_qa:
            self.answer_head = LxmertVisualAnswerHead(hf, config.num_answers)
            heads.append(self.answer_head)
        for head in heads:
            head.apply(bert_init)
        # tied after the init: bert_init on the decoder would redraw the word embeddings
        self.cls.predictions.decoder.weight = self.lxmert.embeddings.word_embeddings.weight
        nn.init.zeros_(self.cls.predictions.bias)
        self._freeze_unused()

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.config.tasks

    def _freeze_unused(self) -> None:
        """Heads transformers builds that no task of this run trains stay at their init."""
        if "mlm" not in self.tasks:
            self.cls.predictions.transform.requires_grad_(False)
            self.cls.predictions.bias.requires_grad_(False)
        if "matched" not in self.tasks:
            self.cls.seq_relationship.requires_grad_(False)
        if not {"matched", "qa"} & set(self.tasks):  # nothing reads the pooled output
            self.lxmert.pooler.requires_grad_(False)
        last = self.lxmert.encoder.x_layers[-1]
        if not set(VISUAL_TASKS) & set(self.tasks):
            # nothing reads the visual output: the last layer's visual stream is skipped
            language_only_tail(last)
        if not {"mlm", "matched", "qa"} & set(self.tasks):  # nor the language output
            for part in (last.lang_self_att, last.lang_inter, last.lang_output):
                part.requires_grad_(False)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """batch: text_ids, text_mask (B, L), region_feats (B, K, Dv), region_boxes (B, K, 4),
        region_mask (B, K), mlm_labels (B, L; -1 where not masked) -> {"mlm": M, V scores at
        the M masked positions, "matched": B, 2, "obj": B, K, 1600, "attr": B, K, 400,
        "feat": B, K, Dv, "qa": B, answers}, for the tasks that are on."""
        out = self.lxmert(
            input_ids=batch["text_ids"],
            attention_mask=batch["text_mask"],
            visual_feats=batch["region_feats"],
            visual_pos=batch["region_boxes"],
            visual_attention_mask=batch["region_mask"],
            return_dict=True,
        )
        heads: dict[str, torch.Tensor] = {}
        if "mlm" in self.tasks:
            # only the masked positions: the vocabulary projection of every token would cost
            # about a tenth of the step and change nothing
            picked = out.language_output[batch["mlm_labels"] >= 0]
            heads["mlm"] = self.cls.predictions(picked)
        if "matched" in self.tasks:
            heads["matched"] = self.cls.seq_relationship(out.pooled_output)
        if hasattr(self, "obj_predict_head"):
            heads.update(self.obj_predict_head(out.vision_output))
        if "qa" in self.tasks:
            heads["qa"] = self.answer_head(out.pooled_output)
        return heads
