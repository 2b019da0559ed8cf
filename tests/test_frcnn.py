"""BUTD Faster R-CNN: anchors and box arithmetic, forward shapes, batch-size independence,
box-selection policies and preprocessing. Tiny random-weight models keep it fast."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import nms

from vlpipe.extract.frcnn import (
    BoxConvention,
    BUTDFasterRCNN,
    Detections,
    FrcnnConfig,
    detect,
    per_class_max_score,
    preprocess,
    resize_plan,
    select_boxes,
)
from vlpipe.extract.frcnn import boxes as box_ops
from vlpipe.extract.frcnn.conventions import CAFFE, TINY_SETTINGS

SIZES = [(64, 96), (80, 48), (96, 96), (48, 112), (64, 64), (112, 80), (72, 88), (56, 120)]


TINY = CAFFE.replace(**TINY_SETTINGS)


def _tiny_model(seed: int = 0, conventions=TINY, **overrides) -> BUTDFasterRCNN:
    torch.manual_seed(seed)
    return BUTDFasterRCNN(FrcnnConfig.tiny(**overrides), conventions).eval()


def _images(seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(3, h, w, generator=gen) * 60 for h, w in SIZES]


# ---------------------------------------------------------------- anchors and boxes


def test_detectron2_cell_anchors_are_size_major_and_centred_on_zero():
    anchors = box_ops.cell_anchors((64, 128, 256, 512), (0.5, 1, 2), 16, BoxConvention.detectron2())
    assert anchors.shape == (12, 4)
    half_w = float(np.sqrt(64 * 64 / 0.5)) / 2  # ratio = h / w = 0.5: a wide box
    half_h = 0.5 * half_w
    torch.testing.assert_close(anchors[0], torch.tensor([-half_w, -half_h, half_w, half_h]))
    torch.testing.assert_close(anchors[1], torch.tensor([-32.0, -32.0, 32.0, 32.0]))  # 64, 1:1
    torch.testing.assert_close(anchors[4], torch.tensor([-64.0, -64.0, 64.0, 64.0]))  # 128, 1:1


def test_caffe_cell_anchors_match_py_faster_rcnn_table():
    anchors = box_ops.cell_anchors((64, 128, 256, 512), (0.5, 1, 2), 16, BoxConvention.caffe())
    # Rows of py-faster-rcnn's generate_anchors() (scales 8, 16, 32), ratio-major, centre 7.5.
    assert anchors[0].tolist() == [-38.0, -16.0, 53.0, 31.0]  # ratio 0.5, size 64 (23x12 * 4)
    assert anchors[1].tolist() == [-84.0, -40.0, 99.0, 55.0]  # ratio 0.5, scale 8
    assert anchors[3].tolist() == [-360.0, -184.0, 375.0, 199.0]  # ratio 0.5, scale 32
    assert anchors[5].tolist() == [-56.0, -56.0, 71.0, 71.0]  # ratio 1, scale 8
    assert anchors[9].tolist() == [-36.0, -80.0, 51.0, 95.0]  # ratio 2, scale 8


def test_grid_anchors_order_is_row_column_anchor():
    cell = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0]])
    grid = box_ops.grid_anchors(cell, 2, 3, 16)
    assert grid.shape == (12, 4)
    row, col, anchor = 1, 2, 1
    expected = cell[anchor] + torch.tensor([col * 16.0, row * 16.0, col * 16.0, row * 16.0])
    torch.testing.assert_close(grid[(row * 3 + col) * 2 + anchor], expected)


def test_decode_conventions():
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0]])
    zero = torch.zeros(1, 8)
    torch.testing.assert_close(box_ops.decode(zero, boxes, (10, 10, 5, 5)), boxes.repeat(1, 2))
    # py-faster-rcnn: inclusive widths, no "- 1" on x2: zero deltas grow x2, y2 by one pixel.
    caffe = box_ops.decode(zero[:, :4], boxes, (1, 1, 1, 1), plus_one=True)
    torch.testing.assert_close(caffe, torch.tensor([[10.0, 20.0, 51.0, 41.0]]))
    shifted = box_ops.decode(torch.tensor([[10.0, 0.0, 0.0, 0.0]]), boxes, (10, 10, 5, 5))
    torch.testing.assert_close(shifted, boxes + torch.tensor([40.0, 0.0, 40.0, 0.0]))


def test_clip_and_size_filter_conventions():
    boxes = torch.tensor([[-5.0, -5.0, 200.0, 200.0]])
    assert box_ops.clip(boxes, 100, 120).tolist() == [[0.0, 0.0, 120.0, 100.0]]
    assert box_ops.clip(boxes, 100, 120, plus_one=True).tolist() == [[0.0, 0.0, 119.0, 99.0]]
    side = torch.tensor([[0.0, 0.0, 15.0, 15.0]])
    assert not box_ops.large_enough(side, 16)  # detectron2: 15 > 16 fails
    assert box_ops.large_enough(side, 16, plus_one=True)  # Caffe: 15 + 1 >= 16


# ---------------------------------------------------------------- forward


def test_forward_shapes():
    model = _tiny_model()
    cfg = model.config
    dets = detect(model, _images()[:2])
    assert len(dets) == 2
    for det, size in zip(dets, SIZES[:2], strict=True):
        r = len(det)
        assert 0 < r <= model.conventions.rpn_post_nms_topk
        assert det.image_size == size
        assert det.proposals.shape == (r, 4) and det.objectness.shape == (r,)
        assert det.features.shape == (r, cfg.feature_dim)
        assert det.class_probs.shape == (r, cfg.num_classes + 1)
        assert det.attr_probs.shape == (r, cfg.num_attributes + 1)
        assert det.boxes.shape == (r, cfg.num_classes, 4)
        torch.testing.assert_close(det.class_probs.sum(-1), torch.ones(r))
        assert (det.proposals[:, 2] <= size[1]).all() and (det.proposals[:, 3] <= size[0]).all()
        assert (det.objectness[:-1] >= det.objectness[1:]).all()  # sorted by RPN score


def test_backbone_output_stride_is_16():
    model = _tiny_model()
    fmap = model.backbone(torch.zeros(1, 3, 96, 128))
    assert fmap.shape == (1, model.config.res4_channels, 6, 8)


def test_results_do_not_depend_on_batch_size():
    model = _tiny_model()
    images = _images()
    batched = detect(model, images)
    single = [detect(model, [image])[0] for image in images]
    for b, s in zip(batched, single, strict=True):
        assert torch.equal(b.proposals, s.proposals)
        for name in ("features", "class_probs", "attr_probs", "boxes"):
            torch.testing.assert_close(getattr(b, name), getattr(s, name), atol=1e-4, rtol=1e-4)
        sel_b = select_boxes(b, scale=0.5, policy="caffe")
        sel_s = select_boxes(s, scale=0.5, policy="caffe")
        assert torch.equal(sel_b.indices, sel_s.indices)
        assert torch.equal(sel_b.boxes, sel_s.boxes)


def test_res5_chunking_does_not_change_features():
    images = _images()[:3]
    whole = detect(_tiny_model(roi_chunk_size=10_000), images)
    chunked = detect(_tiny_model(roi_chunk_size=7), images)
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a.features, b.features, atol=1e-4, rtol=1e-4)


def test_caffe_convention_forward_uses_scale_for_min_size():
    conventions = TINY.replace(rpn_min_size=8.0)
    model = _tiny_model(conventions=conventions, convention=BoxConvention.caffe())
    image = _images()[2]
    few = detect(model, [image], scales=[4.0])[0]  # boxes must be >= 32 px
    many = detect(model, [image], scales=[0.25])[0]  # >= 2 px
    assert len(few) < len(many)
    sides = few.proposals[:, 2:] - few.proposals[:, :2] + 1
    assert (sides >= 32).all()


def test_image_without_proposals_gives_empty_outputs():
    model = _tiny_model(conventions=TINY.replace(rpn_min_size=10_000.0))
    det = detect(model, [_images()[0]])[0]
    assert len(det) == 0 and det.features.shape == (0, model.config.feature_dim)
    sel = select_boxes(det, scale=1.0, policy="adaptive")
    assert sel.num_boxes == 0 and sel.features.shape == (100, model.config.feature_dim)
    assert (sel.indices == -1).all()
    assert select_boxes(det, scale=1.0, policy="maxnms").num_boxes == 0


@pytest.mark.slow
def test_full_size_forward_on_a_small_image():
    torch.manual_seed(0)
    model = BUTDFasterRCNN(FrcnnConfig(), CAFFE.replace(rpn_post_nms_topk=8)).eval()
    det = detect(model, [torch.randn(3, 96, 128) * 60])[0]
    assert 0 < len(det) <= 8
    assert det.features.shape == (len(det), 2048)
    assert det.class_probs.shape == (len(det), 1601)
    assert det.attr_probs.shape == (len(det), 401)
    assert det.boxes.shape == (len(det), 1600, 4)
    assert torch.isfinite(det.features).all()


# ---------------------------------------------------------------- selection policies


def _det(proposals, class_probs, *, attr_probs=None, boxes=None) -> Detections:
    proposals = torch.as_tensor(proposals, dtype=torch.float32)
    class_probs = torch.as_tensor(class_probs, dtype=torch.float32)
    r, c1 = class_probs.shape
    if attr_probs is None:
        attr_probs = torch.full((r, 4), 0.25)
    if boxes is None:
        boxes = proposals[:, None, :].repeat(1, c1 - 1, 1)
    features = torch.arange(r, dtype=torch.float32)[:, None].repeat(1, 3)
    return Detections(
        proposals,
        torch.zeros(r),
        features,
        class_probs,
        torch.as_tensor(attr_probs),
        boxes,
        (200, 200),
    )


def _reference_max_conf(boxes, scores, iou, plus_one=False):
    """generate_tsv.py's loop over classes, verbatim in spirit."""
    best = torch.zeros(scores.shape[0])
    offset = torch.tensor([0.0, 0.0, 1.0, 1.0]) if plus_one else torch.zeros(4)
    for c in range(scores.shape[1]):
        keep = nms(boxes + offset, scores[:, c], iou)
        best[keep] = torch.maximum(best[keep], scores[keep, c])
    return best


