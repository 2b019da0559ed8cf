"""`vlpipe export-lxmert`: a pre-training run's model in the layouts other code reads.

- huggingface: a folder that transformers' `LxmertForPreTraining.from_pretrained` loads with
  nothing missing: config.json (LxmertConfig with the run's sizes and task flags),
  model.safetensors (the names are already LxmertForPreTraining's; the tied decoder is stored
  once, as transformers stores it), vocab.txt, and answers.json, the QA head's rows in
  LXMERT's all_ans.json format (`vlpipe train --init FOLDER --answer-table FOLDER/answers.json`).
- original: one .pth in the layout of airsplay/lxmert's Epoch20_LXRT.pth, the state dict of
  DataParallel(LXRTPretraining): `module.bert.*` (the backbone), `module.cls.*`,
  `module.obj_predict_head.*`, `module.answer_head.*`, the tied decoder under its own name too.
Nothing at --out is replaced unless --overwrite; then only the files named here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlpipe.errors import ConfigError
from vlpipe.fusion.checkpoint import RunError
from vlpipe.io import atomic_write, write_bytes_atomic, write_text_atomic
from vlpipe.pipelines.configs import LxmertExportJob
from vlpipe.weights import read_state_dict

HF_FILES = ("config.json", "model.safetensors", "vocab.txt", "answers.json")


def export_lxmert(job: LxmertExportJob) -> Path:
    from vlpipe.pipelines.lxmert_import import pretrain_run

    if not (job.run / "LATEST").exists():
        raise RunError(f"{job.run}: not a run folder (no LATEST checkpoint pointer)")
    run = pretrain_run(job.run, job.checkpoint)
    if run is None:
        raise RunError(f"{job.run}: not a `vlpipe pretrain` run (run.json kind is not pretrain)")
    folder, meta = run
    state = read_state_dict(folder / "model.safetensors")
    if job.format == "huggingface":
        return _huggingface(job, state, meta)
    return _original(job, state)


def _huggingface(job: LxmertExportJob, state: dict, meta: dict) -> Path:
    from safetensors.torch import save_file

    from vlpipe.fusion.pretrain_model import PretrainModelConfig

    out = job.out
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; the huggingface export is a folder")
    present = [name for name in HF_FILES if (out / name).exists()]
    if present and not job.overwrite:
        raise ConfigError(f"{out} already holds {', '.join(present)}: pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    config = PretrainModelConfig(**meta["model_config"]).to_transformers()
    config.architectures = ["LxmertForPreTraining"]
    write_text_atomic(out / "config.json", config.to_json_string())
    with atomic_write(out / "model.safetensors") as tmp:
        save_file(
            {k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt"}
        )
    write_bytes_atomic(out / "vocab.txt", (job.run / "vocab.txt").read_bytes())
    answers = [{"ans": answer, "dsets": []} for answer in meta["answers"]]
    write_text_atomic(out / "answers.json", json.dumps(answers))
    return out


def _original(job: LxmertExportJob, state: dict) -> Path:
    from vlpipe.fusion.pretrain_model import TIED

    out = job.out
    if out.is_dir() or (out.exists() and not job.overwrite):
        raise ConfigError(f"--out {out} exists: pass --overwrite (a file, not a folder)")
    renamed = {_original_name(k): v for k, v in state.items()}
    renamed["module." + TIED] = state["lxmert.embeddings.word_embeddings.weight"]
    with atomic_write(out) as tmp:
        torch.save(renamed, tmp)
    return out


def _original_name(key: str) -> str:
    """LxmertForPreTraining's name -> DataParallel(LXRTPretraining)'s."""
    if key.startswith("lxmert."):
        return "module.bert." + key.removeprefix("lxmert.")
    return "module." + key
