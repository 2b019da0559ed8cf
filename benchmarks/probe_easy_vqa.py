"""Do frozen image features encode easy-VQA's shape and colour? A probe, not a benchmark of speed.

Each easy-VQA image holds one shape of one colour; the "what shape / what colour" questions label
them. The script encodes the 4,000 train and 1,000 test images with a (random-init unless
--weights) timm model, pools the features as asked, fits a linear or one-hidden-layer probe on
the train images and prints its test accuracy for shape and for colour. A probe that cannot read
the shape from the features bounds what any fusion model trained on them can reach.

    python benchmarks/probe_easy_vqa.py --arch vit_tiny_patch16_224 --size 64 --pool cls
    python benchmarks/probe_easy_vqa.py --arch resnet18 --size 128 --layer layer2 --pool max
    python benchmarks/probe_easy_vqa.py --arch resnet18 --size 128 --layer layer2 --pool max --mlp
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import timm
import torch
from easy_vqa import (
    get_test_image_paths,
    get_test_questions,
    get_train_image_paths,
    get_train_questions,
)
from PIL import Image

from vlpipe.data_manifests.easy_vqa import SHAPES

COLORS = ("red", "green", "blue", "black", "gray", "yellow", "teal", "brown")


def image_labels(questions) -> tuple[dict[int, int], dict[int, int]]:
    """{image id: shape index} and {image id: colour index} from the questions' answers."""
    shapes, colors = sorted(SHAPES), {}
    shape = {}
    for _, answer, image in zip(*questions, strict=True):
        if answer in shapes:
            shape[image] = shapes.index(answer)
        elif answer in COLORS:
            colors[image] = COLORS.index(answer)
    return shape, colors


def load_images(paths: dict[int, str], size: int) -> tuple[list[int], torch.Tensor]:
    ids = sorted(paths)
    arrays = [
        np.asarray(Image.open(paths[i]).convert("RGB").resize((size, size), Image.BICUBIC))
        for i in ids
    ]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return ids, (pixels - 0.5) / 0.5


@torch.inference_mode()
def encode(model, pixels: torch.Tensor, args) -> torch.Tensor:
    out = []
    for batch in pixels.split(100):
        if args.layer:  # a CNN stage: B, C, h, w
            fmap = model(batch)[0]
            tokens = fmap.flatten(2).transpose(1, 2)
        else:  # a ViT: B, 1 + N, D
            feats = model.forward_features(batch)
            if args.pool == "cls":
                out.append(feats[:, 0])
                continue
            tokens = feats[:, model.num_prefix_tokens :]
        out.append(tokens.mean(1) if args.pool == "avg" else tokens.amax(1))
    return torch.cat(out)


def probe(train_x, train_y, test_x, test_y, classes: int, mlp: bool) -> float:
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    dim = train_x.shape[1]
    head = (
        torch.nn.Sequential(
            torch.nn.Linear(dim, 256), torch.nn.ReLU(), torch.nn.Linear(256, classes)
        )
        if mlp
        else torch.nn.Linear(dim, classes)
    )
    opt = torch.optim.Adam(head.parameters(), 1e-2, weight_decay=1e-4)
    for _ in range(300):  # full batch
        opt.zero_grad()
        torch.nn.functional.cross_entropy(head(train_x), train_y).backward()
        opt.step()
    with torch.no_grad():
        return (head(test_x).argmax(1) == test_y).float().mean().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--size", type=int, default=128, help="input side in pixels")
    p.add_argument("--layer", help="CNN stage to read (timm name, e.g. layer2); ViT: leave out")
    p.add_argument("--pool", default="max", choices=("cls", "avg", "max"))
    p.add_argument("--mlp", action="store_true", help="one-hidden-layer probe instead of linear")
    p.add_argument("--weights", help="local timm checkpoint (default: random init, seed 0)")
    p.add_argument("--model-kwargs", default="{}", help="JSON, e.g. '{\"patch_size\": 8}'")
    args = p.parse_args()

    kwargs = json.loads(args.model_kwargs)
    if args.layer:
        kwargs.update(features_only=True, out_indices=[_stage(args.arch, args.layer)])
    elif args.arch.startswith("vit"):
        kwargs["img_size"] = args.size
    torch.manual_seed(0)  # the same random weights as `vlpipe extract --weights random`
    model = timm.create_model(args.arch, pretrained=False, num_classes=0, **kwargs).eval()
    if args.weights:
        from vlpipe.weights import read_state_dict

        model.load_state_dict(read_state_dict(args.weights), strict=False)

    train_ids, train_px = load_images(get_train_image_paths(), args.size)
    test_ids, test_px = load_images(get_test_image_paths(), args.size)
    start = time.perf_counter()
    train_f, test_f = encode(model, train_px, args), encode(model, test_px, args)
    seconds = time.perf_counter() - start
    train_labels, test_labels = (
        image_labels(get_train_questions()),
        image_labels(get_test_questions()),
    )
    scores = {}
    for i, (name, classes) in enumerate((("shape", len(SHAPES)), ("colour", len(COLORS)))):
        tr = [k for k, image in enumerate(train_ids) if image in train_labels[i]]
        te = [k for k, image in enumerate(test_ids) if image in test_labels[i]]
        tr_y = torch.tensor([train_labels[i][train_ids[k]] for k in tr])
        te_y = torch.tensor([test_labels[i][test_ids[k]] for k in te])
        scores[name] = probe(train_f[tr], tr_y, test_f[te], te_y, classes, args.mlp)
    print(
        f"{args.arch} {args.size}px layer={args.layer or '-'} pool={args.pool} "
        f"probe={'mlp' if args.mlp else 'linear'} dim={train_f.shape[1]}: "
        f"shape {100 * scores['shape']:.1f}%  colour {100 * scores['colour']:.1f}%  "
        f"(encoding {seconds:.0f}s)"
    )


def _stage(arch: str, layer: str) -> int:
    names = [info["module"] for info in timm.create_model(arch, features_only=True).feature_info]
    if layer not in names:
        raise SystemExit(f"--layer {layer!r}: {arch} has stages {', '.join(names)}")
    return names.index(layer)


if __name__ == "__main__":
    main()
