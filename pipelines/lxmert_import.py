"""LXMERT checkpoints users already have, in `vlpipe evaluate / predict / train`.

- evaluate / predict: a fine-tuned task model of airsplay/lxmert (BEST.pth / LAST.pth written by
  src/tasks/{vqa,gqa,nlvr2}.py) or a Hugging Face LxmertForQuestionAnswering folder becomes a
  complete TaskModel, with its answer list (`--answers`, or the config.json's id2label) and the
  BERT vocab.txt it was trained with (`--vocab`).
- train --init: the backbone loads (the same architecture unless a partial load is asked for),
  and an answer head in the file moves into the task head by answer string: exact matches for a
  fine-tuned head, LXMERT's `convert_ans` against the pre-training table all_ans.json for the
  9,500-answer head of Epoch20_LXRT.pth (LXMERT's `--loadLXMERTQA`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlpipe.errors import ConfigError
from vlpipe.fusion.answer_tables import AnswerList, read_answer_list, transfer_rows
from vlpipe.fusion.lxmert import (
    ANSWER_HEADS,
    LxmertCheckpoint,
    load_backbone,
    read_lxmert_checkpoint,
)
from vlpipe.fusion.model import TaskModel
from vlpipe.fusion.tasks import Task, get_task
from vlpipe.tokenizer import MAX_LENGTH
from vlpipe.weights import WEIGHT_FILES, WeightsError, load_into


@dataclass
class ImportOptions:
    """What an LXMERT checkpoint does not carry: its task, answer list and tokenizer vocab."""

    task: str | None = None
    answers: str | None = None  # trainval_label2ans.json / trainval_ans2label.json
    vocab: str | None = None  # bert-base-uncased's vocab.txt
    max_length: int = MAX_LENGTH


def is_foreign(path: str | Path) -> bool:
    """A weights file, or a folder of weights that is not part of a `vlpipe train` run."""
    path = Path(path)
    if path.is_file():
        return True
    if not path.is_dir() or (path / "run.json").exists():  # a run's ckpt-NNNNNNN folder
        return False
    return any((path / name).is_file() for name in WEIGHT_FILES)


def import_task_model(path: str | Path, opts: ImportOptions) -> tuple[TaskModel, dict, Task]:
    """A TaskModel holding a fine-tuned LXMERT checkpoint, and run metadata for it."""
    if opts.task is None:
        raise ConfigError(
            f"{path}: not a vlpipe run folder; to use it as an LXMERT checkpoint pass --task"
        )
    task = get_task(opts.task)
    ckpt = read_lxmert_checkpoint(path)
    if ckpt.head_shape is None:
        raise WeightsError(
            f"{path}: no answer head (logit_fc.* / answer_head.logit_fc.*): a pre-trained "
            "checkpoint is a starting point for `vlpipe train --init`, not a task model"
        )
    config = ckpt.fusion_config()
    _check_head_input(ckpt, config.hidden * task.images_per_example, task)
    answers = _model_answers(ckpt, task, opts.answers)
    model = TaskModel("lxmert", config, len(answers), task.images_per_example)
    report = load_backbone(model.fusion, ckpt, strict=True)
    load_into(model.head, ckpt.head, path)
    report.ignored = [k for k in report.ignored if not k.startswith(ANSWER_HEADS)]
    report.notes.append(f"answer head: loaded, {len(answers)} answers")
    print(report, file=sys.stderr)  # stdout carries `vlpipe evaluate --json`
    meta = {
        "task": task.name,
        "fusion": "lxmert",
        "fusion_config": dataclasses.asdict(config),
        "answers": answers,
        "tokenizer": {
            "vocab": _vocab(path, opts.vocab, config.vocab_size),
            "max_length": opts.max_length,
        },
        "caches": None,  # trained elsewhere: no feature provenance to compare with
        "source": {"checkpoint": str(path), "layout": ckpt.layout},
    }
    return model, meta, task


def _model_answers(ckpt: LxmertCheckpoint, task: Task, answers: str | None) -> list[str]:
    """The head's answers: --answers, else config.json's id2label, else the task's fixed ones."""
    n = ckpt.head_shape[1]
    if answers is not None:
        listed = read_answer_list(answers)
        found, source = listed.answers, listed.source
    elif ckpt.labels is not None:
        found, source = ckpt.labels, f"{ckpt.source} config.json id2label"
    elif task.fixed_answers is not None:
        found, source = list(task.fixed_answers), f"task {task.name}'s answers"
    else:
        raise ConfigError(
            f"{ckpt.source}: its answer head has {n} outputs and nothing names them: pass "
            f"--answers (LXMERT's data/{task.name}/trainval_label2ans.json)"
        )
    if task.fixed_answers is not None and found != list(task.fixed_answers):
        raise ConfigError(f"{source}: task {task.name} answers {list(task.fixed_answers)}")
    if len(found) != n:
        raise ConfigError(
            f"{source} lists {len(found)} answers, the answer head of {ckpt.source} has {n}"
        )
    return list(found)


