"""Test-time conventions: each named set reproduces its reference pipeline on random weights.

The references are compact functions written here from the reference code's rules (file:line
cited): `caffe` = peteanderson80/bottom-up-attention lib/fast_rcnn/test.py, lib/rpn/
proposal_layer.py, lib/fast_rcnn/bbox_transform.py, lib/nms/py_cpu_nms.py, tools/generate_tsv.py;
`hf` = the HF LXMERT port lxmert/processing_image.py, modeling_frcnn.py, utils.py. The network
layers (trunk, RPN convs, RoI pool, res5, predictor) are the model's own modules in both, as the
Caffe net / the port's modules would be: what is compared is everything around them.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.nn import functional as F
from torchvision.ops import nms

from tests.conftest import vlpipe, write_image
from vlpipe.cache import FeatureCache
from vlpipe.extract.base import Batch
from vlpipe.extract.frcnn import (
    BoxConvention,
    BUTDFasterRCNN,
    FrcnnConfig,
    default_conventions,
    parse_overrides,
    preprocess,
    resize_plan,
)
from vlpipe.extract.frcnn import boxes as box_ops
from vlpipe.extract.frcnn.conventions import CAFFE, HF, hf_config_overrides, read_hf_config
from vlpipe.extract.frcnn.extractor import build_frcnn

MEAN = np.array([102.9801, 115.9465, 122.7717], dtype=np.float32)
# (h, w) at min_size 64 / max_size 128: a long side of exactly 64.5 (half-even vs half-up),
# 128.32 (capped by the HF rule only), capped ones, a square, an upscale
SIZES = [(128, 129), (200, 401), (43, 97), (64, 64), (81, 60), (50, 77)]


# ---------------------------------------------------------------- reference rules


def caffe_size(h: int, w: int, target: int, max_size: int) -> tuple[tuple[int, int], float]:
    """test.py:44-50, then cv2.resize(fx=fy=scale): sides round half to even (saturate_cast)."""
    im_scale = target / min(h, w)
    if np.round(im_scale * max(h, w)) > max_size:
        im_scale = max_size / max(h, w)
    return (int(np.round(h * im_scale)), int(np.round(w * im_scale))), im_scale


def hf_size(h: int, w: int, size: int, max_size: int) -> tuple[int, int]:
    """processing_image.py:47-60: cap on the unrounded sides, then int(x + 0.5)."""
    scale = size * 1.0 / min(h, w)
    newh, neww = (size, scale * w) if h < w else (scale * h, size)
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh, neww = newh * scale, neww * scale
    return int(newh + 0.5), int(neww + 0.5)


def cv2_linear(img: np.ndarray, out: tuple[int, int], scale: float) -> np.ndarray:
    """cv2.resize INTER_LINEAR on float, fx = fy = scale: src = (dst + 0.5) / scale - 0.5,
    taps clamped to the image (HWC)."""

    def taps(n_out: int, n_in: int):
        src = np.maximum((np.arange(n_out) + 0.5) / scale - 0.5, 0)
        i0 = np.floor(src).astype(int)
        a = (src - i0).astype(np.float32)
        return np.minimum(i0, n_in - 1), np.minimum(i0 + 1, n_in - 1), a

    y0, y1, ay = taps(out[0], img.shape[0])
    x0, x1, ax = taps(out[1], img.shape[1])
    rows = img[y0] * (1 - ay)[:, None, None] + img[y1] * ay[:, None, None]
    return rows[:, x0] * (1 - ax)[None, :, None] + rows[:, x1] * ax[None, :, None]


def nms_ref(boxes: np.ndarray, scores: np.ndarray, thresh: float, plus_one: bool) -> list[int]:
    """py_cpu_nms.py:10-38 (areas with + 1); without + 1: detectron2 / torchvision. Equal
    scores (RoIPool maps nearby proposals to the same cells, so twins score alike) go in
    index order: Caffe's argsort()[::-1] leaves their order to numpy's unstable sort."""
    one = 1.0 if plus_one else 0.0
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order, keep = np.argsort(-scores, kind="stable"), []
    while order.size > 0:
        i, rest = order[0], order[1:]
        keep.append(int(i))
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + one)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + one)
        ovr = w * h / (areas[i] + areas[rest] - w * h)
        order = order[np.where(ovr <= thresh)[0] + 1]
    return keep


def decode_ref(anchors, deltas, weights, plus_one: bool, clamp: float | None):
    """bbox_transform.py:30-59 (+ 1 widths, no clamp); detectron2 Box2BoxTransform
    (modeling_frcnn.py:483-518: no + 1, dw / dh clamped at log(1000 / 16))."""
    one = 1.0 if plus_one else 0.0
    w, h = anchors[:, 2] - anchors[:, 0] + one, anchors[:, 3] - anchors[:, 1] + one
    cx, cy = anchors[:, 0] + 0.5 * w, anchors[:, 1] + 0.5 * h
    d = deltas.reshape(len(deltas), -1, 4) / np.asarray(weights, dtype=np.float32)
    dw, dh = d[..., 2], d[..., 3]
    if clamp is not None:
        dw, dh = np.minimum(dw, clamp), np.minimum(dh, clamp)
    px, py = d[..., 0] * w[:, None] + cx[:, None], d[..., 1] * h[:, None] + cy[:, None]
    pw, ph = np.exp(dw) * w[:, None], np.exp(dh) * h[:, None]
    out = np.stack([px - 0.5 * pw, py - 0.5 * ph, px + 0.5 * pw, py + 0.5 * ph], -1)
    return out.reshape(deltas.shape).astype(np.float32)


def clip_ref(boxes: np.ndarray, h: int, w: int, minus_one: bool) -> np.ndarray:
    """bbox_transform.py:62-75 (size - 1) / modeling_frcnn.py:143-149 (size)."""
    one = 1.0 if minus_one else 0.0
    out = boxes.copy()
    out[:, 0::2] = np.clip(out[:, 0::2], 0, w - one)
    out[:, 1::2] = np.clip(out[:, 1::2], 0, h - one)
    return out


# ---------------------------------------------------------------- the two reference pipelines


def _network(model, image: torch.Tensor):
    fmap = model.backbone(image[None])
    logits, deltas = model.proposal_generator.rpn_head(fmap)
    anchors = model.proposal_generator.anchor_generator(fmap.shape[-2], fmap.shape[-1])
    return fmap, logits.numpy(), deltas.numpy(), anchors.numpy()


def _heads(model, fmap, proposals: np.ndarray):
    props = [torch.from_numpy(proposals)]
    feats = model.roi_heads.region_features(model.roi_heads.pool([fmap], props))
    cls, deltas, attrs = model.roi_heads.box_predictor(feats)
    return feats.numpy(), cls, deltas.numpy(), attrs


def caffe_rpn(logits, deltas, anchors, size, im_scale: float, c) -> np.ndarray:
    """proposal_layer.py:126-152: decode every anchor (+ 1, no clamp), clip to size - 1, drop
    sides < RPN_MIN_SIZE * im_scale (w + 1 >= m), sort, top-k, NMS with + 1 areas, top-k."""
    scores = 1 / (1 + np.exp(-logits))  # the fg softmax probability
    boxes = clip_ref(decode_ref(anchors, deltas, (1, 1, 1, 1), True, None), *size, True)
    ws, hs = boxes[:, 2] - boxes[:, 0] + 1, boxes[:, 3] - boxes[:, 1] + 1
    keep = (ws >= c.rpn_min_size * im_scale) & (hs >= c.rpn_min_size * im_scale)
    boxes, scores = boxes[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")[: c.rpn_pre_nms_topk]
    boxes, scores = boxes[order], scores[order]
    return boxes[nms_ref(boxes, scores, c.rpn_nms_threshold, True)[: c.rpn_post_nms_topk]]


def hf_rpn(logits, deltas, anchors, size, c) -> np.ndarray:
    """modeling_frcnn.py:287-327: sort, top-k, decode (clamped), clip to size, drop sides
    <= PROPOSAL_GENERATOR.MIN_SIZE (w > m), NMS without + 1, top-k."""
    order = np.argsort(-logits, kind="stable")[: c.rpn_pre_nms_topk]
    boxes = decode_ref(anchors[order], deltas[order], (1, 1, 1, 1), False, math.log(1000 / 16))
    boxes, scores = clip_ref(boxes, *size, False), logits[order]
    ok = (boxes[:, 2] - boxes[:, 0] > c.rpn_min_size) & (boxes[:, 3] - boxes[:, 1] > c.rpn_min_size)
    boxes, scores = boxes[ok], scores[ok]
    return boxes[nms_ref(boxes, scores, c.rpn_nms_threshold, False)[: c.rpn_post_nms_topk]]


def caffe_pipeline(model, pil: Image.Image, c, min_boxes: int, max_boxes: int) -> dict:
    """test.py:_get_image_blob + proposal_layer.py:forward + generate_tsv.py:79-100."""
    bgr = np.asarray(pil, dtype=np.float32)[:, :, ::-1] - MEAN
    size, im_scale = caffe_size(*bgr.shape[:2], c.min_size, c.max_size)
    blob = cv2_linear(bgr, size, im_scale)
    image = torch.from_numpy(np.ascontiguousarray(blob.transpose(2, 0, 1)))
    fmap, logits, deltas, anchors = _network(model, image)
    rois = caffe_rpn(logits, deltas, anchors, size, im_scale, c)
    pool5, cls, _, attrs = _heads(model, fmap, rois)
    cls_prob, attr_prob = cls.softmax(-1).numpy(), attrs.softmax(-1).numpy()  # 1601 / 401 way
    cls_boxes = rois / im_scale
    max_conf = np.zeros(len(rois))
    for k in range(cls_prob.shape[1] - 1):  # background is last in our layout
        kept = np.array(nms_ref(cls_boxes, cls_prob[:, k], 0.3, True))
        max_conf[kept] = np.maximum(max_conf[kept], cls_prob[kept, k])
    keep_boxes = np.where(max_conf >= 0.2)[0]
    if not min_boxes <= len(keep_boxes) <= max_boxes:
        order = np.argsort(-max_conf, kind="stable")
        keep_boxes = order[: min_boxes if len(keep_boxes) < min_boxes else max_boxes]
    return _outputs(cls_boxes[keep_boxes], pool5, cls_prob, attr_prob, keep_boxes)


def hf_pipeline(model, pil: Image.Image, c, mind: int, maxd: int, thresholds) -> dict:
    """processing_image.py:Preprocess (RGB: utils.py:547-549) + modeling_frcnn.py RPN
    (:287-327) + ROIOutputs.inference (:1149-1210) at batch size 1."""
    rgb = torch.from_numpy(np.asarray(pil, dtype=np.float32).copy())
    raw = rgb.shape[:2]
    size = hf_size(*raw, c.min_size, c.max_size)
    image = F.interpolate(rgb.permute(2, 0, 1)[None], size, mode="bilinear", align_corners=False)
    image = (image[0] - torch.from_numpy(MEAN).view(3, 1, 1)) / 1.0
    fmap, logits, deltas, anchors = _network(model, image)
    props = hf_rpn(logits, deltas, anchors, size, c)
    clamp = math.log(1000.0 / 16)
    feats, cls, box_deltas, attrs = _heads(model, fmap, props)
    obj = cls.softmax(-1).numpy()[:, :-1]
    attr_prob = attrs[:, :-1].softmax(-1).numpy()  # modeling_frcnn.py:1165: 400-way
    per_class = clip_ref(
        decode_ref(props, box_deltas, (10, 10, 5, 5), False, clamp).reshape(-1, 4), *size, False
    ).reshape(len(props), -1, 4)
    best = obj.argmax(1)
    max_boxes, max_scores = per_class[np.arange(len(props)), best], obj.max(1)
    for t in thresholds:  # :1191-1203
        keep = np.array(nms_ref(max_boxes, max_scores, t, False)[:maxd])
        if len(keep) >= mind:
            break
    scale_yx = np.array(raw) / np.array(size)  # processing_image.py:132, modeling_frcnn.py:1207
    mapped = max_boxes[keep] * np.array([scale_yx[1], scale_yx[0]] * 2, dtype=np.float32)
    none = np.zeros((len(obj), 1))  # the background / "no attribute" columns _outputs drops
    return _outputs(mapped, feats, np.c_[obj, none], np.c_[attr_prob, none], keep)


def _outputs(boxes, feats, cls_prob, attr_prob, keep) -> dict:
    return {
        "boxes": boxes,
        "feats": feats[keep],
        "obj_ids": cls_prob[keep, :-1].argmax(1),
        "obj_conf": cls_prob[keep, :-1].max(1),
        "attr_ids": attr_prob[keep, :-1].argmax(1),
        "attr_conf": attr_prob[keep, :-1].max(1),
    }


def _compare(ext, images, reference) -> None:
    for pil in images:
        hw = (pil.height, pil.width)
        with torch.inference_mode():
            row = {
                k: v[0].numpy() for k, v in ext.encode(Batch([ext.transform(pil)], [hw])).items()
            }
            ref = reference(pil)
        n = int(row["image_mask"].sum())
        assert n == len(ref["boxes"]), (hw, n, len(ref["boxes"]))
        np.testing.assert_array_equal(row["obj_ids"][:n], ref["obj_ids"], err_msg=str(hw))
        np.testing.assert_array_equal(row["attr_ids"][:n], ref["attr_ids"])
        np.testing.assert_allclose(row["image_boxes"][:n], ref["boxes"], atol=2e-3, rtol=0)
        np.testing.assert_allclose(row["image_feats"][:n], ref["feats"], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(row["obj_conf"][:n], ref["obj_conf"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(row["attr_conf"][:n], ref["attr_conf"], atol=1e-6, rtol=0)


def _images(seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for h, w in SIZES:  # smooth random images: realistic structure, no flat regions
        small = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize((w, h), Image.BILINEAR))
    return out


TINY_ARCH = {"tiny": True}
CAFFE_TINY = ("min_size=64", "max_size=128", "rpn_min_size=6", "rpn_pre_nms_topk=60",
              "rpn_post_nms_topk=40", "rpn_nms_threshold=0.5")  # fmt: skip


def test_caffe_set_reproduces_generate_tsv_pipeline():
    torch.manual_seed(0)
    ext = build_frcnn(
        arch=None, weights=None, image_size=None, model_kwargs={**TINY_ARCH, "convention": "caffe"},
        conventions="caffe", frcnn_set=CAFFE_TINY, min_boxes=8, max_boxes=12,
    )  # fmt: skip
    c = ext.conventions
    assert c.name == "caffe" and ext.model.config.convention == BoxConvention.caffe()
    _compare(ext, _images(), lambda pil: caffe_pipeline(ext.model, pil, c, 8, 12))


HF_TINY_CONFIG = {  # the port's config.yaml format (lowercase keys, utils.py Config)
    "model": {"device": "cpu", "pixel_mean": MEAN.tolist(), "pixel_std": [1.0, 1.0, 1.0]},
    "input": {"min_size_test": 64, "max_size_test": 128, "format": "BGR"},
    "proposal_generator": {"hidden_channels": 16, "min_size": 6.0},
    "rpn": {"pre_nms_topk_test": 60, "post_nms_topk_test": 40, "nms_thresh": 0.5,
            "bbox_reg_weights": [1.0, 1.0, 1.0, 1.0]},
    "roi_heads": {"nms_thresh_test": [0.2, 0.4, 0.6], "score_thresh_test": 0.2},
    "roi_box_head": {"bbox_reg_weights": [10.0, 10.0, 5.0, 5.0]},
    "min_detections": 8,
    "max_detections": 12,
}  # fmt: skip


@pytest.fixture
def hf_folder(tmp_path):
    torch.manual_seed(0)
    model = BUTDFasterRCNN(FrcnnConfig.tiny())
    folder = tmp_path / "frcnn-vg-finetuned"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "config.yaml").write_text(yaml.safe_dump(HF_TINY_CONFIG))
    return folder


def test_hf_set_reproduces_the_port_with_its_config_yaml(hf_folder):
    ext = build_frcnn(
        arch=None, weights=str(hf_folder), image_size=None, model_kwargs={"anchor_sizes": [16, 32]}
    )  # fmt: skip
    c = ext.conventions
    assert c.name == "hf" and ext.conventions_source["chosen_by"] == "checkpoint default"
    assert (c.min_size, c.max_size, c.rpn_min_size, c.pixel_order) == (64, 128, 6.0, "RGB")
    assert (ext.policy.name, ext.policy.min_boxes, ext.policy.max_boxes) == ("maxnms", 8, 12)
    assert ext.policy.thresholds == (0.2, 0.4, 0.6)
    _compare(ext, _images(1), lambda pil: hf_pipeline(ext.model, pil, c, 8, 12, (0.2, 0.4, 0.6)))


def test_sets_give_different_regions(hf_folder):
    """The two pipelines differ on the same weights (so the tests above can tell them apart)."""
    images = _images(2)
    rows = {}
    for name in ("caffe", "hf"):
        ext = build_frcnn(arch=None, weights=str(hf_folder), image_size=None, conventions=name,
                          model_kwargs={"anchor_sizes": [16, 32]}, box_policy="caffe",
                          min_boxes=8, max_boxes=8, frcnn_set=("rpn_min_size=3",))  # fmt: skip
        with torch.inference_mode():
            rows[name] = [
                ext.encode(Batch([ext.transform(im)], [(im.height, im.width)])) for im in images
            ]
    differ = [
        not torch.allclose(a["image_boxes"], b["image_boxes"], atol=1e-3)
        for a, b in zip(rows["caffe"], rows["hf"], strict=True)
    ]
    assert sum(differ) >= len(images) - 1


# ---------------------------------------------------------------- single rules


def test_resize_sizes_match_both_references():
    rng = np.random.default_rng(0)
    pairs = [tuple(p) for p in rng.integers(20, 3000, (3000, 2))]
    pairs += [(h, w) for h in range(1, 60) for w in range(1, 60)]
    pairs += [(6001, 10002), (3, 5), (375, 500), (480, 640), (333, 500), (427, 640)]
    disagree = 0
    for h, w in pairs:
        caffe = resize_plan(h, w, CAFFE)
        (size, scale) = caffe_size(h, w, 600, 1000)
        assert caffe.size == size and caffe.scale == pytest.approx(scale, rel=1e-12), (h, w)
        assert caffe.box_scale == (caffe.scale, caffe.scale)
        hf = resize_plan(h, w, HF.replace(min_size=600, max_size=1000))
        assert hf.size == hf_size(h, w, 600, 1000), (h, w)
        assert hf.box_scale == (hf.size[0] / h, hf.size[1] / w)
        disagree += hf.size != caffe.size
    assert disagree > 10  # the rounding / cap rules really differ on some sizes


@pytest.mark.parametrize("grid", ["scale", "size"])
def test_resize_pixels_match_cv2_and_interpolate(grid):
    rng = np.random.default_rng(0)
    pil = Image.fromarray(rng.integers(0, 256, (13, 17, 3), dtype=np.uint8))
    c = CAFFE.replace(min_size=45, max_size=100, resize_grid=grid)
    tensor, plan = preprocess(pil, c)
    bgr = np.asarray(pil, dtype=np.float32)[:, :, ::-1] - MEAN
    exact = cv2_linear(bgr, plan.size, plan.scale).transpose(2, 0, 1)
    ratio = F.interpolate(torch.from_numpy(bgr.transpose(2, 0, 1).copy())[None], plan.size,
                          mode="bilinear", align_corners=False)[0].numpy()  # fmt: skip
    expected, other = (exact, ratio) if grid == "scale" else (ratio, exact)
    np.testing.assert_allclose(tensor.numpy(), expected, atol=2e-3, rtol=0)
    assert np.abs(tensor.numpy() - other).max() > 1.0


def test_pixel_order_follows_conventions():
    pil = Image.new("RGB", (4, 4), (200, 100, 10))
    bgr, _ = preprocess(pil, CAFFE.replace(min_size=4))
    rgb, _ = preprocess(pil, CAFFE.replace(min_size=4, pixel_order="RGB"))
    assert bgr[:, 0, 0].tolist() == pytest.approx((10 - MEAN[0], 100 - MEAN[1], 200 - MEAN[2]))
    assert rgb[:, 0, 0].tolist() == pytest.approx((200 - MEAN[0], 100 - MEAN[1], 10 - MEAN[2]))


def test_min_size_filter_rules():
    rng = np.random.default_rng(0)
    xy = rng.random((400, 2)) * 50
    boxes = np.c_[xy, xy + rng.random((400, 2)) * 12].astype(np.float32)
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    caffe = (ws + 1 >= 4 * 1.5) & (hs + 1 >= 4 * 1.5)  # proposal_layer.py:133, :180-184
    hf = (ws > 4) & (hs > 4)  # modeling_frcnn.py:152-156
    ours = BUTDFasterRCNN(FrcnnConfig.tiny(), CAFFE.replace(rpn_min_size=4)).proposal_generator
    scale = 1.5 if CAFFE.rpn_min_size_unit == "original" else 1.0
    assert np.array_equal(ours._large_enough(torch.from_numpy(boxes), 4 * scale).numpy(), caffe)
    ours = BUTDFasterRCNN(FrcnnConfig.tiny(), HF.replace(rpn_min_size=4)).proposal_generator
    assert np.array_equal(ours._large_enough(torch.from_numpy(boxes), 4).numpy(), hf)
    assert not np.array_equal(caffe, hf)


class _FixedHead(torch.nn.Module):
    def __init__(self, logits, deltas):
        super().__init__()
        self.out = (logits, deltas)

    def forward(self, features):
        return self.out


@pytest.mark.parametrize("name", ["caffe", "hf"])
def test_rpn_rules_match_references(name):
    """Random objectness / deltas on a 12 x 16 map: ours equal the reference's proposals, and
    flipping the filter-vs-top-k order or the NMS areas changes them."""
    base = {"caffe": CAFFE, "hf": HF}[name]
    trained = BoxConvention.named("caffe" if name == "caffe" else "detectron2")
    c = base.replace(
        rpn_min_size=14.0, rpn_pre_nms_topk=80, rpn_post_nms_topk=60, rpn_nms_threshold=0.3
    )
    size, scale = (192, 256), 1.25
    changed = {"rpn_filter_before_topk": 0, "rpn_nms_plus_one": 0}
    for seed in range(6):
        gen = torch.Generator().manual_seed(seed)
        rpn = BUTDFasterRCNN(FrcnnConfig.tiny(convention=trained), c).proposal_generator
        anchors = rpn.anchor_generator(12, 16)
        logits = torch.randn(len(anchors), generator=gen) * 2
        deltas = torch.randn(len(anchors), 4, generator=gen) * 0.4
        rpn.rpn_head = _FixedHead(logits, deltas)
        args = (logits.numpy(), deltas.numpy(), anchors.numpy(), size)
        ref = caffe_rpn(*args, scale, c) if name == "caffe" else hf_rpn(*args, c)
        with torch.inference_mode():
            got = rpn(torch.zeros(1, 1, 12, 16), size, scale=scale)[0].numpy()
            np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
            for rule in changed:
                rpn.conventions = c.replace(**{rule: not getattr(c, rule)})
                other = rpn(torch.zeros(1, 1, 12, 16), size, scale=scale)[0].numpy()
                changed[rule] += other.shape != ref.shape or not np.allclose(other, ref, atol=1e-4)
    assert all(changed.values()), changed


def test_nms_with_and_without_plus_one():
    rng = np.random.default_rng(0)
    differ = 0
    for trial in range(30):
        xy = rng.random((60, 2)) * 30  # not integers: no IoU lands exactly on the threshold
        boxes = np.c_[xy, xy + 1 + rng.random((60, 2)) * 14].astype(np.float32)
        scores = rng.random(60).astype(np.float32)
        for plus_one in (True, False):
            got = box_ops.nms_convention(
                torch.from_numpy(boxes), torch.from_numpy(scores), 0.3, plus_one=plus_one
            )
            assert got.tolist() == nms_ref(boxes, scores, 0.3, plus_one), (trial, plus_one)
        differ += nms_ref(boxes, scores, 0.3, True) != nms_ref(boxes, scores, 0.3, False)
    assert differ > 5


def test_attribute_confidence_rules():
    torch.manual_seed(0)
    logits = torch.randn(20, 6) * 3
    for conventions, expected in (
        (CAFFE, logits.softmax(-1)[:, :-1].max(1).values),  # 401-way, generate_tsv.py
        (HF, logits[:, :-1].softmax(-1).max(1).values),  # 400-way, modeling_frcnn.py:1165
    ):
        probs = BUTDFasterRCNN(FrcnnConfig.tiny(), conventions).attr_probs(logits)
        torch.testing.assert_close(probs[:, :-1].max(1).values, expected)
    assert not torch.allclose(logits.softmax(-1)[:, :-1], logits[:, :-1].softmax(-1))


def test_no_delta_clamp_in_caffe_decode():
    anchors = torch.tensor([[0.0, 0.0, 15.0, 15.0]])
    deltas = torch.tensor([[0.0, 0.0, 6.0, 6.0]])  # exp(6) > 1000 / 16
    caffe = box_ops.decode(deltas, anchors, (1, 1, 1, 1), plus_one=True, clamp=CAFFE.delta_clamp)
    hf = box_ops.decode(deltas, anchors, (1, 1, 1, 1), clamp=HF.delta_clamp)
    ref = decode_ref(anchors.numpy(), deltas.numpy(), (1, 1, 1, 1), True, None)
    np.testing.assert_allclose(caffe.numpy(), ref, rtol=1e-6)
    assert (hf[0, 2] - hf[0, 0]).item() == pytest.approx(15 * 1000 / 16, rel=1e-5)


def test_plus_one_nms_equals_torchvision_on_grown_boxes():
    # what box_ops relies on: (w + 1)(h + 1) areas == torchvision on boxes grown by one
    boxes = torch.tensor([[0.0, 0.0, 9.0, 9.0], [5.0, 0.0, 14.0, 9.0]])
    scores = torch.tensor([0.9, 0.8])
    grown = nms(boxes + torch.tensor([0.0, 0.0, 1.0, 1.0]), scores, 0.3).tolist()
    assert grown == nms_ref(boxes.numpy(), scores.numpy(), 0.3, True)


# ---------------------------------------------------------------- config.yaml, overrides, CLI


def test_hf_config_yaml_keys(tmp_path):
    hub = tmp_path / "hub.yaml"
    hub.write_text(yaml.safe_dump(HF_TINY_CONFIG))
    assert hf_config_overrides(read_hf_config(hub)) == {
        "min_size": 64, "max_size": 128, "pixel_mean": tuple(MEAN.tolist()),
        "pixel_std": (1.0, 1.0, 1.0), "rpn_min_size": 6.0, "rpn_pre_nms_topk": 60,
        "rpn_post_nms_topk": 40, "rpn_nms_threshold": 0.5,
        "maxnms_thresholds": (0.2, 0.4, 0.6), "min_boxes": 8, "max_boxes": 12,
        "pixel_order": "RGB",
    }  # fmt: skip
    d2 = tmp_path / "d2.yaml"  # detectron2 style: upper case, nested under MODEL
    d2.write_text(
        "MODEL:\n  PROPOSAL_GENERATOR:\n    MIN_SIZE: 16\n  ROI_HEADS:\n    NMS_THRESH_TEST: 0.6\n"
        "INPUT:\n  MIN_SIZE_TEST: 600\n  MAX_SIZE_TEST: 1000\n  FORMAT: RGB\n"
        "TEST:\n  DETECTIONS_PER_IMAGE: 50\n"
    )
    assert hf_config_overrides(read_hf_config(d2)) == {
        "min_size": 600, "max_size": 1000, "rpn_min_size": 16.0, "maxnms_thresholds": (0.6,),
        "max_boxes": 50, "pixel_order": "BGR",
    }  # fmt: skip


def test_parse_overrides_types_and_errors():
    got = parse_overrides(["rpn_min_size=0", "clip_minus_one=false", "maxnms_thresholds=0.3,0.5",
                           "delta_clamp=none", "min_boxes=10", "box_mapping=per_axis"])  # fmt: skip
    assert got == {"rpn_min_size": 0.0, "clip_minus_one": False, "maxnms_thresholds": (0.3, 0.5),
                   "delta_clamp": None, "min_boxes": 10, "box_mapping": "per_axis"}  # fmt: skip
    with pytest.raises(ValueError, match="unknown convention field.*rpn_min_size"):
        parse_overrides(["rpn_min_sise=3"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_overrides(["rpn_min_size"])
    with pytest.raises(ValueError, match="box_mapping='diagonal'"):
        CAFFE.replace(**parse_overrides(["box_mapping=diagonal"]))


def test_default_conventions_per_checkpoint(tmp_path):
    assert default_conventions(tmp_path, BoxConvention.detectron2()) == "hf"  # HF folder
    assert default_conventions(tmp_path / "x.pth", BoxConvention.caffe()) == "caffe"  # MILVLG
    assert default_conventions(tmp_path / "x.pkl", BoxConvention.detectron2()) == "caffe"
    assert default_conventions(tmp_path / "x.bin", BoxConvention.detectron2()) == "hf"


def _cli_args(root, out, *extra, model_kwargs='{"tiny": true}'):
    return ("extract", "--backbone", "frcnn", "--dataset", "folder", "--root", root, "--out", out,
            "--weights", "random", "--model-kwargs", model_kwargs, "--num-workers", 0,
            "--dtype", "float32", "--no-progress", "--frcnn-set", "min_size=64",
            "--frcnn-set", "max_size=128", *extra)  # fmt: skip


def test_cli_conventions_recorded_and_resume_refuses_another_set(tmp_path):
    root = tmp_path / "images"
    for i, size in enumerate([(96, 64), (64, 80)]):
        write_image(root / f"img{i}.png", size=size, seed=i)
    out = tmp_path / "r.h5"
    vlpipe(*_cli_args(root, out, "--conventions", "hf", "--frcnn-set", "rpn_min_size=1",
                      "--limit", 1))  # fmt: skip
    prov = FeatureCache(out).provenance
    assert prov["conventions"]["name"] == "hf" and prov["conventions"]["rpn_min_size"] == 1.0
    assert prov["conventions"]["source"]["chosen_by"] == "flag"
    assert prov["conventions"]["source"]["overrides"]["rpn_min_size"] == 1.0
    assert prov["box_policy"]["name"] == "maxnms" and prov["preprocessing"]["pixel_order"] == "RGB"
    result = vlpipe(*_cli_args(root, out, "--conventions", "caffe", "--resume"), code=1)
    assert "cannot resume" in result.output
    vlpipe(*_cli_args(root, out, "--conventions", "hf", "--frcnn-set", "rpn_min_size=1",
                      "--resume"))  # fmt: skip
    assert len(FeatureCache(out)) == 2
    result = vlpipe(*_cli_args(root, tmp_path / "x.h5", "--frcnn-set", "rpn_minsize=1"), code=1)
    assert "unknown convention field" in result.output and "rpn_min_size" in result.output
    old = _cli_args(root, tmp_path / "y.h5", model_kwargs='{"tiny": true, "post_nms_topk": 9}')
    assert "--frcnn-set rpn_post_nms_topk" in vlpipe(*old, code=1).output
