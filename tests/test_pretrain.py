"""`vlpipe pretrain`: LXMERT's masking, negatives and answer sampling (statistics over many
examples), the six losses against transformers' LxmertForPreTraining, exact resume with dropout,
both exports, fine-tuning from a pre-training run (`train --init RUN`), patch caches, CLI
errors, and BEST following the lowest validation loss. Tiny caches and models throughout."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import vlpipe
from tests.fusion_fixtures import COLORS, DIM, image_cache, region_cache
from vlpipe.data_manifests.pretrain import Sentence
from vlpipe.fusion.answer_tables import AnswerList, qa_label_ids
from vlpipe.fusion.data import CacheSet
from vlpipe.fusion.lxmert import LxmertFusionConfig
from vlpipe.fusion.pretrain_data import Masking, PretrainDataset
from vlpipe.fusion.pretrain_losses import pretrain_losses
from vlpipe.fusion.pretrain_model import TASKS, TIED, LxmertPretraining, PretrainModelConfig

TINY = {"hidden": 32, "heads": 2, "intermediate": 64, "l_layers": 1, "r_layers": 1, "x_layers": 1}
LABELS = (5, 5)  # detector classes of the tiny heads; the caches' ids stay below them
MODEL_CONFIG = json.dumps({**TINY, "num_objects": LABELS[0], "num_attrs": LABELS[1]})
MAX_LENGTH = 20
EPOCHS = 3  # of the statistics: each epoch draws every example's masking anew


def within_binomial(hits: int, n: int, p: float, sigmas: float = 4.5) -> bool:
    """hits / n is p up to `sigmas` binomial standard deviations."""
    return abs(hits / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def shares_ok(counts: dict[str, int], expected: dict[str, float]) -> bool:
    n = sum(counts.values())
    return all(within_binomial(counts[k], n, p) for k, p in expected.items())


@pytest.fixture(scope="module")
def tokenizer():
    from vlpipe.tokenizer import bert_tokenizer, default_vocab

    return bert_tokenizer(default_vocab())


# ---------------------------------------------------------------- many examples, for statistics

N_IMAGES = 150


def many_sentences() -> list[Sentence]:
    """Per image: two captions of varied length (some cut at MAX_LENGTH, some padded) and one
    question, with one answer (even images) or two weighted 0.9 / 0.3 (odd images). Every text
    starts with its image and sentence number, so its token ids name it."""
    words = ("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "near")
    words += ("the", "old", "river", "bank", "today", "again", "and", "again")
    sentences = []
    for i in range(N_IMAGES):
        for j in range(2):
            text = f"photo {i} caption {j} " + " ".join(words[: (5 * i + 7 * j) % 17])
            sentences.append(Sentence(f"img{i}_mscoco_{j:03d}", f"img{i}", text, "mscoco", None))
        label = {COLORS[i % 3]: 0.9} if i % 2 == 0 else {COLORS[i % 3]: 0.9, "other": 0.3}
        text = f"photo {i} question: what color is it?"
        sentences.append(Sentence(f"img{i}_vqa_000", f"img{i}", text, "vqa", label))
    return sentences


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    folder = tmp_path_factory.mktemp("many")
    arrays = region_cache(folder / "img.h5", N_IMAGES, regions=10, labels=LABELS)
    sentences = many_sentences()
    table = AnswerList("test", [*COLORS, "other"], pretraining=True)
    return SimpleNamespace(
        images=CacheSet([folder / "img.h5"]),
        arrays=arrays,
        sentences=sentences,
        image=np.array([int(s.image_key[3:]) for s in sentences]),
        table=table,
        qa=[qa_label_ids(s.label, table) for s in sentences],
    )


def dataset(many, tokenizer, tasks, masking: Masking = Masking()) -> PretrainDataset:
    return PretrainDataset(
        many.sentences,
        many.images,
        tokenizer,
        many.qa,
        tasks,
        max_length=MAX_LENGTH,
        masking=masking,
        num_labels=LABELS,
    )


def epoch_batches(ds: PretrainDataset, epochs: int = EPOCHS):
    """Every example of each epoch, as one batch of numpy arrays."""
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        yield {k: v.numpy() for k, v in ds[range(len(ds))].items()}


def tokenized(many, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """The sentences' unmasked ids and attention mask, tokenized here."""
    enc = tokenizer(
        [s.text for s in many.sentences],
        padding="max_length",
        truncation=True,
        max_length=MAX_LENGTH,
        return_tensors="np",
    )
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(bool)