def _check_head_input(ckpt: LxmertCheckpoint, ours: int, task: Task) -> None:
    theirs = ckpt.head_shape[0]
    if theirs != ours:
        raise WeightsError(
            f"{ckpt.source}: its answer head takes {theirs} inputs, a {task.name} head {ours} "
            "(NLVR2 heads take the two pooled outputs concatenated)"
        )


def _vocab(path: str | Path, vocab: str | None, vocab_size: int) -> str:
    """The WordPiece vocab.txt (--vocab, else the HF folder's); its size must be the
    checkpoint's embedding rows."""
    from vlpipe.tokenizer import bert_tokenizer, find_vocab

    beside = Path(path) / "vocab.txt"
    if vocab is None and beside.is_file():
        vocab = str(beside)
    if vocab is None:
        raise ConfigError(
            f"{path}: an LXMERT checkpoint carries no tokenizer: pass --vocab PATH/vocab.txt "
            "(bert-base-uncased's, which LXMERT uses)"
        )
    size = len(bert_tokenizer(vocab))
    if size != vocab_size:
        raise WeightsError(
            f"{find_vocab(vocab)}: {size} tokens, but the embeddings of {path} have "
            f"{vocab_size} rows: not the vocabulary the checkpoint was trained with"
        )
    return str(find_vocab(vocab).resolve())


# --- train --init -------------------------------------------------------------------------


def initialise_from(
    model: TaskModel,
    path: str | Path,
    task: Task,
    answers: list[str],
    *,
    answer_table: str | None = None,
    answers_file: str | None = None,
    partial: bool = False,
) -> list[str]:
    """Load an LXMERT checkpoint's backbone into `model` and transfer its answer head, if any,
    into the task head (whose classes are `answers`); returns the report lines."""
    ckpt, table = read_init(path)
    report = load_backbone(model.fusion, ckpt, partial=partial)
    if table is None or answer_table is not None:
        table = _head_answers(ckpt, task, answer_table, answers_file)
    return [str(report), transfer_head(model, ckpt, answers, table)]


def pretrain_run(path: str | Path, which: str | None = None) -> tuple[Path, dict] | None:
    """(checkpoint folder, its run.json) when `path` is a `vlpipe pretrain` run folder, else
    None. `which`: best | latest | a step (default: best when the run validated)."""
    from vlpipe.fusion.checkpoint import LATEST, PRETRAIN_KIND, load_meta, select_checkpoint

    path = Path(path)
    if not (path.is_dir() and (path / LATEST).exists()):
        return None
    folder, _ = select_checkpoint(path, which)
    meta = load_meta(folder)
    return (folder, meta) if meta.get("kind") == PRETRAIN_KIND else None


