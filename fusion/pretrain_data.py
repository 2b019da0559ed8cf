"""Pre-training batches from cached features: LXMERT's masking, negative sampling and answer
sampling (airsplay/lxmert src/pretrain/lxmert_pretrain.py `random_word`, `random_feat`,
`convert_example_to_features`; lxmert_data.py `__getitem__`).

Per example, in this order:
- matched: with probability 0.5 the sentence is replaced by the sentence of a uniformly drawn
  other example, redrawn until its image differs; such a pair is matched = 0.
- mlm: every WordPiece token ([CLS], [SEP] and padding never) is picked with probability
  word_mask_rate; a picked token becomes [MASK] 80% of the time, a uniformly random vocabulary
  entry 10%, and stays 10%; its label is the original id (-1 elsewhere). Mismatched pairs are
  masked too, as in the original.
- qa: the answer id, sampled in proportion to the label's soft scores among the answers in
  the table; -1 for captions, answers not in the table, and mismatched pairs.
- feat: every real region is picked with probability obj_mask_rate; a picked region's feature
  becomes zeros 80% of the time, the feature of a random region of a random image of the
  data 10%, and stays 10%; feat_mask = 1 for all picked regions. Boxes are never masked.
- obj / attr: the detector's labels and confidences of every region (padding: -1, 0).

The random draws of example i in epoch e come from a generator seeded by (seed, stream, e, i):
a batch is the same whichever worker builds it and whether the run was resumed, so resume is
exact without saving any sampler state; validation uses its own stream and epoch 0, so every
validation masks alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from vlpipe.errors import ConfigError
from vlpipe.fusion.data import CacheSet, DataMismatch, batch_loader, grid_of, visual_fields
from vlpipe.fusion.pretrain_losses import IGNORE
from vlpipe.fusion.pretrain_model import TASKS, VISUAL_TASKS

REGION_INPUTS = ("region_feats", "region_boxes", "region_mask")
LABEL_FIELDS = ("obj_ids", "obj_conf", "attr_ids", "attr_conf")


@dataclass(frozen=True)
class Masking:
    """LXMERT's rates (--wordMaskRate, --objMaskRate) and its 80 / 10 / 10 split."""

    word_rate: float = 0.15
    obj_rate: float = 0.15
    mismatch_rate: float = 0.5


def available_tasks(
    images: CacheSet, wanted: Sequence[str], has_answers: bool
) -> tuple[tuple[str, ...], dict[str, str]]:
    """(the tasks of `wanted` the inputs allow, in TASKS order; {task: why it is off})."""
    unknown = [t for t in wanted if t not in TASKS]
    if unknown or not wanted:
        raise ConfigError(
            f"--tasks {', '.join(map(repr, unknown)) or '(none)'}: pre-training tasks are "
            f"{', '.join(TASKS)} (repeat --tasks for several)"
        )
    off: dict[str, str] = {}
    if "image_feats" not in images.fields:
        raise DataMismatch(
            f"{images.names}: holds no per-region / per-patch features (image_feats; a "
            "--cls-only cache?): LXMERT attends over regions"
        )
    if images.kind != "regions":
        for task in ("obj", "attr"):
            off[task] = f"a {images.kind} cache has no detector labels (obj_ids / attr_ids)"
    if not has_answers:
        off["qa"] = "no sentence has an answer in the answer table"
    on = tuple(t for t in TASKS if t in wanted and t not in off)
    return on, {t: why for t, why in off.items() if t in wanted}


