"""BERT (transformers): last-layer token features and the [CLS] feature of each text; or, with
`--layer N` below the depth L, hidden_states[N] (the layers above are dropped;
fusion/encoder_top.py rebuilds them from the same weights for training)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlpipe.extract.base import Batch, Extractor, block_record, encoder_block
from vlpipe.tokenizer import MAX_LENGTH, bert_tokenizer, default_vocab
from vlpipe.weights import WeightsError, load_into, read_state_dict

DEFAULT_ARCH = "bert-base-uncased"  # BertConfig() defaults are exactly bert-base-uncased


class BertExtractor(Extractor):
    backbone = "bert"
    kind = "tokens"
    modality = "text"

    def __init__(
        self,
        model,
        weights,
        model_record,
        tokenizer,
        vocab: str,
        max_length: int,
        tokens: bool,
        block: dict[str, Any] | None = None,
    ):
        super().__init__(model, weights, model_record)
        self.tokenizer = tokenizer
        self.vocab = vocab
        self.max_length = max_length
        self.tokens = tokens
        self.block = block or {}  # {"encoder_block": [N, L]} below the last layer

    def shapes(self) -> dict[str, tuple[int, ...]]:
        dim, length = self.model.config.hidden_size, self.max_length
        out = {"text_cls": (dim,), "text_ids": (length,), "text_mask": (length,), "text": ()}
        if self.tokens:
            out["text_feats"] = (length, dim)
        return out

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )

    def encode(self, batch: Batch) -> dict[str, torch.Tensor | np.ndarray]:
        """batch.texts: B strings -> text_feats B,L,D, text_cls B,D, text_ids / text_mask B,L
        and the texts."""
        tokens = {k: v.to(self.device) for k, v in self.tokenize(batch.texts).items()}
        hidden = self.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state
        out = {
            "text_cls": hidden[:, 0],
            "text_ids": tokens["input_ids"],
            "text_mask": tokens["attention_mask"].bool(),
            "text": np.array(batch.texts, dtype=object),
        }
        if self.tokens:
            out["text_feats"] = hidden
        return out

    def facts(self) -> dict[str, Any]:
        from vlpipe.provenance import sha256_file
        from vlpipe.tokenizer import find_vocab

        return {
            "vocab_sha256": sha256_file(find_vocab(self.vocab)),
            "vocab_size": len(self.tokenizer),
            "max_length": self.max_length,
            **self.block,
        }

    def preprocessing(self) -> dict[str, Any]:
        from vlpipe.provenance import sha256_file
        from vlpipe.tokenizer import find_vocab

        return {
            "tokenizer": "WordPiece",
            "vocab": self.vocab,  # where it was read from (not part of the identity)
            "vocab_sha256": sha256_file(find_vocab(self.vocab)),
            "vocab_size": len(self.tokenizer),
            "lowercase": bool(self.tokenizer.do_lower_case),
            "max_length": self.max_length,
            "padding": "max_length",
            "truncation": True,
            **self.block,
        }


def _config(weights: str | None, model_kwargs: dict[str, Any]):
    from transformers import BertConfig

    if weights is not None and (Path(weights) / "config.json").is_file():
        config = BertConfig.from_json_file(str(Path(weights) / "config.json"))
        for key, value in model_kwargs.items():
            setattr(config, key, value)
        return config
    return BertConfig(**model_kwargs)


def _vocab_path(weights: str | None, vocab: str | None) -> Path:
    if vocab:
        return Path(vocab)
    if weights is not None and Path(weights).is_dir():
        return Path(weights)
    fallback = default_vocab()
    if fallback is None:
        raise WeightsError(
            "no WordPiece vocab: pass --vocab PATH/vocab.txt (or a model folder with --weights)"
        )
    return fallback


def load_bert(config, weights: str | None):
    """BertModel without its pooler, from `config`: random-init (from torch's seed), or with a
    file's (or model folder's) weights loaded strictly."""
    from transformers import BertModel

    model = BertModel(config, add_pooling_layer=False)
    if weights is not None:
        state = {k.removeprefix("bert."): v for k, v in read_state_dict(weights).items()}
        # The pooler is unused (we keep last-layer [CLS]); position_ids is a derived buffer.
        load_into(
            model,
            state,
            weights,
            ignore=lambda k: k.startswith(("pooler.", "cls.")) or k.endswith("position_ids"),
        )
    return model


def build_bert(
    *,
    arch: str | None,
    weights: str | None,
    max_length: int = MAX_LENGTH,
    model_kwargs: dict[str, Any],
    vocab: str | None = None,
    patches: bool = True,
    layer: str | int | None = None,
    **_,
) -> BertExtractor:
    config = _config(weights, model_kwargs)
    model = load_bert(config, weights)
    vocab_path = _vocab_path(weights, vocab)
    tokenizer = bert_tokenizer(vocab_path)
    if len(tokenizer) != config.vocab_size:
        raise WeightsError(
            f"{vocab_path}: vocab has {len(tokenizer)} tokens, the model {config.vocab_size}"
        )
    name = getattr(config, "_name_or_path", "") or arch or DEFAULT_ARCH
    record = {
        "arch": name,
        "config": config.to_diff_dict(),
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    total = config.num_hidden_layers
    blocks = encoder_block(layer, total, name, tokens=patches)
    if blocks < total:  # last_hidden_state is then hidden_states[N]
        model.encoder.layer = model.encoder.layer[:blocks]
    block = block_record(blocks, total)
    return BertExtractor(
        model, weights, record, tokenizer, str(vocab_path), max_length, patches, block
    )