def read_init(path: str | Path) -> tuple[LxmertCheckpoint, AnswerList | None]:
    """An --init checkpoint, and the answer table of its QA head when the file says it: a
    pre-training run records its table (answers normalised as LXMERT's convert_ans) and its
    attention heads; any other file is read as `read_lxmert_checkpoint` reads it."""
    run = pretrain_run(path)
    if run is None:
        return read_lxmert_checkpoint(path), None
    folder, meta = run
    ckpt = read_lxmert_checkpoint(folder / "model.safetensors")
    backbone = meta["model_config"]["backbone"]
    ckpt.arch, ckpt.arch_from = {**ckpt.arch, "heads": backbone["heads"]}, "run.json"
    table = AnswerList(f"{path} (its answer table)", meta["answers"], pretraining=True)
    return ckpt, table if ckpt.head_shape is not None else None


def init_defaults(path: str | Path | None) -> tuple[dict, str | None]:
    """What fine-tuning from --init takes from a pre-training run unless told otherwise: its
    backbone config and its vocab.txt. ({}, None) for any other checkpoint."""
    run = pretrain_run(path) if path is not None else None
    if run is None:
        return {}, None
    from vlpipe.pipelines.train_job import VOCAB_FILE

    vocab = Path(path) / VOCAB_FILE
    return dict(run[1]["model_config"]["backbone"]), str(vocab) if vocab.is_file() else None


def _head_answers(
    ckpt: LxmertCheckpoint, task: Task, table: str | None, answers_file: str | None
) -> AnswerList | None:
    """What names the checkpoint head's rows: --answer-table, else config.json's id2label, else
    the task's fixed answers or --answers when they are as many as the head's outputs."""
    if ckpt.head_shape is None:
        return None
    if table is not None:
        return read_answer_list(table)
    if ckpt.labels is not None:
        return AnswerList(f"{ckpt.source} config.json id2label", ckpt.labels)
    n = ckpt.head_shape[1]
    if task.fixed_answers is not None and len(task.fixed_answers) == n:
        return AnswerList(f"task {task.name}'s answers", list(task.fixed_answers))
    if answers_file is not None:
        listed = read_answer_list(answers_file)
        return listed if len(listed.answers) == n else None
    return None


def transfer_head(
    model: TaskModel, ckpt: LxmertCheckpoint, answers: list[str], old: AnswerList | None
) -> str:
    """Copy the checkpoint's answer head into model.head: its first Linear and LayerNorm as they
    are, and the rows of its last Linear by answer (zeros for answers it lacks)."""
    if ckpt.head_shape is None:
        return "answer head: none in the checkpoint; the task head starts from BERT init"
    if model.choices:
        return (
            f"answer head: NOT transferred: a {model.choices}-way multiple-choice head scores "
            "each candidate (one output), which no answer row of the checkpoint's means"
        )
    if old is None:
        return (
            f"answer head: NOT transferred ({ckpt.head_shape[1]} answers that nothing names); "
            "pass --answer-table: LXMERT's data/lxmert/all_ans.json for the pre-trained "
            "9,500-answer head, the answer list of a fine-tuned one"
        )
    own = model.head.state_dict()
    if ckpt.head["net.1.weight"].shape != own["net.1.weight"].shape:
        return (
            f"answer head: NOT transferred: its first layer is "
            f"{tuple(ckpt.head['net.1.weight'].shape)}, the task head's "
            f"{tuple(own['net.1.weight'].shape)} (NLVR2 heads take two pooled outputs)"
        )
    weight, bias, rows = transfer_rows(
        ckpt.head["net.4.weight"], ckpt.head["net.4.bias"], old, answers
    )
    state: dict[str, Any] = {k: v for k, v in ckpt.head.items() if not k.startswith("net.4.")}
    load_into(model.head, {**state, "net.4.weight": weight, "net.4.bias": bias}, ckpt.source)
    how = " (LXMERT's convert_ans)" if old.pretraining else " (exact answer match)"
    return str(rows) + how
