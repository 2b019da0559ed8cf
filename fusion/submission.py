"""Prediction files in the formats the official evaluators and servers read, and back.

- VQA v2 (EvalAI / vqaEval.py loadRes): JSON list [{"question_id": int, "answer": str}].
- GQA (official eval.py): JSON list [{"questionId": str, "prediction": str}].
- NLVR2 (lil-lab/nlvr nlvr2/eval/metrics.py): CSV without header, one "identifier,True" or
  "identifier,False" line per example.
- VCR (the leaderboard; rowanz/r2c models/eval_for_leaderboard.py): CSV with a header, one row
  per item: annot_id, answer_0..3 (Q->A probabilities), then rationale_conditioned_on_a{j}_{i}
  for j, i in 0..3 (QA->R probabilities given answer j). A labelled split has the rationale
  record of its right answer only: the other groups' cells are empty.

Writers replace the target atomically (temporary file in the same folder, then os.replace), so
an interrupted run never leaves a truncated submission behind. Readers return
{id: prediction} with string ids, the form the metrics in `metrics.py` take.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping

from vlpipe.data_manifests.base import load_json
from vlpipe.errors import InputError
from vlpipe.io import write_text_atomic

from .metrics import parse_nlvr2_label

PathLike = str | os.PathLike


def _read_json_list(path: PathLike, keys: tuple[str, str]) -> list[dict]:
    """The entries of a JSON list of {id, answer} objects; the answer must be a string."""
    items = load_json(path)
    if not isinstance(items, list):
        raise InputError(f"{path}: expected a JSON list of {{{keys[0]!r}, {keys[1]!r}}} objects")
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not all(k in item for k in keys):
            raise InputError(f"{path}: entry {i} lacks {keys[0]!r} or {keys[1]!r}: {item!r}")
        if not isinstance(item[keys[1]], str):
            raise InputError(f"{path}: entry {i}: {keys[1]!r} should be a string: {item!r}")
        if isinstance(item[keys[0]], bool) or not isinstance(item[keys[0]], (int, str)):
            raise InputError(f"{path}: entry {i}: {keys[0]!r} should be an id: {item!r}")
    return items


def _to_unique_dict(pairs: list[tuple[str, object]], path: PathLike) -> dict:
    # The official loaders silently keep the last duplicate; a duplicate is a bug upstream.
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise InputError(f"{path}: duplicate prediction for id {key}")
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------
# VQA v2
# --------------------------------------------------------------------------------------------
def write_vqa_submission(path: PathLike, preds: Mapping[str, str]) -> None:
    """Write [{"question_id": int, "answer": str}] in the order of `preds`."""
    items = [{"question_id": int(qid), "answer": str(ans)} for qid, ans in preds.items()]
    write_text_atomic(path, json.dumps(items))


def read_vqa_submission(path: PathLike) -> dict[str, str]:
    """{question_id as str: answer} from a VQA results file."""
    items = _read_json_list(path, ("question_id", "answer"))
    return _to_unique_dict([(str(it["question_id"]), it["answer"]) for it in items], path)


# --------------------------------------------------------------------------------------------
# GQA
# --------------------------------------------------------------------------------------------
def write_gqa_submission(path: PathLike, preds: Mapping[str, str]) -> None:
    """Write [{"questionId": str, "prediction": str}] in the order of `preds`."""
    items = [{"questionId": str(qid), "prediction": str(ans)} for qid, ans in preds.items()]
    write_text_atomic(path, json.dumps(items))


def read_gqa_submission(path: PathLike) -> dict[str, str]:
    """{questionId: prediction} from a GQA predictions file."""
    items = _read_json_list(path, ("questionId", "prediction"))
    return _to_unique_dict([(str(it["questionId"]), it["prediction"]) for it in items], path)


# --------------------------------------------------------------------------------------------
# NLVR2
# --------------------------------------------------------------------------------------------
def write_nlvr2_predictions(path: PathLike, preds: Mapping[str, bool | str]) -> None:
    """Write "identifier,True|False" lines, no header (the official script splits on ",")."""
    lines = []
    for identifier, pred in preds.items():
        if "," in identifier:
            raise InputError(f"NLVR2 identifier {identifier!r} contains a comma")
        lines.append(f"{identifier},{parse_nlvr2_label(pred)}\n")
    write_text_atomic(path, "".join(lines))


def read_nlvr2_predictions(path: PathLike) -> dict[str, bool]:
    """{identifier: bool} from an NLVR2 predictions CSV; blank lines are skipped."""
    pairs = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start})") from None
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.strip().split(",")
        if len(fields) != 2:
            raise InputError(f"{path}:{lineno}: expected 'identifier,True|False': {line!r}")
        pairs.append((fields[0], parse_nlvr2_label(fields[1])))
    return _to_unique_dict(pairs, path)


VCR_GROUPS = ("answer", *(f"rationale_a{j}" for j in range(4)))  # the records of an item
VCR_COLUMNS = ["annot_id", *(f"answer_{i}" for i in range(4))] + [
    f"rationale_conditioned_on_a{j}_{i}" for j in range(4) for i in range(4)
]


def _vcr_prefix(group: str) -> str:
    """The CSV column prefix of a record group: answer, rationale_conditioned_on_a<j>."""
    return "answer" if group == "answer" else f"rationale_conditioned_on_a{group[-1]}"


def write_vcr_submission(path: PathLike, probs: Mapping[str, list[float]]) -> None:
    """probs: {"<annot_id>/answer" | "<annot_id>/rationale_a<j>": 4 probabilities}."""
    rows: dict[str, dict[str, str]] = {}
    for key, values in probs.items():
        annot_id, _, group = key.rpartition("/")
        if group not in VCR_GROUPS or len(values) != 4:
            raise InputError(f"VCR prediction {key!r}: not <annot_id>/answer | rationale_a<j>")
        prefix = _vcr_prefix(group)
        row = rows.setdefault(annot_id, {"annot_id": annot_id})
        row.update({f"{prefix}_{i}": repr(float(v)) for i, v in enumerate(values)})
    out = io.StringIO()
    writer = csv.DictWriter(out, VCR_COLUMNS, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows.values())
    write_text_atomic(path, out.getvalue())


def read_vcr_submission(path: PathLike) -> dict[str, str]:
    """{record key: the arg-max choice "0".."3"} of the groups a leaderboard CSV fills."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return _vcr_rows(csv.DictReader(f), path)
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _vcr_rows(reader: csv.DictReader, path: PathLike) -> dict[str, str]:
    """{record key: arg-max choice} of the rows; a short row or a cell that is not a number
    is an error naming the line."""
    if reader.fieldnames != VCR_COLUMNS:
        raise InputError(f"{path}: not a VCR leaderboard CSV (header {reader.fieldnames})")
    pairs = []
    for lineno, row in enumerate(reader, start=2):
        if None in row or None in row.values():  # too many cells, or too few
            raise InputError(f"{path}:{lineno}: expected {len(VCR_COLUMNS)} cells")
        for group in VCR_GROUPS:
            prefix = _vcr_prefix(group)
            cells = [row[f"{prefix}_{i}"] for i in range(4)]
            if not any(cells):
                continue  # a group a labelled split does not fill
            try:
                values = [float(c) for c in cells]
            except ValueError:
                raise InputError(f"{path}:{lineno}: {prefix}_*: {cells} are not numbers") from None
            pairs.append((f"{row['annot_id']}/{group}", str(values.index(max(values)))))
    return _to_unique_dict(pairs, path)