def test_word_masking_statistics(many, tokenizer):
    """15% of the WordPiece tokens are picked ([CLS], [SEP] and padding never); of them 80%
    become [MASK], 10% a random id, 10% stay; the label is the original id, -1 elsewhere."""
    ds = dataset(many, tokenizer, ("mlm",))  # no matching: every example shows its own text
    ids, mask = tokenized(many, tokenizer)
    special = np.isin(ids, [tokenizer.cls_token_id, tokenizer.sep_token_id]) | ~mask
    assert (~mask).any() and mask.all(1).any()  # padded sentences, and cut ones
    picked_n = candidates = 0
    outcome = dict.fromkeys(("mask", "random", "same"), 0)
    for batch in epoch_batches(ds):
        shown, labels = batch["text_ids"], batch["mlm_labels"]
        assert np.array_equal(batch["text_mask"], mask)
        picked = labels != -1
        assert not (picked & special).any()
        assert np.array_equal(labels[picked], ids[picked])
        assert np.array_equal(shown[~picked], ids[~picked])
        assert ((shown >= 0) & (shown < len(tokenizer))).all()
        picked_n, candidates = picked_n + picked.sum(), candidates + (~special).sum()
        is_mask = shown[picked] == tokenizer.mask_token_id
        same = ~is_mask & (shown[picked] == ids[picked])
        outcome["mask"] += is_mask.sum()
        outcome["same"] += same.sum()
        outcome["random"] += (~is_mask & ~same).sum()
    assert within_binomial(picked_n, candidates, 0.15), picked_n / candidates
    assert shares_ok(outcome, {"mask": 0.8, "random": 0.1, "same": 0.1}), outcome


def test_region_masking_statistics(many, tokenizer):
    """15% of the real regions are picked (padding regions never); of them 80% are zeroed,
    10% get a real region of some image of the data, 10% stay; feat_target is the unmasked
    feature, boxes are never masked, detector labels are -1 / conf 0 on padding."""
    ds = dataset(many, tokenizer, ("feat", "obj", "attr"))
    arrays = many.arrays
    feats, real = arrays["image_feats"][many.image], arrays["image_mask"][many.image]
    assert (~real).any()
    real_rows = {row.tobytes() for row in arrays["image_feats"][arrays["image_mask"]]}
    boxes = arrays["image_boxes"][many.image] / np.array([40, 30, 40, 30], np.float32)
    picked_n = candidates = 0
    outcome = dict.fromkeys(("zero", "random", "same"), 0)
    for batch in epoch_batches(ds):
        shown, picked = batch["region_feats"], batch["feat_mask"] == 1
        assert np.array_equal(batch["feat_target"], feats)
        assert set(np.unique(batch["feat_mask"])) <= {0.0, 1.0}
        assert not (picked & ~real).any()
        assert np.array_equal(shown[~picked], feats[~picked])
        np.testing.assert_allclose(batch["region_boxes"], np.clip(boxes, 0, 1), atol=1e-6)
        assert np.array_equal(batch["region_mask"], real)
        for task, ids, conf in (("obj", "obj_ids", "obj_conf"), ("attr", "attr_ids", "attr_conf")):
            labels = np.where(real, arrays[ids][many.image], -1)
            assert np.array_equal(batch[f"{task}_labels"], labels)
            assert np.array_equal(batch[f"{task}_conf"], arrays[conf][many.image] * real)
        picked_n, candidates = picked_n + picked.sum(), candidates + real.sum()
        zero = (shown[picked] == 0).all(-1)
        same = (shown[picked] == feats[picked]).all(-1)
        swapped = shown[picked][~zero & ~same]
        assert all(row.tobytes() in real_rows for row in swapped)
        outcome["zero"] += zero.sum()
        outcome["same"] += same.sum()
        outcome["random"] += len(swapped)
    assert within_binomial(picked_n, candidates, 0.15), picked_n / candidates
    assert shares_ok(outcome, {"zero": 0.8, "random": 0.1, "same": 0.1}), outcome


