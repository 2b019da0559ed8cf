"""Images decoded from their files, served where a CacheSet serves cached features: the input
of an image encoder trained end to end (`vlpipe train --finetune full`).

`ImageFiles` takes the image caches a run names as its recipe: each cache's provenance says
which dataset listing (name, split, root) it was extracted from; the listing maps each image
the cache holds to its file, which is decoded (extract/images.py, as at extraction) and brought
to the encoder's input size by the extraction transform, in the DataLoader workers. Its one
field is `pixels` (B, 3, H, W uint8). The images the caches do not hold (not extracted, or
failed at extraction) are missing, as they are from the caches themselves."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from vlpipe.errors import ConfigError
from vlpipe.extract.base import ImageTransform
from vlpipe.extract.images import BadImage, load_image
from vlpipe.fusion.data import CacheSet, DataMismatch

PIXELS = "pixels"


def listing(caches: CacheSet) -> dict[str, str]:
    """{image key: file} of the images the caches hold, from the dataset listings they were
    extracted from (a cache made with --limit holds only some of its listing's images)."""
    from vlpipe.data_manifests.registry import list_images

    files: dict[str, str] = {}
    for cache in caches.caches:
        prov = cache.provenance
        name, split, root = prov.get("dataset"), prov.get("split"), prov.get("dataset_root")
        if not name:
            raise ConfigError(f"{cache.path}: records no dataset listing to read the images from")
        try:
            records = list_images(name, root, split)
        except (OSError, ValueError) as err:
            raise ConfigError(
                f"{cache.path}: its images ({name} {split}, root {root}) cannot be listed on "
                f"this machine: {err}"
            ) from err
        held = cache.contains([r.key for r in records])
        files.update((r.key, r.path) for r, ok in zip(records, held, strict=True) if ok)
    return files


class ImageFiles:
    """The images of the caches' listings, decoded and transformed for `transform`."""

    kind = PIXELS
    modality = "image"

    def __init__(self, caches: CacheSet, transform: ImageTransform):
        self.recipe, self.transform = caches, transform
        self.files = listing(caches)
        self.fields = {PIXELS: ((3, *transform.size), "uint8")}
        self.provenance, self.facts = caches.provenance, caches.facts

    @property
    def names(self) -> str:
        return f"the images listed for {self.recipe.names}"

    def failures(self) -> dict[str, str]:
        return self.recipe.failures()

    def missing(self, keys: Sequence[str]) -> list[str]:
        """Keys the caches do not hold (not extracted, or failed at extraction), or whose
        file their listing no longer has."""
        gone = set(self.recipe.missing(keys))
        return [k for k in keys if k in gone or k not in self.files]

    def read(self, keys: Sequence[str], fields: Sequence[str]) -> dict[str, np.ndarray]:
        pixels = np.empty((len(keys), *self.fields[PIXELS][0]), np.uint8)
        for i, key in enumerate(keys):
            path = self.files[key]
            try:
                pixels[i] = self.transform(load_image(path)).numpy()
            except BadImage as err:
                raise DataMismatch(f"{path}: {err.reason} (image {key})") from None
        return {PIXELS: pixels}