class PretrainDataset(torch.utils.data.Dataset):
    """Sentences joined to an image cache by key; `__getitem__` takes a list of indices and
    returns a whole batch (see pretrain_losses.py for the label fields)."""

    def __init__(
        self,
        sentences: Sequence,
        images: CacheSet,
        tokenizer,
        qa_labels: Sequence[tuple[list[int], list[float]]],
        tasks: Sequence[str],
        *,
        max_length: int = 20,
        masking: Masking = Masking(),
        seed: int = 0,
        stream: int = 0,
        num_labels: tuple[int, int] = (1600, 400),
    ):
        self.sentences, self.images, self.tasks = list(sentences), images, tuple(tasks)
        self.masking, self.seed, self.stream, self.epoch = masking, seed, stream, 0
        self.num_labels = num_labels
        self.records = self.sentences  # what the trainer counts and orders
        self._check_images()
        self._tokenize(tokenizer, max_length)
        self.qa = [(np.asarray(i, np.int64), np.asarray(s, np.float64)) for i, s in qa_labels]
        image_keys = list(dict.fromkeys(s.image_key for s in self.sentences))
        self.image_keys = image_keys
        index = {k: i for i, k in enumerate(image_keys)}
        self.image_of = np.array([index[s.image_key] for s in self.sentences], dtype=np.int64)
        if "matched" in self.tasks and len(image_keys) < 2:
            raise DataMismatch("the matched task needs sentences of at least two images")

    def _check_images(self) -> None:
        if not self.sentences:
            raise DataMismatch("no sentences to pre-train on")
        keys = list(dict.fromkeys(s.image_key for s in self.sentences))
        missing = self.images.missing(keys)
        if missing:
            raise DataMismatch(
                f"{len(missing)} images of the sentences are not in {self.images.names}, e.g. "
                f"{missing[:5]}"
            )

    def _tokenize(self, tokenizer, max_length: int) -> None:
        enc = tokenizer(
            [s.text.strip() for s in self.sentences],
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="np",
        )
        self.ids = enc["input_ids"].astype(np.int64)
        self.mask = enc["attention_mask"].astype(bool)
        special = [tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id]
        self.special = np.isin(self.ids, special) | ~self.mask
        self.mask_id, self.vocab_size = tokenizer.mask_token_id, len(tokenizer)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sentences)

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.stream, self.epoch, index])

    def __getitem__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        indices = list(indices)
        rngs = [self._rng(i) for i in indices]
        batch = self._text_part(indices, rngs)
        batch.update(self._image_part(indices, rngs))
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}

    # --- text side ---------------------------------------------------------------------

    def _text_part(self, indices: list[int], rngs: list) -> dict[str, np.ndarray]:
        sent = np.array([self._partner(i, rng) for i, rng in zip(indices, rngs, strict=True)])
        matched = (sent == np.array(indices)).astype(np.int64)
        masked = [self._mask_words(s, rng) for s, rng in zip(sent, rngs, strict=True)]
        ids, labels = np.stack([m[0] for m in masked]), np.stack([m[1] for m in masked])
        out = {"text_ids": ids, "text_mask": self.mask[sent], "mlm_labels": labels}
        if "matched" in self.tasks:
            out["matched"] = matched
        if "qa" in self.tasks:
            out["qa_target"] = np.array(
                [self._answer(s, m, rng) for s, m, rng in zip(sent, matched, rngs, strict=True)]
            )
        if "mlm" not in self.tasks:
            out["text_ids"], out["mlm_labels"] = self.ids[sent], np.full_like(labels, IGNORE)
        return out

    def _partner(self, index: int, rng: np.random.Generator) -> int:
        """The sentence shown with example `index`'s image: its own, or (matched task, half
        the time) a uniformly drawn one of another image."""
        if "matched" not in self.tasks or rng.random() >= self.masking.mismatch_rate:
            return index
        while True:
            other = int(rng.integers(len(self.sentences)))
            if self.image_of[other] != self.image_of[index]:
                return other

    def _mask_words(self, s: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids[s].copy()
        labels = np.full_like(ids, IGNORE)
        draw = rng.random(len(ids))  # one uniform per position, as random_word does
        rate = self.masking.word_rate
        picked = (draw < rate) & ~self.special[s]
        labels[picked] = ids[picked]
        scaled = draw / rate
        ids[picked & (scaled < 0.8)] = self.mask_id
        randomised = picked & (scaled >= 0.8) & (scaled < 0.9)
        ids[randomised] = rng.integers(self.vocab_size, size=int(randomised.sum()))
        return ids, labels

    def _answer(self, s: int, matched: int, rng: np.random.Generator) -> int:
        answers, scores = self.qa[s]
        if not matched or not len(answers) or scores.sum() <= 0:
            return IGNORE
        if len(answers) == 1:
            return int(answers[0])
        return int(answers[rng.choice(len(answers), p=scores / scores.sum())])

    # --- image side --------------------------------------------------------------------

    def _image_part(self, indices: list[int], rngs: list) -> dict[str, np.ndarray]:
        keys = [self.image_keys[self.image_of[i]] for i in indices]
        raw = self.images.read(keys, self._raw_fields())
        vis = visual_fields(raw, self.images.kind, grid_of(self.images), REGION_INPUTS)
        out = dict(vis)
        if set(VISUAL_TASKS) & set(self.tasks):
            feats, feat_mask = self._mask_regions(vis["region_feats"], vis["region_mask"], rngs)
            out["region_feats"] = feats
            if "feat" in self.tasks:
                out["feat_target"], out["feat_mask"] = vis["region_feats"], feat_mask
        if {"obj", "attr"} & set(self.tasks):
            out.update(self._detector_labels(raw, vis["region_mask"], keys))
        return out

    def _raw_fields(self) -> list[str]:
        wanted = {"image_feats", "image_boxes", "image_hw", "image_mask", "image_cls"}
        if {"obj", "attr"} & set(self.tasks):
            wanted |= set(LABEL_FIELDS)
        return [f for f in self.images.fields if f in wanted]

    def _mask_regions(
        self, feats: np.ndarray, real: np.ndarray, rngs: list
    ) -> tuple[np.ndarray, np.ndarray]:
        masked, feat_mask = feats.copy(), np.zeros(real.shape, np.float32)
        rate, swaps = self.masking.obj_rate, []
        for row, rng in enumerate(rngs):
            draw = rng.random(real.shape[1])
            picked = (draw < rate) & real[row]
            feat_mask[row] = picked
            scaled = draw / rate
            masked[row, picked & (scaled < 0.8)] = 0.0
            for region in np.nonzero(picked & (scaled >= 0.8) & (scaled < 0.9))[0]:
                swaps.append((row, region, int(rng.integers(len(self.image_keys))), rng.random()))
        if swaps:
            self._random_features(masked, swaps)
        return masked, feat_mask

    def _random_features(self, masked: np.ndarray, swaps: list) -> None:
        """Put a random region of a random image of the data at each swapped place (one
        batched read of those images)."""
        images = sorted({image for _, _, image, _ in swaps})
        raw = self.images.read([self.image_keys[i] for i in images], self._raw_fields())
        vis = visual_fields(raw, self.images.kind, grid_of(self.images), REGION_INPUTS)
        where = {image: i for i, image in enumerate(images)}
        for row, region, image, u in swaps:
            real = np.nonzero(vis["region_mask"][where[image]])[0]
            masked[row, region] = vis["region_feats"][where[image], real[int(u * len(real))]]

    def _detector_labels(
        self, raw: dict[str, np.ndarray], real: np.ndarray, keys: list[str]
    ) -> dict[str, np.ndarray]:
        out = {}
        for task, (ids, conf), n in zip(
            ("obj", "attr"), (LABEL_FIELDS[:2], LABEL_FIELDS[2:]), self.num_labels, strict=True
        ):
            labels = np.where(real, raw[ids], IGNORE).astype(np.int64)
            bad = (labels >= n) | (labels < IGNORE)
            if bad.any():
                row = int(np.nonzero(bad.any(1))[0][0])
                raise DataMismatch(
                    f"{self.images.names}: image {keys[row]} has {ids} "
                    f"{int(raw[ids][row][bad[row]][0])}, outside the {n} classes of the "
                    f"{task} head (--model-config num_{'objects' if task == 'obj' else 'attrs'})"
                )
            out[f"{task}_labels"] = labels
            out[f"{task}_conf"] = np.where(real, raw[conf], 0.0).astype(np.float32)
        return out

    def loader(self, batch_size: int, sampler, num_workers: int = 0, seed: int = 0):
        return batch_loader(self, batch_size, sampler, num_workers, seed=seed)
