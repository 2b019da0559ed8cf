"""Backbone names as they appear on the command line and in cache provenance."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from vlpipe.errors import ConfigError

if TYPE_CHECKING:  # the CLI reads BACKBONES for its --help: no torch import here
    from vlpipe.extract.base import Extractor

# name -> "module:builder"; imported lazily so `vlpipe --help` stays instant.
BACKBONES = {
    "vit": "vlpipe.extract.vit:build_vit",
    "bert": "vlpipe.extract.bert:build_bert",
    "resnet": "vlpipe.extract.cnn:build_resnet",
    "cnn": "vlpipe.extract.cnn:build_cnn",
    "frcnn": "vlpipe.extract.frcnn.extractor:build_frcnn",
}


def build_extractor(name: str, **options: Any) -> Extractor:
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; known: {sorted(BACKBONES)}")
    module, func = BACKBONES[name].split(":")
    return getattr(importlib.import_module(module), func)(**options)