def test_an_example_is_drawn_alike_in_any_batch(many, tokenizer):
    """Resume and workers rely on it: example i of epoch e is masked the same whatever batch
    holds it, and anew in another epoch."""
    ds = dataset(many, tokenizer, TASKS)
    whole = ds[range(40)]
    part = ds[[31, 7, 12]]
    for key, value in part.items():
        assert torch.equal(value, whole[key][[31, 7, 12]]), key
    ds.set_epoch(1)
    assert not torch.equal(ds[range(40)]["mlm_labels"], whole["mlm_labels"])


def test_mismatched_pairs_take_a_sentence_of_another_image(many, tokenizer):
    """Half the pairs are mismatched (matched 0): their sentence is never the image's own nor
    any other of the same image; qa_target is -1 on them and on captions, and the answer of a
    matched question otherwise."""
    ds = dataset(many, tokenizer, ("mlm", "matched", "qa"))
    ids, _ = tokenized(many, tokenizer)
    row_of = {row.tobytes(): i for i, row in enumerate(ids)}
    assert len(row_of) == len(ids)  # every sentence is known by its ids
    index = np.arange(len(ids))
    question = np.array([s.label is not None for s in many.sentences])
    mismatched = examples = 0
    for batch in epoch_batches(ds):
        labels = batch["mlm_labels"]
        unmasked = np.where(labels >= 0, labels, batch["text_ids"])
        partner = np.array([row_of[row.tobytes()] for row in unmasked])
        off = batch["matched"] == 0
        assert np.array_equal(partner[~off], index[~off])
        assert (many.image[partner[off]] != many.image[off]).all()
        target = batch["qa_target"]
        assert (target[off] == -1).all()
        assert (target[~question] == -1).all()
        own = ~off & question
        colour = np.array([many.table.answers.index(COLORS[i % 3]) for i in many.image])
        one = own & (many.image % 2 == 0)  # a single answer: always that one
        assert np.array_equal(target[one], colour[one])
        assert np.isin(target[own & ~one], [*range(3), many.table.answers.index("other")]).all()
        mismatched, examples = mismatched + off.sum(), examples + len(off)
        assert len(set(partner[off])) > off.sum() // 2  # drawn at random, not a fixed pairing
    assert within_binomial(mismatched, examples, 0.5), mismatched / examples


def test_answers_are_sampled_in_proportion_to_their_scores(many, tokenizer):
    """A question labelled {colour: 0.9, other: 0.3} is trained on its colour 75% of the time."""
    ds = dataset(many, tokenizer, ("qa",))
    other = many.table.answers.index("other")
    two = np.array([s.label is not None and len(s.label) == 2 for s in many.sentences])
    colour = np.array([many.table.answers.index(COLORS[i % 3]) for i in many.image])
    hits = n = 0
    for batch in epoch_batches(ds, epochs=6):
        target = batch["qa_target"][two]
        assert np.isin(target, [other, *range(3)]).all()
        hits, n = hits + (target == colour[two]).sum(), n + len(target)
    assert within_binomial(hits, n, 0.75), hits / n


# ---------------------------------------------------------------- the losses against transformers


def tiny_config(vocab_size: int, answers: int, tasks=TASKS) -> PretrainModelConfig:
    backbone = LxmertFusionConfig(**TINY, vocab_size=vocab_size, visual_feat_dim=DIM)
    return PretrainModelConfig(backbone, tasks, answers, *LABELS)


def hf_model(config: PretrainModelConfig, state: dict, **flags):
    """transformers' LxmertForPreTraining of `config` (with `flags` changed) holding `state`,
    in eval mode; and what load_state_dict reported."""
    from transformers import LxmertForPreTraining

    hf_config = config.to_transformers()
    hf_config.update(flags)
    model = LxmertForPreTraining(hf_config)
    model.visual_loss_normalizer = 1 / 0.15  # its default is 6.67
    report = model.load_state_dict(state, strict=False)
    return model.eval(), report


def hf_inputs(batch: dict) -> dict:
    return {
        "input_ids": batch["text_ids"],
        "attention_mask": batch["text_mask"],
        "visual_feats": batch["region_feats"],
        "visual_pos": batch["region_boxes"],
        "visual_attention_mask": batch["region_mask"],
    }


