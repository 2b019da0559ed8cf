"""Image listings: which image files a dataset has, and the cache key of each.

Every listing is `(root, split, limit) -> list[ImageRecord]`, sorted by key in natural order
(numbers as numbers: train/2 before train/10; the same files always give the same list) and cut
to the first `limit`. Listings
only look at file names and never open a file: unreadable images are the extractor's problem.

Layouts and keys:
    folder    root/**/name.ext                          key "sub/dir/name" (path without suffix)
    coco      root/train2014/COCO_train2014_{id:012}.jpg  key str(int(id)), e.g. "458752"
              root/train2017/{id:012}.jpg
    vg        root/VG_100K/{id}.jpg, root/VG_100K_2/{id}.jpg               key "{id}"
    gqa       root/images/{imageId}.jpg (or root/{imageId}.jpg)           key "{imageId}"
    nlvr2     root/{split}/[{directory}/]{split}-{set}-{pair}-img0.png    key the file stem
    easy-vqa  the installed `easy_vqa` package, split train|test          key "{split}/{id}"
    vcr       root/<movie>/<frame>.jpg (root: vcr1images/)     key "<movie>/<frame>.jpg", img_fn
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from vlpipe.errors import ConfigError, InputError

from .base import ImageRecord, apply_limit, natural_key

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# A COCO image name: COCO_train2014_000000458752 (2014/2015 file names, LXMERT's img_id) or
# 000000458752 (2017 file names); the number is the image id.
COCO_NAME = re.compile(r"(?P<prefix>COCO_[A-Za-z0-9]+_)?(?P<id>\d+)")


def coco_image_id(name: str, *, prefixed: bool = False) -> int | None:
    """The image id of a COCO name: "COCO_val2014_000000262148" -> 262148, "000000262148" ->
    262148 too unless `prefixed`; None for any other name."""
    match = COCO_NAME.fullmatch(name)
    if match is None or (prefixed and not match["prefix"]):
        return None
    return int(match["id"])


def is_image_file(path: Path) -> bool:
    """True for a name with an image extension (case-insensitive); the content is not read."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def folder(root: Path, split: str | None = None, limit: int | None = None) -> list[ImageRecord]:
    """Every image file under `root` (or `root/split`), recursively; key = path without suffix.

    Keys are relative to the listed folder and use "/" on every OS, so a cache built on one
    machine is read the same way on another.
    """
    base = _split_dir(Path(root), split, "image files")
    pairs = ((p.relative_to(base).with_suffix("").as_posix(), p) for p in _scan(base, True))
    return _records(pairs, limit)


def coco(root: Path, split: str | None = None, limit: int | None = None) -> list[ImageRecord]:
    """COCO images of one split folder (train2014, val2014, test2015, train2017, ...).

    `root` is the folder holding `split/`, or the split folder itself (also when split is None).
    Files whose stem is not a COCO name are skipped.
    """
    base = _split_dir(Path(root), split, "COCO_<split>_<id>.jpg or <id>.jpg files")
    pairs = []
    for path in _scan(base, recursive=False):
        image_id = coco_image_id(path.stem)
        if image_id is not None:
            pairs.append((str(image_id), path))
    return _records(pairs, limit)


def vg(root: Path, split: str | None = None, limit: int | None = None) -> list[ImageRecord]:
    """Visual Genome images in root/VG_100K and root/VG_100K_2 (one may be absent); split unused."""
    root = Path(root)
    parts = [root / name for name in ("VG_100K", "VG_100K_2") if (root / name).is_dir()]
    if not parts:
        _require_dir(root, "Visual Genome images")
        raise FileNotFoundError(f"{root}: expected a VG_100K/ or VG_100K_2/ folder of <id>.jpg")
    return _records(((p.stem, p) for part in parts for p in _scan(part, False)), limit)


def gqa(root: Path, split: str | None = None, limit: int | None = None) -> list[ImageRecord]:
    """GQA images in root/images/ (or in root itself); key = imageId; split unused."""
    root = _require_dir(Path(root), "GQA images/{imageId}.jpg")
    base = root / "images" if (root / "images").is_dir() else root
    return _records(((p.stem, p) for p in _scan(base, False)), limit)


def nlvr2(root: Path, split: str | None = None, limit: int | None = None) -> list[ImageRecord]:
    """NLVR2 images of one split (train spreads over 100 sub-folders); key = file stem.

    `root` is the folder holding `split/`, or the split folder itself (also when split is None).
    """
    base = _split_dir(Path(root), split, "<split>-<set>-<pair>-img0.png files")
    return _records(((p.stem, p) for p in _scan(base, True)), limit)


def vcr(root: Path, split: str | None = None, limit: int | None = None) -> list[ImageRecord]:
    """VCR's frames, root/<movie>/<frame>.jpg (root: vcr1images/, or the folder holding it);
    key = the annotations' img_fn, "<movie>/<frame>.jpg"; split unused (one image folder)."""
    root = Path(root)
    base = root / "vcr1images" if (root / "vcr1images").is_dir() else root
    _require_dir(base, "VCR's vcr1images/<movie>/<frame>.jpg")
    frames = (p for movie in sorted(base.iterdir()) if movie.is_dir() for p in _scan(movie, False))
    return _records(((p.relative_to(base).as_posix(), p) for p in frames), limit)


def easy_vqa(
    root: Path | None = None, split: str | None = "train", limit: int | None = None
) -> list[ImageRecord]:
    """easy-VQA images from the installed package; root unused; key "train/17" or "test/17".

    Train and test ids both start at 0, hence the split in the key.
    """
    import easy_vqa as package  # lazy: only this listing needs it

    getters = {"train": package.get_train_image_paths, "test": package.get_test_image_paths}
    if split not in getters:
        raise ConfigError(f"easy-vqa split must be 'train' or 'test', got {split!r}")
    paths = getters[split]()
    return _records(((f"{split}/{i}", Path(p)) for i, p in paths.items()), limit)


def _split_dir(root: Path, split: str | None, expected: str) -> Path:
    """`root/split`, or `root` when it is the split folder itself or no split is given."""
    _require_dir(root, expected)
    if split is None or (root.name == split and not (root / split).is_dir()):
        return root
    return _require_dir(root / split, f"split folder {split!r} with {expected}")


def _require_dir(path: Path, expected: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder (expected {expected})")
    return path


def _scan(base: Path, recursive: bool) -> list[Path]:
    """Image files in `base`; recursive walks follow symlinked folders, each real folder once."""
    if not recursive:
        return [p for p in base.iterdir() if p.is_file() and is_image_file(p)]
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symlink loop or a folder linked twice
            dirnames.clear()
            continue
        seen.add(real)
        found += [Path(dirpath, f) for f in filenames if is_image_file(Path(f))]
    return found


def _records(pairs: Iterable[tuple[str, Path]], limit: int | None) -> list[ImageRecord]:
    """ImageRecords in natural key order (img2 before img10: --limit N takes the first N as a
    person would count them); two files with one key is an error, not a silent pick."""
    by_key: dict[str, Path] = {}
    for key, path in pairs:
        if key in by_key:
            raise InputError(f"two images have the key {key!r}: {by_key[key]} and {path}")
        by_key[key] = path
    keys = apply_limit(sorted(by_key, key=natural_key), limit)
    return [ImageRecord(key, str(by_key[key].absolute())) for key in keys]
