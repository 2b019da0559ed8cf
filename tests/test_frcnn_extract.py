"""`vlpipe extract --backbone frcnn` end to end with a tiny random detector, weights safety and
the detectron2 backend's absence, and feature-file import / export round trips (LXMERT TSV,
MILVLG npz) on small files written in the real formats."""

from __future__ import annotations

import base64
import builtins
import csv
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.conftest import vlpipe, write_image
from vlpipe.cache import FeatureCache

TINY_FRCNN = '{"tiny": true}'
SIZES = [(96, 64), (64, 80), (72, 72)]  # (width, height) of the three images


@pytest.fixture
def frcnn_images(tmp_path):
    root = tmp_path / "images"
    for i, size in enumerate(SIZES):
        write_image(root / f"img{i}.png", size=size, seed=i)
    return root


def frcnn_args(root, out, *extra):
    return (
        "extract",
        "--backbone",
        "frcnn",
        "--dataset",
        "folder",
        "--root",
        root,
        "--out",
        out,
        "--weights",
        "random",
        "--model-kwargs",
        TINY_FRCNN,
        "--image-size",
        64,
        "--max-size",
        128,
        "--num-workers",
        0,
        "--dtype",
        "float32",
        "--no-progress",
        *extra,
    )


# ---- extraction --------------------------------------------------------------------------------


def test_frcnn_extraction_writes_regions_in_original_pixels(frcnn_images, tmp_path):
    out = tmp_path / "r.h5"
    vlpipe(*frcnn_args(frcnn_images, out, "--min-boxes", 12, "--max-boxes", 12))
    cache = FeatureCache(out)
    assert cache.kind == "regions" and len(cache) == 3
    assert cache.fields["image_feats"][0] == (12, 128)  # tiny model: res2 16 -> 128-d
    for i, (width, height) in enumerate(SIZES):
        item = cache[f"img{i}"]
        assert item["image_hw"].tolist() == [height, width]
        assert item["image_mask"].all()  # 12 <= the tiny RPN's proposals
        boxes = item["image_boxes"]
        assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= width).all()
        assert (boxes[:, [1, 3]] <= height).all() and (boxes[:, 2:] >= boxes[:, :2]).all()
        assert (item["obj_ids"] >= 0).all() and (item["obj_ids"] < 7).all()
    prov = cache.provenance
    assert prov["box_policy"] == {
        "name": "caffe",
        "min_boxes": 12,
        "max_boxes": 12,
        "conf_threshold": 0.2,
        "nms_threshold": 0.3,
        "boxes": "unregressed proposals",
        "plus_one": True,  # the caffe conventions' per-class NMS counts inclusive pixels
    }
    assert prov["box_convention"]["name"] == "detectron2" and prov["weights"] == "random-init"
    conventions = prov["conventions"]
    assert conventions["name"] == "caffe" and conventions["rpn_min_size"] == 2.0  # tiny
    assert conventions["source"]["chosen_by"] == "checkpoint default"
    assert prov["model"]["conventions"]["rpn_min_size_unit"] == "original"
    pre = prov["preprocessing"]
    assert pre["pixel_order"] == "BGR" and (pre["min_size"], pre["max_size"]) == (64, 128)


def test_cache_holds_the_models_selection(frcnn_images, tmp_path):
    """The row is detect + select_boxes on the preprocessed image, boxes divided by the scale."""
    from vlpipe.extract.frcnn import detect, select_boxes
    from vlpipe.extract.images import load_image
    from vlpipe.pipelines.extract_job import build_from_job, resolve_extract

    vlpipe(*frcnn_args(frcnn_images, tmp_path / "r.h5", "--seed", 3))
    layer = {"backbone": "frcnn", "dataset": "folder", "out": str(tmp_path / "x.h5")}
    layer |= {"weights": "random", "model": json.loads(TINY_FRCNN), "image_size": 64}
    ext = build_from_job(resolve_extract(layer, {"run": {"seed": 3}}))
    image = load_image(frcnn_images / "img1.png")  # 80 x 64: scale 1.0
    plan = ext.transform.plan(64, 80)
    assert plan.scale == 1.0
    (det,) = detect(ext.model, [ext.transform(image)], scales=[plan.scale])
    sel = select_boxes(det, scale=plan.box_scale, policy="caffe", **ext.policy.options())
    item = FeatureCache(tmp_path / "r.h5")["img1"]
    assert item["image_feats"].shape == (36, 128) and item["image_mask"].sum() == sel.num_boxes
    np.testing.assert_allclose(item["image_feats"], sel.features, atol=1e-5)
    np.testing.assert_allclose(item["image_boxes"], sel.boxes, atol=1e-4)