def hf_labels(batch: dict) -> dict:
    """The batch's labels as LxmertForPreTraining takes them (-100 where ours say -1)."""

    def ignore(t):
        return t.masked_fill(t == -1, -100)

    return {
        "labels": ignore(batch["mlm_labels"]),
        "matched_label": batch["matched"],
        "ans": ignore(batch["qa_target"]),
        "obj": (ignore(batch["obj_labels"]), batch["obj_conf"]),
        "attr": (ignore(batch["attr_labels"]), batch["attr_conf"]),
        "feat": (batch["feat_target"], batch["feat_mask"]),
    }


def hand_batch(vocab_size: int) -> dict[str, torch.Tensor]:
    """Three texts (one padded) on images with padding regions; a few positions to predict."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab_size, (3, 12), generator=g)
    ids[:, 0], ids[:, -1] = 1, 2  # as [CLS], [SEP]
    text_mask = torch.ones(3, 12, dtype=torch.bool)
    text_mask[2, 8:] = False
    labels = torch.full((3, 12), -1)
    labels[0, 3], labels[1, 5], labels[2, 2] = 7, 8, 9
    boxes = torch.rand(3, 8, 2, generator=g) * 0.5
    region_mask = torch.ones(3, 8, dtype=torch.bool)
    region_mask[1, 5:] = False
    return {
        "text_ids": ids,
        "text_mask": text_mask,
        "mlm_labels": labels,
        "region_feats": torch.randn(3, 8, DIM, generator=g),
        "region_boxes": torch.cat([boxes, boxes + 0.5], -1),
        "region_mask": region_mask,
    }


def test_losses_equal_transformers(many, tokenizer):
    """Each of the six losses, and their sum, equal LxmertForPreTraining's on the same weights
    and batch (mismatched pairs, padding regions, masked tokens and regions in it)."""
    ds = dataset(many, tokenizer, TASKS, Masking(0.3, 0.3))
    batch = ds[range(0, len(ds), 13)]  # 35 examples: captions and questions of 35 images
    assert (batch["matched"] == 0).any() and (batch["qa_target"] >= 0).any()
    assert (batch["feat_mask"] == 1).any() and not batch["region_mask"].all()
    torch.manual_seed(0)
    ours = LxmertPretraining(tiny_config(len(tokenizer), len(many.table.answers))).eval()
    with torch.no_grad():
        parts = pretrain_losses(ours(batch), batch)
    assert list(parts) == list(TASKS)
    state, labels, inputs = ours.state_dict(), hf_labels(batch), hf_inputs(batch)
    full, report = hf_model(ours.config, state)
    assert set(report.missing_keys) <= {TIED} and not report.unexpected_keys, report
    visual = {key: labels.pop(key) for key in ("obj", "attr", "feat")}
    with torch.no_grad():
        total = full(**inputs, **labels, obj_labels=visual).loss
        hf_parts = {
            "mlm": full(**inputs, labels=labels["labels"]).loss,
            "matched": full(**inputs, matched_label=labels["matched_label"]).loss,
            "qa": full(**inputs, ans=labels["ans"]).loss,
        }
        for task in visual:  # a model whose config turns on this visual loss alone
            flags = {f"visual_{name}_loss": name == task for name in visual}
            alone, report = hf_model(ours.config, state, **flags)
            assert set(report.missing_keys) <= {TIED}, report
            hf_parts[task] = alone(**inputs, obj_labels={task: visual[task]}).loss
    for task in TASKS:
        torch.testing.assert_close(parts[task], hf_parts[task], rtol=1e-5, atol=0, msg=task)
    torch.testing.assert_close(sum(parts.values()), total, rtol=1e-5, atol=0)


def test_every_trainable_parameter_gets_a_gradient_whatever_the_tasks():
    """DistributedDataParallel waits for a gradient on every trainable parameter: for each set
    of tasks, what no task reads is frozen and everything else gets one; all six train all."""
    import itertools

    batch = hand_batch(100)
    g = torch.Generator().manual_seed(1)
    batch |= {
        "matched": torch.tensor([0, 1, 1]),
        "qa_target": torch.tensor([2, -1, 0]),
        "feat_target": torch.randn(3, 8, DIM, generator=g),
        "feat_mask": (torch.rand(3, 8, generator=g) < 0.5).float() * batch["region_mask"],
    }
    for task in ("obj", "attr"):
        batch[f"{task}_labels"] = torch.randint(0, 5, (3, 8), generator=g)
        batch[f"{task}_conf"] = torch.rand(3, 8, generator=g)
    for n in range(1, len(TASKS) + 1):
        for tasks in itertools.combinations(TASKS, n):
            model = LxmertPretraining(tiny_config(100, 3, tasks))
            sum(pretrain_losses(model(batch), batch).values()).backward()
            trainable = {k: p for k, p in model.named_parameters() if p.requires_grad}
            assert [k for k, p in trainable.items() if p.grad is None] == [], tasks
            if n == len(TASKS):
                assert len(trainable) == len(list(model.parameters()))


# ---------------------------------------------------------------- runs of `vlpipe pretrain`

RUN_STEPS = 9  # 18 sentences, batch 6, 3 epochs


def write_pretrain_json(path: Path, n_images: int) -> Path:
    """LXMERT's pre-training json: two captions and one answered question per image."""
    items = []
    for i in range(n_images):
        colour = COLORS[i % 3]
        items.append(
            {
                "img_id": f"img{i}",
                "sentf": {"mscoco": [f"a {colour} shape", f"picture {i}"], "vqa": ["its color?"]},
                "labelf": {"vqa": [{colour: 1.0}]},
            }
        )
    path.write_text(json.dumps(items))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pretrain")
    region_cache(folder / "img.h5", 6, labels=LABELS)
    write_pretrain_json(folder / "pt.json", 6)
    return folder


