"""Run-folder checkpoints, written atomically.

    RUN/ckpt-000120/model.safetensors   weights
    RUN/ckpt-000120/trainer.pt          optimizer, scheduler, step, RNG states (for --resume)
    RUN/ckpt-000120/run.json            fusion + config, task, answer vocab, cache provenance
    RUN/LATEST                          name of the newest complete checkpoint

A checkpoint folder is filled under a temporary name and renamed when complete; LATEST is
replaced atomically after that. A crash at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlpipe.errors import VlpipeError
from vlpipe.io import atomic_folder, write_text_atomic
from vlpipe.weights import load_into, load_torch, read_state_dict

LATEST = "LATEST"
KEEP = 2  # checkpoints kept besides the newest "final"


class RunError(VlpipeError, RuntimeError):
    """A run folder that cannot be loaded; names the folder."""


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None,
) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:07d}"
    with atomic_folder(run_dir / name) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "run.json").write_text(json.dumps(dict(meta, step=step), indent=1, default=str))
    write_text_atomic(run_dir / LATEST, name)
    _prune(run_dir, keep=run_dir / name)
    return run_dir / name


def _prune(run_dir: Path, keep: Path) -> None:
    old = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir() and p != keep)
    for path in old[: max(0, len(old) - KEEP)]:
        shutil.rmtree(path, ignore_errors=True)


# What a run folder holds that vlpipe wrote (checkpoint folders, their temporaries, LATEST and
# its temporaries, logs, plot, TensorBoard events, default prediction files).
RUN_FILES = (
    "config.toml",
    "vocab.txt",
    "ckpt-*",
    ".ckpt-*.tmp",
    LATEST,
    f".{LATEST}.*.tmp",
    "train_log.csv",
    ".train_log.csv.*.tmp",
    "eval_log.jsonl",
    ".eval_log.jsonl.*.tmp",
    "curves.png",
    ".curves.png.*.tmp",
    "tb",
    "predictions.json",
    "predictions.csv",
)


def clear_run(run_dir: Path) -> list[Path]:
    """Remove what an earlier run wrote in `run_dir` (nothing else: a user's own files stay).
    Returns the removed paths."""
    removed = []
    for pattern in RUN_FILES:
        for path in sorted(run_dir.glob(pattern)):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    return removed


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / LATEST
    if not pointer.exists():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    if not (path / "run.json").exists():
        raise RunError(f"{pointer} points at {path}, which is incomplete")
    return path


def load_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "run.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{ckpt / 'run.json'}: not a readable run record ({err})") from err


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights into `model`, strictly (see `vlpipe.weights.load_into`)."""
    load_into(model, read_state_dict(ckpt / "model.safetensors"), ckpt / "model.safetensors")


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "trainer.pt"
    if not path.exists():
        raise RunError(f"{ckpt}: no trainer state to resume from")
    # Our own file, but still no arbitrary code: RNG states and optimizer tensors only.
    return load_torch(path)