def _random_case(r, c, seed, spread=3.0):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(r, 2, generator=gen) * 150
    wh = torch.rand(r, 2, generator=gen) * 60 + 4
    boxes = torch.cat([xy, xy + wh], dim=1)
    scores = (torch.randn(r, c + 1, generator=gen) * spread).softmax(-1)[:, :c]
    return boxes, scores


def test_caffe_policy_on_flat_scores_matches_reference():
    # 300 proposals with near-uniform scores (random weights): only the budget floors (the
    # 2k-th and 16k-th best of 60k pairs) can give the exact best 36.
    boxes, scores = _random_case(300, 200, seed=11, spread=0.05)
    probs = torch.cat([scores, 1 - scores.sum(1, keepdim=True)], dim=1)
    sel = select_boxes(_det(boxes, probs), scale=1.0)
    best = per_class_max_score(boxes, scores, iou=0.3)
    expected = best.sort(descending=True, stable=True).indices[:36]
    assert sel.indices.tolist() == expected.tolist()


@pytest.mark.parametrize(("r", "c", "plus_one"), [(40, 30, False), (60, 120, True)])
def test_batched_per_class_nms_equals_loop_over_classes(r, c, plus_one):
    boxes, scores = _random_case(r, c, seed=r)
    expected = _reference_max_conf(boxes, scores, 0.3, plus_one)
    got = per_class_max_score(boxes, scores, iou=0.3, plus_one=plus_one)
    torch.testing.assert_close(got, expected)
    floored = per_class_max_score(boxes, scores, iou=0.3, plus_one=plus_one, score_floor=0.05)
    exact = expected >= 0.05
    torch.testing.assert_close(floored[exact], expected[exact])
    assert (floored[~exact] == 0).all()


