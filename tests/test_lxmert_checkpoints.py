"""LXMERT checkpoints users already have, built from the reference module definitions and written
in each real layout, loaded through vlpipe as complete task models or as --init.

The references are transformers' LxmertForQuestionAnswering / LxmertForPreTraining / LxmertModel.
The original airsplay/lxmert layouts are written by renaming their state dicts: the original
LXRTModel (src/lxrt/modeling.py: embeddings, encoder.{visn_fc, layer, r_layers, x_layers},
pooler) and transformers' LxmertModel share every module name below the prefix
(test_fusion_lxmert.py::test_original_checkpoint_names_cover_the_whole_model spells them out
from modeling.py), and the task models' `logit_fc` (src/tasks/vqa_model.py: Linear, GeLU,
BertLayerNorm, Linear) is LxmertVisualAnswerHead.logit_fc. So:
- fine-tuned task model (VQAModel / GQAModel / NLVR2Model state_dict, BEST.pth / LAST.pth):
  `lxmert.` -> `lxrt_encoder.model.bert.` (`lxrt_encoder.model.module.bert.` with --multiGPU),
  `answer_head.logit_fc.` -> `logit_fc.`;
- pre-trained LXRTPretraining in DataParallel (Epoch20_LXRT.pth): `lxmert.` -> `module.bert.`,
  every head under `module.` (`module.answer_head.logit_fc.*`, 9,500 answers in the release).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from transformers import LxmertConfig, LxmertForPreTraining, LxmertForQuestionAnswering, LxmertModel

from vlpipe.fusion.answer_tables import lxmert_convert_answer, read_answer_list
from vlpipe.fusion.heads import ClassifierHead
from vlpipe.fusion.lxmert import LxmertFusionConfig, read_lxmert_checkpoint
from vlpipe.fusion.model import TaskModel
from vlpipe.fusion.tasks import get_task
from vlpipe.pipelines.lxmert_import import ImportOptions, import_task_model, initialise_from
from vlpipe.weights import WeightsError

VOCAB = 1000  # the smallest vocab.txt vlpipe.tokenizer accepts as a BERT vocabulary
# hidden 32 / 2 heads with a config.json (HF folders); hidden 24 with LXMERT's 12 heads for the
# original files, which record no head count
TINY = dict(l_layers=2, r_layers=1, x_layers=1, intermediate=48, visual_feat_dim=16)
HF_TINY = dict(TINY, hidden=32, heads=2)
ORIGINAL_TINY = dict(TINY, hidden=24, heads=12)
ANSWERS = ["red", "green", "blue", "two", "yes"]


@pytest.fixture(autouse=True)
def seeded():
    """The references draw their initial weights from the global generator."""
    torch.manual_seed(0)


def hf_config(n_answers: int, hidden: int = 32, heads: int = 2, **extra) -> LxmertConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_attention_heads=heads,
        intermediate_size=48,
        l_layers=2,
        r_layers=1,
        x_layers=1,
        visual_feat_dim=16,
        num_qa_labels=n_answers,
    )
    return LxmertConfig(**{**values, **extra})


@torch.no_grad()
def scramble(module: nn.Module, seed: int = 1) -> nn.Module:
    """Perturb every parameter, so swapped or skipped tensors change the logits."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return module.eval()


def make_batch(pair: int = 1, batch: int = 3, tokens: int = 6, regions: int = 5) -> dict:
    g = torch.Generator().manual_seed(0)
    text_mask = torch.arange(tokens)[None] < torch.tensor([6, 4, 2])[:, None]
    ids = torch.randint(1, VOCAB, (batch, tokens), generator=g) * text_mask
    shape = (batch, pair, regions) if pair > 1 else (batch, regions)
    return {
        "text_ids": ids,
        "text_mask": text_mask,
        "region_feats": torch.randn(*shape, 16, generator=g),
        "region_boxes": torch.rand(*shape, 4, generator=g),
        "region_mask": torch.ones(shape, dtype=torch.bool),
    }


