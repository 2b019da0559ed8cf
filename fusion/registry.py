"""The fusions by name (as written in checkpoints and on the command line), each with its spec;
no torch import here, so the command line can list them for its --help."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FusionSpec:
    """What a fusion is: its config and model classes (imported lazily), the config fields it
    takes from the caches it trains on, a tiny config for tests, and one line of help.

    inputs: config field -> the width it is set to: "image_feats" (regions / patches / grid
    cells), "image_cls" (the pooled image vector), "text" (the text cache's features) or
    "vocab" (the tokenizer's size)."""

    module: str
    config: str
    model: str
    inputs: dict[str, str]
    tiny: dict[str, Any]
    help: str

    def classes(self) -> tuple[type, type]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config), getattr(mod, self.model)


FUSIONS: dict[str, FusionSpec] = {
    "concat": FusionSpec(
        "vlpipe.fusion.concat",
        "ConcatConfig",
        "ConcatFusion",
        {"image_dim": "image_cls", "text_dim": "text"},
        {},
        "image CLS / pooled CNN + text CLS, concatenated (the transformer-exclusive paper)",
    ),
    "lstm": FusionSpec(
        "vlpipe.fusion.concat",
        "LstmConcatConfig",
        "LstmConcatFusion",
        {"image_dim": "image_cls", "vocab_size": "vocab"},
        {"embed_dim": 8, "hidden": 8},
        "image CLS + a trainable LSTM over word embeddings (the paper's ViT+LSTM)",
    ),
    "lxmert": FusionSpec(
        "vlpipe.fusion.lxmert",
        "LxmertFusionConfig",
        "LxmertFusion",
        {"visual_feat_dim": "image_feats", "vocab_size": "vocab"},
        {"hidden": 32, "heads": 2, "intermediate": 64, "l_layers": 1, "r_layers": 1, "x_layers": 1},
        "LXMERT: language 9 / object-relationship 5 / cross-modality 5 layers",
    ),
    "cross": FusionSpec(
        "vlpipe.fusion.cross",
        "CrossFusionConfig",
        "CrossFusion",
        {"visual_feat_dim": "image_feats", "text_dim": "text"},
        {"layers": 1, "hidden": 16, "heads": 2, "intermediate": 32},
        "cached BERT token features + k LXMERT cross-modality layers",
    ),
}