@pytest.mark.parametrize(("conf", "spread"), [(0.2, 3.0), (0.05, 3.0), (0.5, 3.0), (0.2, 0.01)])
def test_caffe_policy_equals_reference_rule(conf, spread):
    # spread 0.01: nearly uniform class scores (random weights), the floors' hardest case.
    boxes, scores = _random_case(80, 50, seed=7, spread=spread)
    probs = torch.cat([scores, 1 - scores.sum(1, keepdim=True)], dim=1)
    det = _det(boxes, probs)
    best = _reference_max_conf(boxes, scores, 0.3)
    above = (best >= conf).nonzero().flatten()
    order = best.sort(descending=True, stable=True).indices
    if len(above) < 10:
        expected = order[:10]
    elif len(above) > 20:
        expected = order[:20]
    else:
        expected = above
    sel = select_boxes(det, scale=1.0, conf_threshold=conf, min_boxes=10, max_boxes=20)
    assert sel.indices[: sel.num_boxes].tolist() == expected.tolist()


def test_caffe_policy_suppressed_proposal_and_fields():
    # A and B overlap (IoU ~0.68); C is apart. B's best class (0) loses to A's in class 0,
    # and its class-1 score is also below A's there, so B keeps nothing above the threshold.
    proposals = [[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]]
    probs = [[0.60, 0.15, 0.00, 0.25], [0.50, 0.10, 0.00, 0.40], [0.00, 0.00, 0.25, 0.75]]
    attrs = [[0.1, 0.6, 0.0, 0.3], [0.2, 0.2, 0.2, 0.4], [0.05, 0.05, 0.3, 0.6]]
    det = _det(proposals, probs, attr_probs=attrs)
    sel = select_boxes(det, scale=2.0, conf_threshold=0.2, min_boxes=1, max_boxes=4)
    assert sel.num_boxes == 2 and sel.indices.tolist() == [0, 2, -1, -1]
    assert sel.obj_ids[:2].tolist() == [0, 2] and sel.obj_ids.dtype == torch.int64
    torch.testing.assert_close(sel.obj_conf[:2], torch.tensor([0.60, 0.25]))
    assert sel.attr_ids[:2].tolist() == [1, 2]  # "no attribute" (last column) never chosen
    torch.testing.assert_close(sel.attr_conf[:2], torch.tensor([0.6, 0.3]))
    torch.testing.assert_close(sel.boxes[1], torch.tensor([25.0, 25.0, 30.0, 30.0]))  # / scale
    assert sel.features[1].tolist() == [2.0, 2.0, 2.0]
    assert (sel.boxes[2:] == 0).all() and (sel.features[2:] == 0).all()
    # B comes back when two boxes are required: sorted by best surviving score.
    sel = select_boxes(det, scale=1.0, conf_threshold=0.2, min_boxes=3, max_boxes=3)
    assert sel.indices.tolist() == [0, 2, 1]