def test_batch_size_does_not_change_the_cache(frcnn_images, tmp_path):
    one, three = tmp_path / "b1.h5", tmp_path / "b3.h5"
    vlpipe(*frcnn_args(frcnn_images, one, "--batch-size", 1))
    vlpipe(*frcnn_args(frcnn_images, three, "--batch-size", 3))
    a, b = FeatureCache(one), FeatureCache(three)
    keys = sorted(a.keys())
    ra, rb = a.read(keys), b.read(keys)
    for name in ra:
        np.testing.assert_allclose(ra[name], rb[name], atol=1e-4, err_msg=name)


def test_adaptive_policy_pads_to_its_max_boxes(frcnn_images, tmp_path):
    vlpipe(*frcnn_args(frcnn_images, tmp_path / "a.h5", "--box-policy", "adaptive", "--limit", 1))
    cache = FeatureCache(tmp_path / "a.h5")
    item = cache[cache.keys()[0]]
    assert item["image_feats"].shape == (100, 128)
    n = int(item["image_mask"].sum())
    assert 10 <= n < 100 and not item["image_feats"][n:].any()  # tiny RPN: < 100 proposals
    assert cache.provenance["box_policy"]["min_boxes"] == 10


def test_box_options_are_checked(frcnn_images, tmp_path):
    result = vlpipe(
        *frcnn_args(frcnn_images, tmp_path / "m.h5", "--box-policy", "maxnms",
                    "--conf-threshold", 0.5),
        code=1,
    )  # fmt: skip
    assert "takes no --conf-threshold" in result.output
    vit = ["extract", "--backbone", "vit", "--dataset", "folder", "--root", frcnn_images]
    result = vlpipe(*vit, "--out", tmp_path / "v.h5", "--weights", "random", "--box-policy",
                    "caffe", code=1)  # fmt: skip
    assert "only for --backbone frcnn" in result.output


