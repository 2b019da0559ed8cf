"""CUDA checks, opt-in (`pytest -m gpu`): the same extraction on the GPU in bf16 matches the CPU
in fp32, and training steps run under AMP. Deselected by default; need a CUDA device."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import TINY_VIT_ARGS, vlpipe
from tests.fusion_fixtures import color_records, image_cache, text_cache
from vlpipe.cache import FeatureCache

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("pytest -m gpu needs a CUDA device")


def test_cuda_bf16_extraction_matches_cpu(image_folder, tmp_path):
    common = (
        "extract",
        "--dataset",
        "folder",
        "--root",
        image_folder,
        *TINY_VIT_ARGS,
        "--dtype",
        "float32",
    )
    vlpipe(*common, "--out", tmp_path / "cpu.h5", "--device", "cpu")
    vlpipe(*common, "--out", tmp_path / "gpu.h5", "--device", "cuda", "--precision", "bf16")
    cpu, gpu = FeatureCache(tmp_path / "cpu.h5"), FeatureCache(tmp_path / "gpu.h5")
    keys = cpu.keys()
    a, b = cpu.read(keys)["image_cls"], gpu.read(keys)["image_cls"]
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cos.min() > 0.99, cos


def test_amp_training_on_cuda(tmp_path):
    from vlpipe.fusion.answers import AnswerVocab
    from vlpipe.fusion.data import CacheSet, TaskDataset
    from vlpipe.fusion.model import TaskModel, make_fusion_config
    from vlpipe.fusion.tasks import Task
    from vlpipe.fusion.train import TrainConfig, train

    image_cache(tmp_path / "img.h5", 12)
    recs = color_records(12)
    text_cache(tmp_path / "txt.h5", recs)
    vocab = AnswerVocab(["red", "green", "blue"])
    task = Task("color", "ce")
    ds = TaskDataset(
        task,
        recs,
        CacheSet([tmp_path / "img.h5"]),
        CacheSet([tmp_path / "txt.h5"]),
        vocab,
        ("image_cls", "text_cls"),
    )
    model = TaskModel("concat", make_fusion_config("concat", {"image_dim": 16, "text_dim": 16}), 3)
    cfg = TrainConfig(epochs=10, batch_size=8, lr=3e-3, device="cuda")
    results = train(model, task, ds, cfg, tmp_path / "run", {}, val=ds, progress=False)
    assert results["accuracy"] == 100.0