def test_caffe_policy_min_max_clamping():
    proposals = [[i * 30, 0, i * 30 + 20, 20] for i in range(5)]  # disjoint
    best = [0.9, 0.1, 0.5, 0.3, 0.05]
    probs = [[s, 1 - s] for s in best]
    det = _det(proposals, probs)

    def kept(lo, hi):
        sel = select_boxes(det, scale=1.0, min_boxes=lo, max_boxes=hi)
        return sel.indices[: sel.num_boxes].tolist()

    assert kept(1, 5) == [0, 2, 3]  # within bounds: proposal order
    assert kept(2, 2) == [0, 2]  # too many: best first
    assert kept(4, 5) == [0, 2, 3, 1]  # too few: best first
    assert kept(36, 36) == [0, 2, 3, 1, 4]  # fewer proposals than boxes


def test_adaptive_policy_pads_to_100():
    proposals = [[i * 30, 0, i * 30 + 20, 20] for i in range(150)]
    few = _det(proposals[:12], [[0.9, 0.1]] * 3 + [[0.1, 0.9]] * 9)
    sel = select_boxes(few, scale=1.0, policy="adaptive")
    assert sel.policy == "adaptive" and sel.num_boxes == 10
    assert sel.features.shape == (100, 3) and sel.boxes.shape == (100, 4)
    assert (sel.indices[10:] == -1).all() and (sel.obj_conf[10:] == 0).all()
    many = _det(proposals, [[0.9, 0.1]] * 150)
    assert select_boxes(many, scale=1.0, policy="adaptive").num_boxes == 100


