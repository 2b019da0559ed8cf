"""The config of every stage-two job (train, evaluate, predict, score): each option's default,
help and allowed values, in one place. The command line is generated from these
(pipelines/options.py); `--config FILE` reads the same fields from TOML or YAML, and every run
folder saves its resolved config as config.toml, which `vlpipe train --config` reproduces.

Presets are partial configs shipped in vlpipe/presets (the papers' recipes, the demo's):
`vlpipe presets` lists them; a train job without `preset` takes the one named after its fusion
and task (`lxmert-vqa`), else after its fusion (`concat`), if there is one.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vlpipe.config import ConfigError, load_file, opt, section
from vlpipe.fusion.metrics import DEFAULT_REVISION, REVISIONS
from vlpipe.fusion.train_config import TrainConfig
from vlpipe.tokenizer import MAX_LENGTH

DEVICE_HELP = "auto (CUDA when present) | cpu | cuda | cuda:N"
THREADS_HELP = (
    "torch CPU threads (0: half the cores, at least 1; a busy small machine is faster so)"
)


def _tasks() -> list[str]:
    from vlpipe.fusion.tasks import TASKS

    return list(TASKS)


def _fusions() -> list[str]:
    from vlpipe.fusion.registry import FUSIONS

    return list(FUSIONS)


def _formats() -> list[str]:
    from vlpipe.data_manifests.registry import TEXT_FORMATS

    return list(TEXT_FORMATS)


@dataclass(kw_only=True)
class DataConfig:
    """Where the examples of one split come from."""

    features: list[Path] = opt(help="image feature cache(s), repeatable", factory=list)
    text_features: list[Path] = opt(help="text feature cache(s) (concat, cross)", factory=list)
    annotations: list[Path] = opt(
        help="annotation file(s), e.g. VQA questions.json then annotations.json", factory=list
    )
    annotations_format: str | None = opt(
        None, "annotation format (default: the task's official one)", choices=_formats
    )
    split: str | None = opt(None, "split name (easy-vqa: train | test)")
    limit: int | None = opt(None, "only the first N examples", minimum=1)
    skip_missing: bool = opt(
        False, "leave out examples whose features are missing (reported, with the reason)"
    )


@dataclass(kw_only=True)
class EvalConfig:
    """How predictions are scored."""

    vqa_eval: str = opt(
        DEFAULT_REVISION,
        "vqaEval.py revision: 2021 (current master) or 2016 (results published before 2021)",
        choices=REVISIONS,
    )
    gqa_choices: Path | None = opt(
        None, "GQA eval.py choices file ({split}_choices.json): validity and plausibility"
    )


@dataclass(kw_only=True)
class TrainJob:
    """`vlpipe train`: a fusion model and task head trained from cached features."""

    task: str = opt(help="the task", choices=_tasks)
    out: Path = opt(help="run folder (checkpoints, logs, curves, config.toml)")
    fusion: str = opt("concat", "the fusion model", choices=_fusions)
    preset: str | None = opt(
        None, "preset name (vlpipe presets) or file; default: the fusion's and task's"
    )
    data: DataConfig = section(DataConfig)
    val: DataConfig = section(DataConfig)
    model: dict[str, Any] = opt(
        help='fusion config fields, e.g. {"l_layers": 2}', flag="model-config", factory=dict
    )
    optim: TrainConfig = section(TrainConfig)
    eval: EvalConfig = section(EvalConfig)
    vocab: str | None = opt(None, "WordPiece vocab.txt for fusions that tokenize (lxmert, lstm)")
    max_length: int = opt(MAX_LENGTH, "text tokens incl. [CLS] / [SEP] (lxmert, lstm)", minimum=3)
    min_answer_count: int | None = opt(
        None, "answers given for fewer questions leave the vocabulary (VQA: 9)", minimum=1
    )
    answers: str | None = opt(
        None, "fix the answer vocabulary to this list, e.g. trainval_label2ans.json"
    )
    init: str | None = opt(None, "pretrained LXMERT: HF folder, Epoch20_LXRT.pth, BEST.pth")
    init_bert: str | None = opt(None, "BERT folder for LXMERT's language layers")
    answer_table: str | None = opt(None, "--init: names of its answer head rows (all_ans.json)")
    partial_init: bool = opt(False, "--init of another architecture: load what fits")
    threads: int = opt(0, THREADS_HELP, minimum=0)
    resume: bool = opt(False, "continue the run in --out exactly", save=False)
    accept_changes: bool = opt(
        False, "with --resume: continue although settings or features changed", save=False
    )
    overwrite: bool = opt(
        False, "replace an earlier run in --out (only the files vlpipe wrote)", save=False
    )
    progress: bool = opt(True, "progress bar", save=False)

    @property
    def validates(self) -> bool:
        """Validation is on when the val section names its examples."""
        return bool(self.val.annotations or self.val.split)


@dataclass(kw_only=True)
class ModelSource:
    """Which model an evaluation reads: a run folder, or an LXMERT checkpoint from elsewhere."""

    run: Path = opt(
        help="run folder of `vlpipe train`, or an LXMERT task checkpoint: airsplay/lxmert's "
        "BEST.pth / LAST.pth, a Hugging Face LxmertForQuestionAnswering folder"
    )
    task: str | None = opt(None, "LXMERT checkpoint: its task", choices=_tasks)
    answers: str | None = opt(None, "LXMERT checkpoint: its answer list (trainval_label2ans.json)")
    vocab: str | None = opt(None, "LXMERT checkpoint: BERT vocab.txt (bert-base-uncased's)")


@dataclass(kw_only=True)
class EvaluateJob:
    """`vlpipe evaluate`: the official metrics of a model on a labelled split."""

    model: ModelSource = section(ModelSource)
    data: DataConfig = section(DataConfig)
    eval: EvalConfig = section(EvalConfig)
    batch_size: int = opt(256, "examples per forward pass", minimum=1)
    device: str = opt("auto", DEVICE_HELP)
    threads: int = opt(0, THREADS_HELP, minimum=0)


@dataclass(kw_only=True)
class PredictJob:
    """`vlpipe predict`: the official submission file of a model's predictions."""

    model: ModelSource = section(ModelSource)
    data: DataConfig = section(DataConfig)
    out: Path | None = opt(None, "submission file (default: RUN/predictions.json | .csv)")
    batch_size: int = opt(256, "examples per forward pass", minimum=1)
    device: str = opt("auto", DEVICE_HELP)
    threads: int = opt(0, THREADS_HELP, minimum=0)