def pretrain_args(folder: Path, out: Path, *extra) -> list:
    return [
        "pretrain",
        "--features",
        folder / "img.h5",
        "--data",
        folder / "pt.json",
        "--val-data",
        folder / "pt.json",
        "--out",
        out,
        "--model-config",
        MODEL_CONFIG,  # dropout: LXMERT's 0.1
        "--epochs",
        3,
        "--batch-size",
        6,
        "--lr",
        3e-2,  # high: the validation loss jumps about, so its lowest is neither first nor last
        "--val-every",
        1,
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def run(inputs) -> Path:
    """A validated run of all six tasks, with dropout, read by the tests below (not changed)."""
    vlpipe(*pretrain_args(inputs, inputs / "run"))
    return inputs / "run"


def best_folder(run: Path) -> Path:
    return run / (run / "BEST").read_text().strip()


def log_rows(run: Path) -> list[dict]:
    """train_log.csv without its timing column."""
    with open(run / "train_log.csv") as fh:
        return [{k: v for k, v in r.items() if k != "samples_per_s"} for r in csv.DictReader(fh)]


def test_resume_with_dropout_equals_the_uninterrupted_run(inputs, run):
    """Stopped mid-epoch twice (each time after a validation) and resumed: the same weights,
    bit for bit, the same logs and the same BEST."""
    meta = json.loads((best_folder(run) / "run.json").read_text())
    assert meta["model_config"]["backbone"]["dropout"] > 0
    assert meta["tasks"] == list(TASKS)
    out = inputs / "cut"
    vlpipe(*pretrain_args(inputs, out, "--max-steps", 2))
    torch.manual_seed(123)  # another process state: resume must not depend on it
    vlpipe(*pretrain_args(inputs, out, "--max-steps", 5, "--resume"))
    torch.manual_seed(7)
    vlpipe(*pretrain_args(inputs, out, "--resume"))
    last = f"ckpt-{RUN_STEPS:07d}"
    assert (out / "LATEST").read_text().strip() == (run / "LATEST").read_text().strip() == last
    straight, resumed = (
        load_file(run / last / "model.safetensors"),
        load_file(out / last / "model.safetensors"),
    )
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name
    assert log_rows(out) == log_rows(run)
    assert len(log_rows(run)) == RUN_STEPS
    assert (out / "eval_log.jsonl").read_text() == (run / "eval_log.jsonl").read_text()
    assert (out / "BEST").read_text() == (run / "BEST").read_text()


def test_best_follows_the_lowest_total_validation_loss(run):
    """Pre-training judges by its loss: BEST names the validation with the lowest total (the sum
    of the parts), as the original's BEST_EVAL_LOSS_LXRT.pth."""
    from vlpipe.fusion.pretrain import PretrainObjective

    assert PretrainObjective(TASKS).higher_is_better is False
    evals = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == list(range(1, RUN_STEPS + 1))
    for e in evals:
        assert e["total"] == pytest.approx(sum(e[t] for t in TASKS), rel=1e-9)
    totals = {e["step"]: e["total"] for e in evals}
    lowest, highest = min(totals, key=totals.get), max(totals, key=totals.get)
    # what tells the lowest from the highest, the first and the latest validation
    assert lowest != highest and lowest not in (1, RUN_STEPS), totals
    assert (run / "BEST").read_text().strip() == f"ckpt-{lowest:07d}"
    meta = json.loads((run / f"ckpt-{lowest:07d}" / "run.json").read_text())
    assert meta["best"] == {"metric": "total", "value": totals[lowest], "step": lowest}


def test_export_huggingface_loads_in_transformers_with_equal_outputs(run, tmp_path):
    from transformers import LxmertForPreTraining

    from vlpipe.fusion import checkpoint as ckpt

    out = tmp_path / "hf"
    vlpipe("export-lxmert", run, "--out", out)
    hf, info = LxmertForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    meta = json.loads((best_folder(run) / "run.json").read_text())
    assert [a["ans"] for a in json.loads((out / "answers.json").read_text())] == meta["answers"]
    assert (out / "vocab.txt").read_bytes() == (run / "vocab.txt").read_bytes()
    ours = LxmertPretraining(PretrainModelConfig(**meta["model_config"]))
    ckpt.load_weights(best_folder(run), ours)
    batch = hand_batch(hf.config.vocab_size)
    with torch.no_grad():
        mine = ours.eval()(batch)
        theirs = hf.eval()(**hf_inputs(batch))
    picked = batch["mlm_labels"] >= 0
    torch.testing.assert_close(theirs.prediction_logits[picked], mine["mlm"])
    torch.testing.assert_close(theirs.cross_relationship_score, mine["matched"])
    torch.testing.assert_close(theirs.question_answering_score, mine["qa"])
    refused = vlpipe("export-lxmert", run, "--out", out, code=1)
    assert "--overwrite" in refused.output and "Traceback" not in refused.output
    vlpipe("export-lxmert", run, "--out", out, "--overwrite")


def test_export_original_layout(run, tmp_path):
    from vlpipe.fusion.lxmert import read_lxmert_checkpoint

    out = tmp_path / "Epoch03_LXRT.pth"
    vlpipe("export-lxmert", run, "--format", "original", "--out", out)
    state = torch.load(out, weights_only=True)
    heads = ("module.bert.", "module.cls.", "module.obj_predict_head.", "module.answer_head.")
    assert all(k.startswith(heads) for k in state)
    assert {next(h for h in heads if k.startswith(h)) for k in state} == set(heads)
    ours = load_file(best_folder(run) / "model.safetensors")
    words = ours["lxmert.embeddings.word_embeddings.weight"]
    assert torch.equal(state["module.cls.predictions.decoder.weight"], words)
    for key, value in ours.items():
        name = "module.bert." + key[7:] if key.startswith("lxmert.") else "module." + key
        assert torch.equal(state[name], value), key
    ckpt = read_lxmert_checkpoint(out)
    assert ckpt.layout == "original" and not ckpt.unexpected
    assert ckpt.backbone.keys() == {k[7:] for k in ours if k.startswith("lxmert.")}
    refused = vlpipe("export-lxmert", run, "--format", "original", "--out", out, code=1)
    assert "--overwrite" in refused.output and "Traceback" not in refused.output
    vlpipe("export-lxmert", run, "--format", "original", "--out", out, "--overwrite")


def test_train_init_from_a_pretrain_run(inputs, run, tmp_path, monkeypatch):
    """`vlpipe train --init RUN` starts from the run's BEST backbone, its vocab and sizes, and
    the QA head's rows of the answers in the run's table (zeros for one that is not)."""
    from vlpipe.pipelines import train_job

    answers = {f"q{i}": COLORS[i % 3] for i in range(6)} | {"q6": "purple"}
    questions = {
        key: {"imageId": f"img{int(key[1:]) % 6}", "question": "what color?", "answer": answer}
        for key, answer in answers.items()
    }
    (tmp_path / "q.json").write_text(json.dumps(questions))
    started = {}

    def at_step_0(model, task, data, cfg, out, meta, **kwargs):
        started.update(model=model, meta=meta)
        return {}

    monkeypatch.setattr(train_job, "train", at_step_0)
    result = vlpipe(
        "train",
        "--features",
        inputs / "img.h5",
        "--task",
        "gqa",
        "--annotations",
        tmp_path / "q.json",
        "--fusion",
        "lxmert",
        "--init",
        run,
        "--out",
        tmp_path / "ft",
        "--epochs",
        1,
        "--no-progress",
    )
    assert "answer head: 3 of 4 answers transferred" in result.output, result.output
    model, meta = started["model"], started["meta"]
    pretrained = load_file(best_folder(run) / "model.safetensors")
    backbone = model.fusion.lxmert.state_dict()
    assert backbone.keys() == {k[7:] for k in pretrained if k.startswith("lxmert.")}
    for name, value in backbone.items():
        assert torch.equal(value, pretrained["lxmert." + name]), name
    head = model.head.state_dict()
    for ours, theirs in (("net.1", "logit_fc.0"), ("net.3", "logit_fc.2")):
        for p in ("weight", "bias"):
            assert torch.equal(head[f"{ours}.{p}"], pretrained[f"answer_head.{theirs}.{p}"])
    table = json.loads((best_folder(run) / "run.json").read_text())["answers"]
    assert "purple" in meta["answers"] and "purple" not in table
    last = {p: pretrained[f"answer_head.logit_fc.3.{p}"] for p in ("weight", "bias")}
    for row, answer in enumerate(meta["answers"]):
        for p, old in last.items():
            want = old[table.index(answer)] if answer in table else torch.zeros_like(old[0])
            assert torch.equal(head[f"net.4.{p}"][row], want), (answer, p)
    assert meta["fusion_config"] == meta["fusion_config"] | TINY
    assert (tmp_path / "ft" / "vocab.txt").read_bytes() == (run / "vocab.txt").read_bytes()


def test_patch_cache_pretrains_without_obj_and_attr_and_says_why(inputs, tmp_path):
    image_cache(tmp_path / "patches.h5", 6, kind="patches")
    out = tmp_path / "run"
    result = vlpipe(
        "pretrain",
        "--features",
        tmp_path / "patches.h5",
        "--data",
        inputs / "pt.json",
        "--out",
        out,
        "--model-config",
        json.dumps(TINY),
        "--epochs",
        1,
        "--batch-size",
        6,
        "--no-progress",
    )
    for task in ("obj", "attr"):
        assert f"task {task} is off" in result.stderr and "detector labels" in result.stderr
    meta = json.loads((out / (out / "LATEST").read_text().strip() / "run.json").read_text())
    assert meta["tasks"] == ["mlm", "matched", "feat", "qa"]
    assert set(meta["tasks_off"]) == {"obj", "attr"}
    with open(out / "train_log.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [k for k in rows[0] if k.startswith("loss_")] == [
        "loss_mlm",
        "loss_matched",
        "loss_feat",
        "loss_qa",
    ]
    assert len(rows) == 3 and all(math.isfinite(float(r["loss"])) for r in rows)


def assert_clean_error(result, *fragments: str) -> None:
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in result.output, result.output


@pytest.mark.parametrize(
    "tasks, named",
    [(["mlm", "mlmm"], "mlmm"), (["foo"], "foo")],
    ids=["a-typo-beside-a-good-task", "only-an-unknown-task"],
)
def test_a_bad_task_name_is_a_clean_error_naming_it(inputs, tmp_path, tasks, named):
    flags = [arg for task in tasks for arg in ("--tasks", task)]
    result = vlpipe(*pretrain_args(inputs, tmp_path / "run", *flags), code=1)
    assert_clean_error(result, named)


def test_missing_data_is_a_clean_error(inputs, tmp_path):
    args = ["--features", inputs / "img.h5", "--out", tmp_path / "run", "--no-progress"]
    result = vlpipe("pretrain", *args, code=1)
    assert_clean_error(result, "--data")