def test_maxnms_policy_uses_best_class_box_and_raises_threshold():
    proposals = [[0, 0, 100, 100]] * 3
    probs = [[0.7, 0.1, 0.2], [0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]
    garbage = torch.tensor([500.0, 500.0, 600.0, 600.0])
    boxes = garbage.repeat(3, 2, 1)
    boxes[0, 0] = torch.tensor([0.0, 0.0, 10.0, 10.0])
    boxes[1, 1] = torch.tensor([0.0, 0.0, 10.0, 4.5])  # IoU 0.45 with box 0
    boxes[2, 0] = torch.tensor([50.0, 50.0, 60.0, 60.0])
    det = _det(proposals, probs, boxes=boxes)
    two = select_boxes(det, scale=2.0, policy="maxnms", num_boxes=2)
    assert two.indices.tolist() == [0, 2]  # settled at 0.3
    torch.testing.assert_close(two.boxes[1], torch.tensor([25.0, 25.0, 30.0, 30.0]))
    three = select_boxes(det, scale=1.0, policy="maxnms", num_boxes=3)
    assert three.indices.tolist() == [0, 1, 2]  # needed 0.5
    assert three.obj_ids.tolist() == [0, 1, 0]
    four = select_boxes(det, scale=1.0, policy="maxnms", num_boxes=4)
    assert four.num_boxes == 3 and four.indices[3] == -1


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="unknown box policy"):
        select_boxes(_det([[0, 0, 1, 1]], [[0.5, 0.5]]), scale=1.0, policy="nope")


# ---------------------------------------------------------------- preprocessing


def test_resize_scale_rule():
    assert resize_plan(480, 640).scale == 1.25
    assert resize_plan(300, 1000).scale == 1.0  # 2.0 would make the long side 2000
    assert resize_plan(600, 800).scale == 1.0


def test_preprocess_bgr_mean_and_size():
    image = Image.new("RGB", (64, 48), (255, 0, 10))
    tensor, plan = preprocess(image, CAFFE.replace(min_size=96, max_size=200))
    assert plan.scale == 2.0 and tensor.shape == (3, 96, 128) and tensor.dtype == torch.float32
    torch.testing.assert_close(
        tensor[:, 40, 60], torch.tensor([10 - 102.9801, 0 - 115.9465, 255 - 122.7717])
    )
    assert pickle.loads(pickle.dumps(preprocess)) is preprocess


def test_preprocess_resize_is_bilinear_on_pixel_centres():
    # A 2-pixel ramp upsampled x2: half-pixel centres give 0, 0.25, 0.75, 1 of the step.
    ramp = np.zeros((2, 2, 3), dtype=np.uint8)
    ramp[:, 1] = 200
    tensor, _ = preprocess(Image.fromarray(ramp), CAFFE.replace(min_size=4, max_size=10))
    row = tensor[0, 0] + 102.9801
    torch.testing.assert_close(row, torch.tensor([0.0, 50.0, 150.0, 200.0]), atol=1e-3, rtol=0)