@dataclass(kw_only=True)
class ScoreJob:
    """`vlpipe score`: the official metrics of a predictions file, no model needed."""

    task: str = opt(help="the task", choices=_tasks)
    predictions: Path = opt(help="VQA results json, GQA predictions json, NLVR2 csv")
    data: DataConfig = section(DataConfig)
    eval: EvalConfig = section(EvalConfig)


# --------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------
def preset_names() -> dict[str, str]:
    """{name: its first comment line} of the presets shipped with vlpipe."""
    out = {}
    for item in sorted(resources.files("vlpipe").joinpath("presets").iterdir(), key=str):
        if item.name.endswith(".toml"):
            first = item.read_text(encoding="utf-8").splitlines()[0]
            out[item.name.removesuffix(".toml")] = first.lstrip("# ").strip()
    return out


def preset_layer(name: str | None, fusion: str, task: str) -> tuple[str | None, dict[str, Any]]:
    """(preset name, its layer): the named preset (a shipped name or a file), else the default
    for this fusion and task, else none."""
    shipped = preset_names()
    if name is None:
        name = next((n for n in (f"{fusion}-{task}", fusion) if n in shipped), None)
        if name is None:
            return None, {}
    if name in shipped:
        return name, load_file(_preset_path(name))
    if Path(name).is_file():
        return name, load_file(Path(name))
    raise ConfigError(f"--preset {name!r}: no such preset or file; presets: {', '.join(shipped)}")


def _preset_path(name: str) -> Path:
    with resources.as_file(resources.files("vlpipe").joinpath("presets", f"{name}.toml")) as p:
        return Path(p)


__all__ = [
    "DataConfig",
    "EvalConfig",
    "EvaluateJob",
    "ModelSource",
    "PredictJob",
    "ScoreJob",
    "TrainJob",
    "preset_layer",
    "preset_names",
]