def reference_inputs(batch: dict) -> dict:
    return {
        "input_ids": batch["text_ids"],
        "attention_mask": batch["text_mask"],
        "visual_feats": batch["region_feats"],
        "visual_pos": batch["region_boxes"],
        "visual_attention_mask": batch["region_mask"],
    }


def write_vocab(path) -> str:
    """A WordPiece vocab.txt of VOCAB tokens: BERT's specials, the fixtures' words, fillers."""
    words = ["what", "color", "is", "the", "shape", "?", "which", "colour", "shown"]
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens = specials + words + [f"tok{i}" for i in range(VOCAB - len(specials) - len(words))]
    path.write_text("\n".join(tokens) + "\n")
    return str(path)


def original_task_state(reference: LxmertForQuestionAnswering, multi_gpu: bool = False) -> dict:
    """VQAModel / GQAModel.state_dict() of airsplay/lxmert for the reference's weights."""
    encoder = "lxrt_encoder.model.module.bert." if multi_gpu else "lxrt_encoder.model.bert."
    out = {}
    for key, value in reference.state_dict().items():
        key = key.replace("lxmert.", encoder, 1).replace("answer_head.logit_fc.", "logit_fc.", 1)
        out[key] = value.clone()
    return out


def logits_of(model: TaskModel, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(batch)


# --------------------------------------------------------------------------------------------
# Complete task models for evaluate / predict
# --------------------------------------------------------------------------------------------
def test_hf_question_answering_folder_is_a_complete_model(tmp_path):
    labels = {i: answer for i, answer in enumerate(ANSWERS)}
    reference = scramble(LxmertForQuestionAnswering(hf_config(5, id2label=labels)))
    reference.save_pretrained(tmp_path / "hf-qa")
    write_vocab(tmp_path / "hf-qa" / "vocab.txt")  # found in the folder: no --vocab needed
    model, meta, task = import_task_model(tmp_path / "hf-qa", ImportOptions(task="gqa"))
    assert meta["answers"] == ANSWERS and task.name == "gqa"
    assert meta["fusion_config"]["heads"] == 2  # from config.json
    assert meta["tokenizer"] == {"vocab": str(tmp_path / "hf-qa" / "vocab.txt"), "max_length": 20}
    batch = make_batch()
    with torch.no_grad():
        expected = reference(**reference_inputs(batch)).question_answering_score
    torch.testing.assert_close(logits_of(model, batch), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("multi_gpu", [False, True])
def test_original_task_checkpoint_is_a_complete_model(tmp_path, multi_gpu):
    reference = scramble(LxmertForQuestionAnswering(hf_config(5, hidden=24, heads=12)))
    torch.save(original_task_state(reference, multi_gpu), tmp_path / "BEST.pth")
    (tmp_path / "trainval_ans2label.json").write_text(
        json.dumps({a: i for i, a in enumerate(ANSWERS)})
    )
    opts = ImportOptions(
        "vqa", str(tmp_path / "trainval_ans2label.json"), write_vocab(tmp_path / "vocab.txt")
    )
    model, meta, _ = import_task_model(tmp_path / "BEST.pth", opts)
    assert meta["answers"] == ANSWERS and meta["source"]["layout"] == "original-task"
    assert meta["fusion_config"] == {
        **LxmertFusionConfig().__dict__,
        **ORIGINAL_TINY,
        **{"vocab_size": VOCAB, "max_position": 512, "dropout": 0.1},
    }
    batch = make_batch()
    with torch.no_grad():
        expected = reference(**reference_inputs(batch)).question_answering_score
    torch.testing.assert_close(logits_of(model, batch), expected, atol=1e-5, rtol=1e-5)


def test_original_nlvr2_checkpoint_pairs_images_as_the_original(tmp_path):
    """NLVR2Model.forward: sentences repeated per image, images flattened image-major, the two
    pooled outputs concatenated (img0, img1) into logit_fc = Linear(2h, 2h) ... Linear(2h, 2)."""
    torch.manual_seed(0)
    backbone = scramble(LxmertModel(hf_config(2, hidden=24, heads=12)))
    h = 24
    logit_fc = scramble(
        nn.Sequential(
            nn.Linear(2 * h, 2 * h), nn.GELU(), nn.LayerNorm(2 * h, eps=1e-12), nn.Linear(2 * h, 2)
        )
    )
    state = {f"lxrt_encoder.model.bert.{k}": v for k, v in backbone.state_dict().items()}
    state.update({f"logit_fc.{k}": v for k, v in logit_fc.state_dict().items()})
    torch.save(state, tmp_path / "LAST.pth")
    opts = ImportOptions("nlvr2", vocab=write_vocab(tmp_path / "vocab.txt"))
    model, meta, _ = import_task_model(tmp_path / "LAST.pth", opts)
    assert meta["answers"] == ["False", "True"]  # nlvr2_data.py: label 1 = "True"
    batch = make_batch(pair=2)
    flat = {
        k: v.flatten(0, 1) if k.startswith(("image_", "region_")) else v.repeat_interleave(2, 0)
        for k, v in batch.items()
    }
    with torch.no_grad():
        pooled = backbone(**reference_inputs(flat)).pooled_output
        expected = logit_fc(pooled.view(-1, 2 * h))
    torch.testing.assert_close(logits_of(model, batch), expected, atol=1e-5, rtol=1e-5)
    # image order matters: swapped images give other logits
    swapped = {k: v.flip(1) if k.startswith(("image_", "region_")) else v for k, v in batch.items()}
    assert not torch.allclose(logits_of(model, swapped), expected, atol=1e-3)


def test_what_a_foreign_checkpoint_lacks_is_named(tmp_path):
    reference = LxmertForQuestionAnswering(hf_config(5, hidden=24, heads=12))
    path = tmp_path / "BEST.pth"
    torch.save(original_task_state(reference), path)
    vocab = write_vocab(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match=r"BEST\.pth: not a vlpipe run.*--task"):
        import_task_model(path, ImportOptions(vocab=vocab))
    with pytest.raises(ValueError, match=r"BEST\.pth: its answer head has 5 outputs.*--answers"):
        import_task_model(path, ImportOptions("vqa", vocab=vocab))
    (tmp_path / "four.json").write_text(json.dumps(ANSWERS[:4]))
    with pytest.raises(ValueError, match=r"four\.json lists 4 answers.*BEST\.pth has 5"):
        import_task_model(path, ImportOptions("vqa", str(tmp_path / "four.json"), vocab))
    (tmp_path / "five.json").write_text(json.dumps(ANSWERS))
    with pytest.raises(
        ValueError, match=r"BEST\.pth: an LXMERT checkpoint carries no tok.*--vocab"
    ):
        import_task_model(path, ImportOptions("vqa", str(tmp_path / "five.json")))
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "vocab.txt").write_text((tmp_path / "vocab.txt").read_text() + "extra\n")
    with pytest.raises(WeightsError, match=r"vocab\.txt: 1001 tokens.*BEST\.pth have 1000 rows"):
        import_task_model(
            path, ImportOptions("vqa", str(tmp_path / "five.json"), str(tmp_path / "big"))
        )
    with pytest.raises(WeightsError, match=r"BEST\.pth: its answer head takes 24 inputs"):
        import_task_model(path, ImportOptions("nlvr2", vocab=vocab))


def test_pretrained_checkpoint_is_not_a_task_model(tmp_path):
    reference = LxmertModel(hf_config(5, hidden=24, heads=12))
    torch.save(
        {f"module.bert.{k}": v for k, v in reference.state_dict().items()},
        tmp_path / "Epoch20_LXRT.pth",
    )
    with pytest.raises(WeightsError, match=r"Epoch20_LXRT\.pth: no answer head.*--init"):
        import_task_model(tmp_path / "Epoch20_LXRT.pth", ImportOptions("vqa"))


def test_heads_of_a_file_without_config_json(tmp_path):
    reference = LxmertModel(hf_config(5))  # hidden 32: not a multiple of LXMERT's 12 heads
    torch.save({f"bert.{k}": v for k, v in reference.state_dict().items()}, tmp_path / "x.pth")
    ckpt = read_lxmert_checkpoint(tmp_path / "x.pth")
    assert "heads" not in ckpt.arch
    with pytest.raises(WeightsError, match=r"x\.pth: hidden size 32 .* 12 attention heads.*config"):
        ckpt.fusion_config()
    # a config.json beside the file says how many
    hf_config(5).to_json_file(tmp_path / "config.json")
    assert read_lxmert_checkpoint(tmp_path / "x.pth").fusion_config().heads == 2


# --------------------------------------------------------------------------------------------
# Architecture checks
# --------------------------------------------------------------------------------------------
def test_other_layer_counts_are_an_error_unless_partial(tmp_path):
    reference = LxmertForQuestionAnswering(hf_config(5, l_layers=3))  # 3 language layers, not 2
    reference.save_pretrained(tmp_path / "three")
    model = TaskModel("lxmert", LxmertFusionConfig(**HF_TINY, vocab_size=VOCAB), 5)
    with pytest.raises(WeightsError, match=r"three: .*l_layers 3 \(file\) vs 2 \(model\).*partial"):
        initialise_from(model, tmp_path / "three", get_task("gqa"), ANSWERS)
    lines = initialise_from(model, tmp_path / "three", get_task("gqa"), ANSWERS, partial=True)
    assert "partial load: l_layers 3 (file) vs 2 (model)" in lines[0]
    assert "encoder.layer.2." in lines[0]  # reported as unexpected, not loaded
    torch.testing.assert_close(
        model.fusion.lxmert.encoder.layer[1].output.dense.weight,
        reference.lxmert.encoder.layer[1].output.dense.weight,
    )


def test_config_json_heads_are_checked_and_must_agree_with_the_tensors(tmp_path):
    LxmertForQuestionAnswering(hf_config(5, heads=4)).save_pretrained(tmp_path / "four-heads")
    model = TaskModel("lxmert", LxmertFusionConfig(**HF_TINY, vocab_size=VOCAB), 5)
    with pytest.raises(WeightsError, match=r"four-heads: .*heads 4 \(file\) vs 2 \(model\)"):
        initialise_from(model, tmp_path / "four-heads", get_task("gqa"), ANSWERS)
    config = json.loads((tmp_path / "four-heads" / "config.json").read_text())
    config["x_layers"] = 3
    (tmp_path / "four-heads" / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        WeightsError, match=r"config\.json contradicts the weights: x_layers 3 vs 1"
    ):
        read_lxmert_checkpoint(tmp_path / "four-heads")


# --------------------------------------------------------------------------------------------
# --init: answer heads transferred by answer string
# --------------------------------------------------------------------------------------------
def pretrained_checkpoint(path, table: list[str]) -> LxmertForPreTraining:
    """Epoch20_LXRT.pth of LXRTPretraining in DataParallel, with a QA head over `table`."""
    reference = scramble(LxmertForPreTraining(hf_config(len(table), task_qa=True)))
    state = {
        "module." + k.replace("lxmert.", "bert.", 1): v for k, v in reference.state_dict().items()
    }
    assert (
        "module.answer_head.logit_fc.3.weight" in state and "module.cls.predictions.bias" in state
    )
    torch.save(state, path)
    return reference


def test_loadlxmertqa_transfers_rows_of_the_answer_table(tmp_path):
    table = ["2", "man", "gray", "red", "yes", "dog"]
    reference = pretrained_checkpoint(tmp_path / "Epoch20_LXRT.pth", table)
    (tmp_path / "all_ans.json").write_text(
        json.dumps([{"ans": a, "dsets": ["vqa", "gqa"]} for a in table])
    )
    answers = ["Two", "a man", "grey", "blue", "yes.", "cat"]  # found after convert_ans: 4
    torch.manual_seed(0)
    model = TaskModel("lxmert", LxmertFusionConfig(**HF_TINY, vocab_size=VOCAB), 6)
    lines = initialise_from(
        model,
        tmp_path / "Epoch20_LXRT.pth",
        get_task("vqa"),
        answers,
        answer_table=str(tmp_path / "all_ans.json"),
    )
    assert "4 of 6 answers transferred" in lines[1] and "'blue', 'cat'" in lines[1]
    theirs = reference.answer_head.logit_fc
    ours = model.head.net
    for i, row in ((0, 0), (1, 1), (2, 2), (4, 4)):
        torch.testing.assert_close(ours[4].weight[i], theirs[3].weight[row])
        torch.testing.assert_close(ours[4].bias[i], theirs[3].bias[row])
    for i in (3, 5):  # not in the table: zero weight and bias, as load_lxmert_qa
        assert not ours[4].weight[i].any() and ours[4].bias[i] == 0
    torch.testing.assert_close(ours[1].weight, theirs[0].weight)
    torch.testing.assert_close(ours[3].bias, theirs[2].bias)
    torch.testing.assert_close(
        model.fusion.lxmert.pooler.dense.weight, reference.lxmert.pooler.dense.weight
    )


def test_answer_head_is_not_transferred_without_a_table(tmp_path):
    pretrained_checkpoint(tmp_path / "Epoch20_LXRT.pth", ["yes", "no", "red"])
    torch.manual_seed(0)
    model = TaskModel("lxmert", LxmertFusionConfig(**HF_TINY, vocab_size=VOCAB), 5)
    before = {k: v.clone() for k, v in model.head.state_dict().items()}
    lines = initialise_from(model, tmp_path / "Epoch20_LXRT.pth", get_task("vqa"), ANSWERS)
    assert "NOT transferred" in lines[1] and "--answer-table" in lines[1]
    for key, value in model.head.state_dict().items():
        torch.testing.assert_close(value, before[key])
    (tmp_path / "short.json").write_text(json.dumps([{"ans": "yes", "dsets": []}]))
    with pytest.raises(ValueError, match=r"short\.json lists 1 answers, .* has 3"):
        initialise_from(
            model,
            tmp_path / "Epoch20_LXRT.pth",
            get_task("vqa"),
            ANSWERS,
            answer_table=str(tmp_path / "short.json"),
        )


def test_fine_tuned_head_transfers_by_exact_answer(tmp_path):
    labels = {0: "blue", 1: "two", 2: "green", 3: "no"}
    reference = scramble(LxmertForQuestionAnswering(hf_config(4, id2label=labels)))
    reference.save_pretrained(tmp_path / "hf-qa")
    model = TaskModel("lxmert", LxmertFusionConfig(**HF_TINY, vocab_size=VOCAB), 3)
    lines = initialise_from(model, tmp_path / "hf-qa", get_task("gqa"), ["green", "2", "blue"])
    assert "2 of 3 answers transferred" in lines[1] and "exact" in lines[1]  # "2" is not "two"
    head = reference.answer_head.logit_fc[3]
    torch.testing.assert_close(model.head.net[4].weight[0], head.weight[2])
    torch.testing.assert_close(model.head.net[4].weight[2], head.weight[0])
    assert not model.head.net[4].weight[1].any()


def test_answer_files_and_convert_ans(tmp_path):
    assert [lxmert_convert_answer(a) for a in ("Two", "the man.", "an apple", "Grey", "")] == [
        "2",
        "man",
        "apple",
        "gray",
        "",
    ]
    (tmp_path / "a.json").write_text(json.dumps({"yes": 1, "no": 0}))
    assert read_answer_list(tmp_path / "a.json").answers == ["no", "yes"]
    (tmp_path / "b.json").write_text(json.dumps({"yes": 1, "no": 3}))
    with pytest.raises(ValueError, match=r"b\.json: .*indices 0\.\.1"):
        read_answer_list(tmp_path / "b.json")
    (tmp_path / "c.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match=r"c\.json: not an answer list"):
        read_answer_list(tmp_path / "c.json")


# --------------------------------------------------------------------------------------------
# Task heads start as the original's
# --------------------------------------------------------------------------------------------
def test_classifier_head_starts_with_bert_init():
    torch.manual_seed(0)
    head = ClassifierHead(256, 512, 300)
    for linear in (head.net[1], head.net[4]):
        assert abs(linear.weight.std().item() - 0.02) < 1e-3 and abs(linear.weight.mean()) < 1e-3
        assert not linear.bias.any()
    assert (head.net[3].weight == 1).all() and not head.net[3].bias.any()


# --------------------------------------------------------------------------------------------
# The CLI: evaluate / predict / train --init on a foreign checkpoint and a small cache
# --------------------------------------------------------------------------------------------
@pytest.fixture
def gqa_folder(tmp_path):
    """A regions cache (16-d features), GQA questions whose answers are in ANSWERS, a vocab."""
    from tests.fusion_fixtures import color_records, image_cache

    image_cache(tmp_path / "img.h5", 6, kind="regions")
    questions = {
        r.key: {"imageId": r.image_keys[0], "question": r.text, "answer": r.answers[0]}
        for r in color_records(6)
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "label2ans.json").write_text(json.dumps(ANSWERS))
    write_vocab(tmp_path / "vocab.txt")
    return tmp_path


def data_args(folder) -> list:
    return ["--features", folder / "img.h5", "--annotations", folder / "q.json"]


def reference_logits(reference, folder, run) -> tuple[list[str], torch.Tensor]:
    """Question keys and the reference model's logits, on the batches vlpipe reads."""
    from vlpipe.pipelines.data import DataSpec
    from vlpipe.pipelines.eval_job import run_dataset

    spec = DataSpec("", [folder / "img.h5"], annotations=[folder / "q.json"])
    opts = ImportOptions("gqa", str(folder / "label2ans.json"), str(folder / "vocab.txt"))
    _, _, data, _ = run_dataset(run, spec, opts)
    batch = data[list(range(len(data)))]
    with torch.no_grad():
        logits = reference.eval()(**reference_inputs(batch)).question_answering_score
    return [r.key for r in data.records], logits


def reference_answers(reference, folder, run) -> dict[str, str]:
    keys, logits = reference_logits(reference, folder, run)
    return {k: ANSWERS[i] for k, i in zip(keys, logits.argmax(-1).tolist(), strict=True)}


@torch.no_grad()
def original_checkpoint_on(folder) -> LxmertForQuestionAnswering:
    """A scrambled reference saved as folder/BEST.pth, its answer bias centred on the folder's
    questions: a tiny random model's logits barely vary with the input, and the predictions
    must tell models apart."""
    torch.manual_seed(0)
    reference = scramble(LxmertForQuestionAnswering(hf_config(5, hidden=24, heads=12)), seed=4)
    torch.save(original_task_state(reference), folder / "BEST.pth")
    _, logits = reference_logits(reference, folder, folder / "BEST.pth")
    reference.answer_head.logit_fc[3].bias.sub_(logits.mean(0))
    torch.save(original_task_state(reference), folder / "BEST.pth")
    return reference


def test_cli_evaluate_and_predict_an_original_checkpoint(gqa_folder):
    from tests.conftest import vlpipe

    reference = original_checkpoint_on(gqa_folder)
    expected = reference_answers(reference, gqa_folder, gqa_folder / "BEST.pth")
    assert len(set(expected.values())) > 1  # the check below can tell answers apart
    lxmert = ["--task", "gqa", "--answers", gqa_folder / "label2ans.json"]
    lxmert += ["--vocab", gqa_folder / "vocab.txt"]
    out = gqa_folder / "preds.json"
    vlpipe(
        "predict", "--run", gqa_folder / "BEST.pth", *data_args(gqa_folder), *lxmert, "--out", out
    )
    assert {p["questionId"]: p["prediction"] for p in json.loads(out.read_text())} == expected
    result = vlpipe(
        "evaluate", "--run", gqa_folder / "BEST.pth", *data_args(gqa_folder), *lxmert, "--json"
    )
    truth = json.loads((gqa_folder / "q.json").read_text())
    right = sum(expected[k] == q["answer"] for k, q in truth.items())
    assert json.loads(result.stdout)["accuracy"] == pytest.approx(100 * right / len(truth))
    # each missing piece: one line naming the file, exit 1, no traceback
    for drop, message in (("--answers", "--answers"), ("--vocab", "--vocab"), ("--task", "--task")):
        i = lxmert.index(drop)
        rest = lxmert[:i] + lxmert[i + 2 :]
        failed = vlpipe(
            "evaluate", "--run", gqa_folder / "BEST.pth", *data_args(gqa_folder), *rest, code=1
        )
        assert "BEST.pth" in failed.output and message in failed.output
        assert isinstance(failed.exception, SystemExit) and "Traceback" not in failed.output


def test_cli_train_init_from_a_fine_tuned_checkpoint(gqa_folder):
    from tests.conftest import vlpipe

    reference = original_checkpoint_on(gqa_folder)
    model_config = json.dumps({**ORIGINAL_TINY, "dropout": 0.0})
    args = [
        "train",
        *data_args(gqa_folder),
        "--task",
        "gqa",
        "--fusion",
        "lxmert",
        "--vocab",
        gqa_folder / "vocab.txt",
        "--init",
        gqa_folder / "BEST.pth",
        "--answers",
        gqa_folder / "label2ans.json",
        "--max-steps",
        1,
        "--batch-size",
        4,
        "--no-progress",
        "--lr",
        0.0,
    ]
    run = gqa_folder / "run"
    result = vlpipe(*args, "--model-config", model_config, "--out", run)
    assert "5 of 5 answers transferred from" in result.output
    meta = json.loads((run / (run / "LATEST").read_text() / "run.json").read_text())
    assert meta["answers"] == ANSWERS and meta["train"]["optimizer"] == "bertadam"  # preset
    # lr 0: the run's model is the checkpoint; vlpipe evaluate of both agrees
    expected = reference_answers(reference, gqa_folder, gqa_folder / "BEST.pth")
    vlpipe("predict", "--run", run, *data_args(gqa_folder), "--out", gqa_folder / "p.json")
    preds = json.loads((gqa_folder / "p.json").read_text())
    assert {p["questionId"]: p["prediction"] for p in preds} == expected
    # another architecture: refused, naming the file and the counts; --partial-init loads it
    other = json.dumps({**ORIGINAL_TINY, "l_layers": 3})
    failed = vlpipe(*args, "--model-config", other, "--out", gqa_folder / "r2", code=1)
    assert "BEST.pth" in failed.output and "l_layers 2 (file) vs 3 (model)" in failed.output
    ok = vlpipe(*args, "--model-config", other, "--out", gqa_folder / "r3", "--partial-init")
    assert "partial load: l_layers 2 (file) vs 3 (model)" in ok.output


def test_cli_evaluates_an_hf_folder_given_by_a_relative_path(gqa_folder, monkeypatch):
    from tests.conftest import vlpipe

    torch.manual_seed(0)
    LxmertForQuestionAnswering(hf_config(len(ANSWERS))).save_pretrained(gqa_folder / "hfqa")
    write_vocab(gqa_folder / "hfqa" / "vocab.txt")
    monkeypatch.chdir(gqa_folder)  # the folder, its vocab and the data all relative
    lxmert = ["--task", "gqa", "--answers", "label2ans.json"]
    data = ["--features", "img.h5", "--annotations", "q.json"]
    result = vlpipe("evaluate", "--run", "hfqa", *data, *lxmert, "--json")
    assert json.loads(result.stdout)["n"] == 12
    vlpipe("predict", "--run", "hfqa", *data, *lxmert, "--out", "p.json")
    assert len(json.loads((gqa_folder / "p.json").read_text())) == 12