def test_detectron2_backend_explains_how_to_install(frcnn_images, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_detectron2(name, *args, **kwargs):
        if name.split(".")[0] == "detectron2":
            raise ImportError("No module named 'detectron2'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "detectron2", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_detectron2)
    config = tmp_path / "butd.yaml"
    config.write_text("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n")
    result = vlpipe(
        *frcnn_args(frcnn_images, tmp_path / "d.h5", "--impl", "detectron2", "--d2-config", config),
        code=1,
    )
    text = " ".join(result.output.split())
    assert "not on PyPI" in text
    assert "pip install 'git+https://github.com/facebookresearch/detectron2.git'" in text
    assert "pip install -e detectron2/" in text and "--impl native" in text


def test_detectron2_backend_does_not_import_the_extractor():
    """The backend only builds a detector; the extractor imports it, never the other way."""
    code = (
        "import sys, vlpipe.extract.frcnn.d2_backend; "
        "assert 'vlpipe.extract.frcnn.extractor' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pickle_checkpoints_need_allow_pickle(frcnn_images, tmp_path):
    from vlpipe.extract.frcnn import BUTDFasterRCNN, FrcnnConfig

    torch.manual_seed(0)
    model = BUTDFasterRCNN(FrcnnConfig.tiny())
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    pkl = tmp_path / "faster_rcnn_attr.pkl"
    pkl.write_bytes(pickle.dumps({"model": state}))
    # sizes come from the weights; the tiny model's anchors and test-time settings are not
    settings = ["--model-kwargs", '{"anchor_sizes": [16, 32]}']
    for item in ("rpn_pre_nms_topk=200", "rpn_post_nms_topk=50", "rpn_min_size=2"):
        settings += ["--frcnn-set", item]
    args = frcnn_args(frcnn_images, tmp_path / "p.h5", "--weights", pkl, *settings)
    result = vlpipe(*args, code=1)
    assert "--allow-pickle" in result.output and "runs code" in result.output
    assert not (tmp_path / "p.h5").exists()
    vlpipe(*args, "--allow-pickle")
    vlpipe(*frcnn_args(frcnn_images, tmp_path / "r.h5", "--seed", 0))
    loaded, random = FeatureCache(tmp_path / "p.h5"), FeatureCache(tmp_path / "r.h5")
    assert loaded.provenance["weights"] == "faster_rcnn_attr.pkl"
    np.testing.assert_allclose(loaded["img0"]["image_feats"], random["img0"]["image_feats"])


# ---- import / export ---------------------------------------------------------------------------

FIELDNAMES = [
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
]


def _regions(rng, n: int, dim: int = 2048) -> dict[str, np.ndarray]:
    xy = rng.uniform(0, 300, (n, 2)).astype(np.float32)
    return {
        "objects_id": rng.integers(0, 1600, n).astype(np.int64),
        "objects_conf": rng.random(n, dtype=np.float32),
        "attrs_id": rng.integers(0, 400, n).astype(np.int64),
        "attrs_conf": rng.random(n, dtype=np.float32),
        "boxes": np.concatenate([xy, xy + rng.uniform(1, 100, (n, 2))], 1).astype(np.float32),
        "features": (rng.random((n, dim), dtype=np.float32) * 5),
    }


def write_lxmert_tsv(path, images):
    """As generate_tsv.py writes it: csv.DictWriter, tabs, base64 of the raw buffers."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, delimiter="\t", fieldnames=FIELDNAMES)
        for img_id, (h, w), arrays in images:
            row = {k: base64.b64encode(v.tobytes()).decode() for k, v in arrays.items()}
            n = len(arrays["boxes"])
            writer.writerow({"img_id": img_id, "img_h": h, "img_w": w, "num_boxes": n, **row})


def read_lxmert_tsv(path):
    """LXMERT's own reader (src/utils.py load_obj_tsv)."""
    csv.field_size_limit(sys.maxsize)
    out = []
    with open(path) as handle:
        for item in csv.DictReader(handle, FIELDNAMES, delimiter="\t"):
            for key in ("img_h", "img_w", "num_boxes"):
                item[key] = int(item[key])
            n = item["num_boxes"]
            for key, shape, dtype in (
                ("objects_id", (n,), np.int64),
                ("objects_conf", (n,), np.float32),
                ("attrs_id", (n,), np.int64),
                ("attrs_conf", (n,), np.float32),
                ("boxes", (n, 4), np.float32),
                ("features", (n, -1), np.float32),
            ):
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dtype).reshape(shape)
            out.append(item)
    return out


@pytest.fixture
def lxmert_tsv(tmp_path):
    rng = np.random.default_rng(0)
    images = [
        ("COCO_val2014_000000458752", (480, 640), _regions(rng, 36)),
        ("COCO_val2014_000000000042", (375, 500), _regions(rng, 36)),
        ("COCO_val2014_000000262148", (640, 427), _regions(rng, 20)),  # an adaptive row
    ]
    path = tmp_path / "val2014_obj36.tsv"
    write_lxmert_tsv(path, images)
    return path


CACHE_NAMES = {
    "objects_id": "obj_ids",
    "objects_conf": "obj_conf",
    "attrs_id": "attr_ids",
    "attrs_conf": "attr_conf",
    "boxes": "image_boxes",
    "features": "image_feats",
}


def test_lxmert_tsv_round_trip_is_byte_exact(lxmert_tsv, tmp_path):
    vlpipe("import", "--format", "lxmert-tsv", lxmert_tsv, "--out", tmp_path / "c.h5")
    cache = FeatureCache(tmp_path / "c.h5")
    assert cache.keys() == ["458752", "42", "262148"]
    assert cache.fields["image_feats"] == ((36, 2048), "float32")
    assert cache.provenance["img_id_format"] == "COCO_val2014_{num:012d}"
    source = read_lxmert_tsv(lxmert_tsv)
    for row in source:
        item = cache[str(int(row["img_id"].rsplit("_", 1)[1]))]
        n = row["num_boxes"]
        assert item["image_hw"].tolist() == [row["img_h"], row["img_w"]]
        assert item["image_mask"].sum() == n and item["image_mask"][:n].all()
        for name, field in CACHE_NAMES.items():
            assert item[field][:n].tobytes() == row[name].tobytes(), name
    vlpipe("export", "--format", "lxmert-tsv", tmp_path / "c.h5", "--out", tmp_path / "back.tsv")
    back = read_lxmert_tsv(tmp_path / "back.tsv")
    assert [r["img_id"] for r in back] == [r["img_id"] for r in source]
    for a, b in zip(source, back, strict=True):
        for key in FIELDNAMES[1:]:
            value_a, value_b = a[key], b[key]
            if isinstance(value_a, np.ndarray):
                assert value_a.dtype == value_b.dtype and value_a.tobytes() == value_b.tobytes()
            else:
                assert value_a == value_b
    assert (tmp_path / "back.tsv").read_bytes() == lxmert_tsv.read_bytes()


def test_malformed_tsv_row_is_named(lxmert_tsv, tmp_path):
    lines = lxmert_tsv.read_text().splitlines(keepends=True)
    fields = lines[1].split("\t")
    fields[9] = fields[9][:-400] + "\r\n"  # features cut short
    lxmert_tsv.write_text(lines[0] + "\t".join(fields) + lines[2])
    result = vlpipe("import", "--format", "lxmert-tsv", lxmert_tsv, "--out", tmp_path / "c.h5",
                    code=1)  # fmt: skip
    text = " ".join(result.output.split())
    assert "val2014_obj36.tsv row 2" in text and "COCO_val2014_000000000042" in text
    assert "features" in text


def test_milvlg_npz_import(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "npz"
    folder.mkdir()
    expected = {}
    for stem, n, hw in (("COCO_train2014_000000000009", 14, (480, 640)),
                        ("COCO_train2014_000000000025", 31, (426, 640))):  # fmt: skip
        r = _regions(rng, n)
        info = {
            "image_id": stem,
            "image_h": hw[0],
            "image_w": hw[1],
            "num_boxes": n,
            **{k: r[k] for k in ("objects_id", "objects_conf", "attrs_id", "attrs_conf")},
        }
        # as MILVLG's save_roi_features writes it
        np.savez_compressed(folder / stem, x=r["features"], bbox=r["boxes"], num_bbox=n,
                            image_h=hw[0], image_w=hw[1], info=info)  # fmt: skip
        expected[str(int(stem.rsplit("_", 1)[1]))] = (r, hw)
    out = tmp_path / "n.h5"
    result = vlpipe("import", "--format", "npz", folder, "--out", out, code=1)
    assert "--allow-pickle" in " ".join(result.output.split())
    vlpipe("import", "--format", "npz", folder, "--out", out, "--allow-pickle", "--overwrite")
    cache = FeatureCache(out)
    assert sorted(cache.keys()) == sorted(expected)
    assert cache.fields["image_feats"][0] == (31, 2048)  # K = the largest num_bbox
    for key, (r, hw) in expected.items():
        item, n = cache[key], len(r["boxes"])
        assert item["image_hw"].tolist() == list(hw) and item["image_mask"].sum() == n
        for name, field in CACHE_NAMES.items():
            assert item[field][:n].tobytes() == r[name].tobytes(), name
