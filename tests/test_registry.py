"""Every registered fusion and task through the same checks (timm's test_model_backward over
list_models(), transformers' ModelTesterMixin): a new entry is covered without a new test."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import vlpipe
from tests.fusion_fixtures import color_records, gqa_color_task, image_cache, text_cache
from vlpipe.data_manifests.base import TextRecord
from vlpipe.fusion.answers import AnswerVocab
from vlpipe.fusion.data import CacheSet, TaskDataset
from vlpipe.fusion.model import FUSIONS, TaskModel, make_fusion_config
from vlpipe.fusion.tasks import TASKS, get_task
from vlpipe.pipelines.data import fusion_dims


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    folder = tmp_path_factory.mktemp("caches")
    image_cache(folder / "img.h5", 6)
    recs = color_records(6)
    text_cache(folder / "txt.h5", recs)
    return CacheSet([folder / "img.h5"]), CacheSet([folder / "txt.h5"]), recs


# Parameters that get no gradient by design. LXMERT's embeddings use padding_idx=0 (airsplay/lxmert
# modeling.py, and transformers after it) and every token has type 0, so the token-type table
# never trains.
NO_GRADIENT = {"lxmert": {"fusion.lxmert.embeddings.token_type_embeddings.weight"}}


@pytest.mark.parametrize("name", list(FUSIONS))
def test_fusion_forward_backward_every_trainable_parameter(caches, name):
    images, texts, recs = caches
    spec = FUSIONS[name]
    config = make_fusion_config(name, {**fusion_dims(name, images, texts, 30522), **spec.tiny})
    torch.manual_seed(0)
    model = TaskModel(name, config, 3)
    vocab = AnswerVocab(["red", "green", "blue"])
    batch = TaskDataset(get_task("gqa"), recs, images, texts, vocab, model.needs)[range(6)]
    logits = model(batch)
    assert logits.shape == (6, 3)
    torch.nn.functional.cross_entropy(logits, batch["target"]).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    for pname, p in trainable:
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert (p.grad.abs().sum() > 0) != (pname in NO_GRADIENT.get(name, ())), pname


def _records(task: str) -> tuple[list[TextRecord], dict[str, str]]:
    """A few labelled records of the task and predictions for them (some right, some wrong)."""
    if task == "vqa":
        recs = [
            TextRecord(
                str(i),
                "q?",
                ("img0",),
                ("yes",) * 9 + ("no",),
                extra={"answer_type": "yes/no", "question_type": "is"},
            )
            for i in range(4)
        ]
        return recs, {"0": "yes", "1": "no", "2": "yes", "3": "2"}
    if task == "vcr":  # 2 items: the first right on both, the second on its answer only
        recs = []
        for i in range(2):
            for mode, key in (("answer", f"x-{i}/answer"), ("rationale", f"x-{i}/rationale_a1")):
                extra = {"annot_id": f"x-{i}", "mode": mode}
                recs.append(TextRecord(key, "q", ("img",), ("1",), extra=extra, choices=("a",) * 4))
        preds = {"x-0/answer": "1", "x-0/rationale_a1": "1", "x-1/answer": "1"}
        return recs, preds | {"x-1/rationale_a1": "3"}
    if task == "nlvr2":
        recs = [
            TextRecord(f"dev-{i}-0-0", "s", ("a", "b"), (label,))
            for i, label in enumerate(["True", "False", "True"])
        ]
        return recs, {"dev-0-0-0": "True", "dev-1-0-0": "True", "dev-2-0-0": "True"}
    answers = list(get_task(task).fixed_answers or ("red", "blue"))
    recs = [
        TextRecord(f"q{i}", "q?", ("img0",), (answers[i % 2],), extra={"answer_type": "color"})
        for i in range(4)
    ]
    return recs, {f"q{i}": answers[0] for i in range(4)}


@pytest.mark.parametrize("name", list(TASKS))
def test_task_submission_round_trip_scores_the_same(tmp_path, name):
    task = get_task(name)
    recs, preds = _records(name)
    direct = task.evaluate(preds, recs)
    written = preds
    if task.submission.probabilities:  # the answer scored highest
        written = {k: [0.7 if str(i) == v else 0.1 for i in range(4)] for k, v in preds.items()}
    path = task.write_predictions(tmp_path / task.submission_name, written)
    assert task.evaluate(task.read_predictions(path), recs) == direct
    assert direct[task.headline] == pytest.approx(direct[task.headline])  # the headline exists
    assert "metric" in direct


@pytest.mark.parametrize("name", list(FUSIONS))
def test_cli_train_evaluate_predict_per_fusion(tmp_path, name):
    data, run = gqa_color_task(tmp_path, n_images=6), tmp_path / "run"
    tiny = json.dumps(FUSIONS[name].tiny)
    vlpipe(
        "train",
        *data,
        "--fusion",
        name,
        "--model-config",
        tiny,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--no-progress",
        "--out",
        run,
    )
    scores = json.loads(
        vlpipe("evaluate", "--run", run, *data[:4], "--annotations", data[-1], "--json").stdout
    )
    assert 0 <= scores["accuracy"] <= 100 and scores["n"] == 12
    vlpipe("predict", "--run", run, *data[:4], "--annotations", data[-1])
    assert len(json.loads((run / "predictions.json").read_text())) == 12
