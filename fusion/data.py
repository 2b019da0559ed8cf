"""Training batches from cached features only: no image decoding, no frozen encoder in the loop.

A `TaskDataset` joins text records (questions / statements with their answers) to the feature
caches by key, checks before the first step that every key is present and that the caches hold
what the model needs, and serves whole batches (one batched HDF5 read per batch, in DataLoader
workers). Batch fields: region_feats, region_boxes, region_mask (what a model attends over:
the cache's regions, or its patches / grid cells with the CLS / pooled vector prepended as a
whole-image region, so K or K + 1 rows; boxes normalised to [0, 1], unlike the cache's pixel
image_boxes), image_cls, image_tokens (a middle-layer patch cache's CLS + patch tokens, for
the encoder tops --tune-top trains), pixels (decoded images from fusion/image_files.py's
ImageFiles, for encoders trained end to end), text_feats, text_mask, text_cls, text_ids, plus
`target`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, Sampler

from vlpipe.cache import FeatureCache
from vlpipe.data_manifests.base import TextRecord
from vlpipe.errors import VlpipeError
from vlpipe.fusion.answers import AnswerVocab, target_scores
from vlpipe.fusion.tasks import Task
from vlpipe.provenance import encoder_identity
from vlpipe.tokenizer import MAX_LENGTH

IMAGE_FIELDS = ("region_feats", "region_boxes", "region_mask", "image_cls", "image_tokens")
IMAGE_FIELDS += ("pixels",)  # decoded images (fusion/image_files.py), for --finetune full
TEXT_FIELDS = ("text_feats", "text_mask", "text_cls")


class DataMismatch(VlpipeError, ValueError):
    """The caches or annotations do not fit the model; the message names what differs."""


class CacheSet:
    """Several caches of one kind read as one (e.g. train + val, or many NLVR2 folders)."""

    def __init__(self, paths: Sequence[str | Path]):
        self.caches = [FeatureCache(p) for p in paths]
        first = self.caches[0]
        ours = encoder_identity(first.provenance)
        for other in self.caches[1:]:
            theirs = encoder_identity(other.provenance)
            if theirs != ours:
                differ = sorted(k for k in ours | theirs if ours.get(k) != theirs.get(k))
                raise DataMismatch(
                    f"{other.path} and {first.path} hold features of different encoders "
                    f"(they differ in {', '.join(differ)}): one model cannot read both"
                )
            common = other.schema.facts.keys() & first.schema.facts.keys()
            facts_differ = any(other.schema.facts[k] != first.schema.facts[k] for k in common)
            if other.kind != first.kind or other.fields != first.fields or facts_differ:
                raise DataMismatch(
                    f"{other.path} ({other.kind}, {other.fields}, {other.schema.facts}) does "
                    f"not match {first.path} ({first.kind}, {first.fields}, {first.schema.facts})"
                )
        _check_disjoint(self.caches)
        self.kind, self.fields, self.provenance = first.kind, first.fields, first.provenance
        self.modality = "text" if first.kind == "tokens" else "image"
        self.facts = first.schema.facts

    @property
    def names(self) -> str:
        return ", ".join(str(c.path) for c in self.caches)

    def failures(self) -> dict[str, str]:
        """{key: reason} of the items that failed at extraction, over all caches."""
        return {key: reason for c in self.caches for key, _path, reason in c.failures}

    def missing(self, keys: Sequence[str]) -> list[str]:
        found = np.zeros(len(keys), dtype=bool)
        for cache in self.caches:
            found |= cache.contains(keys)
        return [k for k, ok in zip(keys, found, strict=True) if not ok]

    def read(self, keys: Sequence[str], fields: Sequence[str]) -> dict[str, np.ndarray]:
        which = np.full(len(keys), -1)
        for i, cache in enumerate(self.caches):
            todo = np.nonzero(which < 0)[0]
            which[todo[cache.contains([keys[j] for j in todo])]] = i
        out: dict[str, np.ndarray] = {}
        for i in np.unique(which):
            sel = np.nonzero(which == i)[0]
            part = self.caches[int(i)].read([keys[j] for j in sel], fields)
            for name, value in part.items():
                if name not in out:
                    out[name] = np.empty((len(keys), *value.shape[1:]), value.dtype)
                out[name][sel] = value
        return out


def _check_disjoint(caches: list[FeatureCache]) -> None:
    """A key in two caches of one set would be read from whichever comes first: refuse."""
    if len(caches) < 2:
        return
    keys = np.concatenate([np.asarray(c.keys(), dtype=object) for c in caches])
    unique, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        twice = unique[counts > 1][:5].tolist()
        names = ", ".join(str(c.path) for c in caches)
        raise DataMismatch(f"keys {twice} are in more than one of {names}")


def grid_boxes(grid: tuple[int, int], with_cls: bool) -> np.ndarray:
    """Normalised xyxy boxes of a ViT patch / CNN grid cell layout, row-major; the CLS token,
    when prepended, covers the whole image."""
    gh, gw = grid
    ys, xs = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    boxes = np.stack([xs / gw, ys / gh, (xs + 1) / gw, (ys + 1) / gh], -1).reshape(-1, 4)
    if with_cls:
        boxes = np.concatenate([[[0.0, 0.0, 1.0, 1.0]], boxes])
    return boxes.astype(np.float32)


def visual_fields(
    raw: dict[str, np.ndarray], kind: str, grid: tuple[int, int] | None, needs: Sequence[str]
) -> dict[str, np.ndarray]:
    """Cache arrays -> model inputs: float32 features, boxes normalised to [0, 1], masks; patch
    and grid caches get the CLS / pooled vector as a first "whole image" region."""
    out = {}
    if kind == "pixels":
        return {"pixels": raw["pixels"]}
    if kind == "regions":
        hw = raw["image_hw"].astype(np.float32)
        scale = np.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], -1)[:, None, :]
        out["region_feats"] = raw["image_feats"].astype(np.float32)
        out["region_boxes"] = np.clip(raw["image_boxes"] / scale, 0.0, 1.0).astype(np.float32)
        out["region_mask"] = raw["image_mask"].astype(bool)
        mask = out["region_mask"][..., None]
        out["image_cls"] = (out["region_feats"] * mask).sum(1) / np.maximum(mask.sum(1), 1)
    else:
        cls = raw["image_cls"].astype(np.float32)
        out["image_cls"] = cls
        if "image_feats" in raw:
            feats = np.concatenate([cls[:, None], raw["image_feats"].astype(np.float32)], 1)
            out["region_feats"] = feats
            out["image_tokens"] = feats  # a middle-layer cache's token stream, CLS first
            out["region_boxes"] = np.broadcast_to(grid_boxes(grid, True), (*feats.shape[:2], 4))
            out["region_mask"] = np.ones(feats.shape[:2], dtype=bool)
    return {k: v for k, v in out.items() if k in needs}


def image_source_fields(kind: str, fields: dict) -> set[str]:
    """Which model inputs an image cache of this kind and fields can provide."""
    if kind == "pixels":
        return {"pixels"}
    if kind == "regions":
        return set(IMAGE_FIELDS) - {"image_tokens", "pixels"}
    return set(IMAGE_FIELDS) - {"pixels"} if "image_feats" in fields else {"image_cls"}


class TaskDataset(Dataset):
    """Batches for one task. `__getitem__` takes a list of record indices (use `loader()`)."""

    def __init__(
        self,
        task: Task,
        records: Sequence[TextRecord],
        images: CacheSet,
        texts: CacheSet | None,
        vocab: AnswerVocab,
        needs: Sequence[str],
        tokenizer=None,
        max_length: int = MAX_LENGTH,
        skip_missing: bool = False,
    ):
        self.task, self.records, self.images, self.texts = task, list(records), images, texts
        self.vocab, self.needs = vocab, tuple(needs)
        self.grid = grid_of(images)
        self.skipped: dict[str, str] = self._drop_missing() if skip_missing else {}
        self.text_ids = self._tokenize(tokenizer, max_length) if "text_ids" in needs else None
        self.check()

    def _drop_missing(self) -> dict[str, str]:
        """Drop the records whose features are not in the caches; {record key: why}."""
        image_keys = list(dict.fromkeys(k for r in self.records for k in r.image_keys))
        why = {k: "image not in the caches" for k in self.images.missing(image_keys)}
        failed = self.images.failures()
        why.update({k: f"image failed at extraction: {failed[k]}" for k in why if k in failed})
        if self.texts is not None and set(self.needs) & {*TEXT_FIELDS, "text_ids"}:
            texts_missing = set(self.texts.missing([k for r in self.records for k in r.text_keys]))
        else:
            texts_missing = set()
        skipped = {}
        for rec in self.records:
            lost = [why[k] for k in rec.image_keys if k in why]
            if texts_missing.intersection(rec.text_keys):
                lost.append("text not in the caches")
            if lost:
                skipped[rec.key] = "; ".join(lost)
        self.records = [r for r in self.records if r.key not in skipped]
        return skipped

    def _tokenize(self, tokenizer, max_length: int) -> dict[str, np.ndarray] | None:
        if tokenizer is None:
            return None  # taken from the text cache
        enc = tokenizer(
            [text for r in self.records for text in (r.choices or (r.text,))],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        shape = (len(self.records), self.task.choices) if self.task.choices else (-1,)
        return {
            "text_ids": enc["input_ids"].astype(np.int64).reshape(*shape, max_length),
            "text_mask": enc["attention_mask"].astype(bool).reshape(*shape, max_length),
        }

    def check(self) -> None:
        """Fail before the first step when the caches or annotations do not fit the model."""
        if not self.records:
            raise DataMismatch("no annotation records to train or evaluate on")
        self._check_fields()
        self._check_keys(self.images, [k for r in self.records for k in r.image_keys], "image")
        if self.texts is not None and set(self.needs) & {*TEXT_FIELDS, "text_ids"}:
            self._check_keys(self.texts, [k for r in self.records for k in r.text_keys], "text")
        n_choices = {len(r.choices) for r in self.records}
        if n_choices != {self.task.choices}:
            raise DataMismatch(
                f"task {self.task.name} expects {self.task.choices or 'no'} candidate texts per "
                f"example, the annotations have {sorted(n_choices)}"
            )
        n_images = {len(r.image_keys) for r in self.records}
        if n_images != {self.task.images_per_example}:
            raise DataMismatch(
                f"task {self.task.name} expects {self.task.images_per_example} "
                f"image(s) per example, the annotations have {sorted(n_images)}"
            )

    def _check_fields(self) -> None:
        have = image_source_fields(self.images.kind, self.images.fields)
        if self.texts is not None:
            have |= {f for f in (*TEXT_FIELDS, "text_ids") if f in self.texts.fields}
            have.add("text_mask")
        if self.text_ids is not None:
            have |= {"text_ids", "text_mask"}
        lacking = [f for f in self.needs if f not in have]
        if lacking:
            texts = f"{self.texts.names} {sorted(self.texts.fields)}" if self.texts else "none"
            tokenizer = "" if self.text_ids is not None else ", no tokenizer"
            raise DataMismatch(
                f"the model needs {lacking}, which the inputs do not provide: image cache "
                f"{self.images.names} is a {self.images.kind!r} cache with fields "
                f"{sorted(self.images.fields)}; text cache: {texts}{tokenizer}"
            )

    def _check_keys(self, caches: CacheSet, keys: list[str], what: str) -> None:
        missing = caches.missing(list(dict.fromkeys(keys)))
        if missing:
            raise DataMismatch(
                f"{len(missing)} {what} keys of the annotations are not in "
                f"{caches.names}, e.g. {missing[:5]} (--skip-missing trains on the others; "
                "validation reads the training caches unless --val-features / "
                "--val-text-features name its own)"
            )

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        recs = [self.records[i] for i in indices]
        batch = self._image_batch(recs)
        batch.update(self._text_batch(recs, indices))
        batch["target"] = torch.from_numpy(self.task.targets(recs, self.vocab))
        return batch

    def _image_batch(self, recs: list[TextRecord]) -> dict[str, torch.Tensor]:
        wanted = [f for f in self.needs if f in IMAGE_FIELDS]
        if not wanted:
            return {}
        keys = [k for r in recs for k in r.image_keys]
        raw = self.images.read(keys, self._raw_image_fields(wanted))
        vis = visual_fields(raw, self.images.kind, self.grid, wanted)
        # NLVR2 (two images per example) keeps an image axis: B, 2, ...; the others B, ...
        shape = (
            (len(recs), self.task.images_per_example)
            if self.task.images_per_example > 1
            else (len(recs),)
        )
        return {
            k: torch.from_numpy(np.ascontiguousarray(v)).reshape(*shape, *v.shape[1:])
            for k, v in vis.items()
        }

    def _raw_image_fields(self, wanted: list[str]) -> list[str]:
        """Only the cache fields these model inputs are made from (a CLS-only model must not
        pay for reading patch tokens)."""
        if self.images.kind == "pixels":
            return ["pixels"]
        if self.images.kind == "regions":
            raw = {"image_feats", "image_hw", "image_boxes", "image_mask"}
            if wanted == ["image_cls"]:
                raw = {"image_feats", "image_mask"}
        else:
            raw = {"image_cls"} | ({"image_feats"} if set(wanted) - {"image_cls"} else set())
        return [f for f in self.images.fields if f in raw]

    def _text_batch(
        self, recs: list[TextRecord], indices: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        out = {}
        if self.text_ids is not None:
            for name, value in self.text_ids.items():
                out[name] = torch.from_numpy(value[list(indices)])
        wanted = [f for f in self.needs if f in (*TEXT_FIELDS, "text_ids") and f not in out]
        if wanted and self.texts is not None:
            raw = self.texts.read([k for r in recs for k in r.text_keys], wanted)
            shape = (len(recs), self.task.choices) if self.task.choices else (len(recs),)
            out.update(
                {k: torch.from_numpy(v).reshape(*shape, *v.shape[1:]) for k, v in raw.items()}
            )
        for name in ("text_feats", "text_cls"):
            if name in out:
                out[name] = out[name].float()
        if "text_mask" in out:
            out["text_mask"] = out["text_mask"].bool()
        return out

    def loader(
        self,
        batch_size: int,
        sampler: Sampler | Sequence[int] | None = None,
        num_workers: int = 0,
        drop_last: bool = False,
        seed: int = 0,
    ) -> DataLoader:
        """Whole batches in `sampler` order (all records in order when None; an empty sampler
        gives no batches). The loader has its own seeded generator: creating it never draws
        from the global torch RNG, which dropout uses, so a resumed run keeps its RNG stream."""
        sampler = range(len(self)) if sampler is None else sampler
        return batch_loader(self, batch_size, sampler, num_workers, drop_last, seed)


def batch_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: Sampler | Sequence[int],
    num_workers: int = 0,
    drop_last: bool = False,
    seed: int = 0,
) -> DataLoader:
    """A DataLoader of whole batches of a dataset whose `__getitem__` takes a list of indices
    (one batched cache read per batch), in `sampler` order, with its own seeded generator."""
    return DataLoader(
        dataset,
        sampler=BatchSampler(sampler, batch_size, drop_last),
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(seed),
    )


def grid_of(images: CacheSet) -> tuple[int, int] | None:
    """The patch / cell grid the cache declares (caches before schema v3: their provenance)."""
    grid = images.facts.get("grid") or images.provenance.get("preprocessing", {}).get("grid")
    return tuple(grid) if grid else None


def build_vocab(task: Task, records: Sequence[TextRecord], min_count: int) -> AnswerVocab:
    """Answer vocabulary from training (+ validation) records, the LXMERT / BUTD way."""
    if task.fixed_answers is not None:
        return AnswerVocab(list(task.fixed_answers))
    answers = [task.vocab_answer(r) for r in records if r.labelled]
    if not answers:
        raise DataMismatch("no training example has an answer: train on a labelled split")
    vocab = AnswerVocab.build((a for a in answers if a), min_count)
    if not len(vocab):
        raise DataMismatch(
            f"no answer is given for at least {min_count} of the {len(answers)} training "
            "questions: lower --min-answer-count"
        )
    return vocab


__all__ = [
    "CacheSet",
    "DataMismatch",
    "TaskDataset",
    "build_vocab",
    "grid_boxes",
    "target_scores",
    "visual_fields",
]
