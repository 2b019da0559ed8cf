"""Run-folder checkpoints, written atomically.

    RUN/ckpt-000120/model.safetensors   weights
    RUN/ckpt-000120/trainer.pt          optimizer, scheduler, step, RNG states (for --resume)
    RUN/ckpt-000120/run.json            fusion + config, task, answer vocab, cache provenance
    RUN/LATEST                          name of the newest complete checkpoint
    RUN/BEST                            name of the checkpoint with the best validation metric

A checkpoint folder is filled under a temporary name and renamed when complete; LATEST (and
BEST, when this checkpoint is the best so far) is replaced atomically after that. A crash at
any point leaves the previous checkpoint usable. Pruning keeps the newest checkpoints and the
one BEST names.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vlpipe.errors import ConfigError, VlpipeError
from vlpipe.io import atomic_folder, write_text_atomic
from vlpipe.weights import load_into, load_torch, read_state_dict

LATEST = "LATEST"
PRETRAIN_KIND = "pretrain"  # run.json's "kind" of a `vlpipe pretrain` run (fine-tuning: none)
BEST = "BEST"
KEEP = 2  # checkpoints kept besides the newest and the best


class RunError(VlpipeError, RuntimeError):
    """A run folder that cannot be loaded; names the folder."""


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    meta: dict[str, Any],
    trainer_state: dict[str, Any] | None,
    best: bool = False,
) -> Path:
    """Write ckpt-<step>, point LATEST (and BEST when `best`) at it, prune older ones."""
    run_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{step:07d}"
    with atomic_folder(run_dir / name) as tmp:
        tied = set(getattr(model, "tied_weights", ()))
        state = {
            k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if k not in tied
        }
        save_file(state, str(tmp / "model.safetensors"))
        if trainer_state is not None:
            torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "run.json").write_text(json.dumps(dict(meta, step=step), indent=1, default=str))
    write_text_atomic(run_dir / LATEST, name)
    if best:
        write_text_atomic(run_dir / BEST, name)
    _prune(run_dir, keep={run_dir / name, best_checkpoint(run_dir)})
    return run_dir / name


def _prune(run_dir: Path, keep: set[Path | None]) -> None:
    old = sorted(p for p in run_dir.glob("ckpt-*") if p.is_dir() and p not in keep)
    for path in old[: max(0, len(old) - KEEP)]:
        shutil.rmtree(path, ignore_errors=True)


def point_best(run_dir: Path, step: int) -> None:
    """BEST names ckpt-<step> (a resumed run repairs a pointer a kill left behind)."""
    name = f"ckpt-{step:07d}"
    pointer = run_dir / BEST
    if (run_dir / name / "run.json").exists() and (
        not pointer.exists() or pointer.read_text().strip() != name
    ):
        write_text_atomic(pointer, name)


# What a run folder holds that vlpipe wrote (checkpoint folders, their temporaries, LATEST and
# its temporaries, logs, plot, TensorBoard events, default prediction files).
RUN_FILES = (
    "config.toml",
    "vocab.txt",
    "ckpt-*",
    ".ckpt-*.tmp",
    LATEST,
    f".{LATEST}.*.tmp",
    BEST,
    f".{BEST}.*.tmp",
    "train_log.csv",
    ".train_log.csv.*.tmp",
    "eval_log.jsonl",
    ".eval_log.jsonl.*.tmp",
    "curves.png",
    ".curves.png.*.tmp",
    "task_curves.png",
    ".task_curves.png.*.tmp",
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
    return _pointed(Path(run_dir) / LATEST)


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The checkpoint with the best validation headline metric; None when the run has no
    BEST pointer (it never validated, or predates BEST)."""
    return _pointed(Path(run_dir) / BEST)


def _pointed(pointer: Path) -> Path | None:
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "run.json").exists():
        raise RunError(f"{pointer} points at {path}, which is incomplete")
    return path


def checkpoint_steps(run_dir: str | Path) -> list[int]:
    """The steps of the complete checkpoints in a run folder, in order."""
    steps = []
    for path in Path(run_dir).glob("ckpt-*"):
        number = path.name.removeprefix("ckpt-")
        if number.isdigit() and (path / "run.json").exists():
            steps.append(int(number))
    return sorted(steps)


def select_checkpoint(run_dir: str | Path, which: str | None = None) -> tuple[Path, str]:
    """(checkpoint folder, why it was chosen, in words) of a run folder. `which`: "best" (the
    BEST pointer), "latest" (LATEST), a step number (that ckpt folder), or None: best when the
    run has a BEST pointer, else latest. Errors name what is available."""
    run_dir = Path(run_dir)
    latest = latest_checkpoint(run_dir)
    if latest is None:
        raise RunError(f"{run_dir}: no checkpoint (no {LATEST} pointer)")
    best = best_checkpoint(run_dir)
    choice = str(which).strip().lower() if which is not None else None
    if choice is None:
        if best is not None:
            return best, f"{_best_words(best, latest)}; the default, as the run validated"
        return latest, f"latest, step {_step(latest)}; the default, as the run has no {BEST}"
    if choice == "latest":
        return latest, f"latest, step {_step(latest)}"
    if choice == "best":
        if best is None:
            raise RunError(
                f"{run_dir}: --checkpoint best: the run has no best checkpoint (it never "
                f"validated: train with --val-split or --val-annotations); {_available(run_dir)}"
            )
        return best, _best_words(best, latest)
    if not choice.isdigit():
        raise ConfigError(f"--checkpoint {which!r}: expected best, latest or a step number")
    path = run_dir / f"ckpt-{int(choice):07d}"
    if not (path / "run.json").exists():
        raise RunError(f"{run_dir}: no checkpoint of step {int(choice)}; {_available(run_dir)}")
    return path, f"step {int(choice)}, as --checkpoint asked"


def _available(run_dir: Path) -> str:
    steps = checkpoint_steps(run_dir)
    return "steps available: " + (", ".join(map(str, steps)) or "none")


def _step(path: Path) -> int:
    return int(path.name.removeprefix("ckpt-"))


def _best_words(best: Path, latest: Path) -> str:
    record = load_meta(best).get("best") or {}
    if "metric" not in record:  # a BEST written without its record: name the step only
        return f"best, step {_step(best)} of {_step(latest)}"
    return f"best {record['metric']} {record['value']:.2f} at step {_step(best)} of {_step(latest)}"


def load_meta(ckpt: Path) -> dict[str, Any]:
    try:
        return json.loads((ckpt / "run.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{ckpt / 'run.json'}: not a readable run record ({err})") from err


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """The checkpoint's weights into `model`, strictly (see `vlpipe.weights.load_into`). A
    model's `tied_weights` (second names of a shared tensor) are not stored: they are tied."""
    tied = set(getattr(model, "tied_weights", ()))
    file = ckpt / "model.safetensors"
    load_into(model, read_state_dict(file), file, ignore=tied.__contains__)


def load_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / "trainer.pt"
    if not path.exists():
        raise RunError(f"{ckpt}: no trainer state to resume from")
    # Our own file, but still no arbitrary code: RNG states and optimizer tensors only.
    return load_torch(path)
