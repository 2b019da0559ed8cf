"""Checkpoint converters on synthetic files with the real key names and shapes.

Full-size checks use meta tensors (names and shapes, no memory); value round trips use the
tiny config, whose keys are the full model's keys for the blocks it has.
"""

from __future__ import annotations

import hashlib
import pickle

import pytest
import torch

from vlpipe.extract.frcnn import (
    BoxConvention,
    BUTDFasterRCNN,
    FrcnnConfig,
    build_from_checkpoint,
    config_from_state_dict,
    convert_caffe_state_dict,
    detect,
    load_checkpoint,
    load_frcnn_state,
)
from vlpipe.extract.frcnn.conventions import CAFFE, TINY_SETTINGS
from vlpipe.provenance import weights_record
from vlpipe.weights import WeightsMismatchError

ANCHORS = "proposal_generator.anchor_generator.cell_anchors.0"
RPN = "proposal_generator.rpn_head."
PRED = "roi_heads.box_predictor."
TINY_TEST_SETTINGS = dict(anchor_sizes=(16.0, 32.0))
TINY_CONVENTIONS = CAFFE.replace(**TINY_SETTINGS)


def hf_layout() -> dict[str, tuple[int, ...]]:
    """The 640 (key, shape) entries of unc-nlp/frcnn-vg-finetuned, written out from the spec."""
    out: dict[str, tuple[int, ...]] = {}

    def conv(prefix: str, cout: int, cin: int, k: int) -> None:
        out[f"{prefix}.weight"] = (cout, cin, k, k)
        for name in ("weight", "bias", "running_mean", "running_var"):
            out[f"{prefix}.norm.{name}"] = (cout,)
        out[f"{prefix}.norm.num_batches_tracked"] = ()

    conv("backbone.stem.conv1", 64, 3, 7)
    cin, mid, cout = 64, 64, 256
    stages = [("backbone.res2", 3), ("backbone.res3", 4), ("backbone.res4", 23)]
    for stage, blocks in [*stages, ("roi_heads.res5", 3)]:
        for i in range(blocks):
            if i == 0:
                conv(f"{stage}.0.shortcut", cout, cin, 1)
            conv(f"{stage}.{i}.conv1", mid, cin if i == 0 else cout, 1)
            conv(f"{stage}.{i}.conv2", mid, mid, 3)
            conv(f"{stage}.{i}.conv3", cout, mid, 1)
        cin, mid, cout = cout, mid * 2, cout * 2
    heads = {
        RPN + "conv": (512, 1024, 3, 3),
        RPN + "objectness_logits": (12, 512, 1, 1),
        RPN + "anchor_deltas": (48, 512, 1, 1),
        PRED + "cls_score": (1601, 2048),
        PRED + "bbox_pred": (6400, 2048),
        PRED + "fc_attr": (512, 2304),
        PRED + "attr_score": (401, 512),
    }
    for name, shape in heads.items():
        out[f"{name}.weight"], out[f"{name}.bias"] = shape, shape[:1]
    out[PRED + "cls_embedding.weight"] = (1601, 256)
    out[ANCHORS] = (12, 4)
    return out


def milvlg_layout() -> dict[str, tuple[int, ...]]:
    """MILVLG bua-caffe-frcn-r101: Caffe head shapes, its own attribute names, BatchNorm
    counters only where the norms were trainable (res4, res5)."""
    out = {}
    renames = {
        "cls_embedding": "cls_embed",
        "fc_attr": "attr_linear1",
        "attr_score": "attr_linear2",
    }
    for key, shape in hf_layout().items():
        if key == ANCHORS:
            continue
        if key.endswith("num_batches_tracked") and not key.startswith(
            ("backbone.res4", "roi_heads.res5")
        ):
            continue
        for ours, theirs in renames.items():
            key = key.replace(f"box_predictor.{ours}.", f"box_predictor.{theirs}.")
        if key.startswith(RPN + "objectness_logits"):
            shape = (24, *shape[1:])
        if key.startswith(PRED + "bbox_pred"):
            shape = (6404, *shape[1:])
        out[key] = shape
    return out


def _meta(layout: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in layout.items()}


def _full_meta_model(convention: BoxConvention | None = None) -> BUTDFasterRCNN:
    with torch.device("meta"):
        return BUTDFasterRCNN(FrcnnConfig(convention=convention or BoxConvention.detectron2()))


def _tiny(seed: int, convention: BoxConvention | None = None) -> BUTDFasterRCNN:
    torch.manual_seed(seed)
    config = FrcnnConfig.tiny(convention=convention or BoxConvention.detectron2())
    return BUTDFasterRCNN(config, TINY_CONVENTIONS).eval()


def _with_counters(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = dict(state_dict)
    for key in state_dict:
        if key.endswith(".norm.running_var"):
            out[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    return out


# ---------------------------------------------------------------- full-size names and shapes


def test_model_keys_and_shapes_equal_hf_layout():
    layout = hf_layout()
    assert len(layout) == 640
    expected = {k: v for k, v in layout.items() if not k.endswith("num_batches_tracked")}
    got = {k: tuple(v.shape) for k, v in _full_meta_model().state_dict().items()}
    assert got == expected


def test_full_size_hf_state_dict_loads():
    model = _full_meta_model()
    state_dict, convention = _meta(hf_layout()), BoxConvention.detectron2()
    from vlpipe.extract.frcnn.convert import convert_detectron2_state_dict

    load_frcnn_state(model, convert_detectron2_state_dict(state_dict), source="hf")
    assert convention.box_weights == (10.0, 10.0, 5.0, 5.0)


def test_full_size_milvlg_state_dict_converts_to_model_shapes():
    converted = convert_caffe_state_dict(_meta(milvlg_layout()))
    model = _full_meta_model(BoxConvention.caffe())
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != ANCHORS}
    assert {k: tuple(v.shape) for k, v in converted.items()} == expected
    load_frcnn_state(model, converted, source="bua-caffe-frcn-r101-k36.pth")
    config = config_from_state_dict(converted, BoxConvention.caffe())
    assert config == FrcnnConfig(convention=BoxConvention.caffe())


# ---------------------------------------------------------------- round trips on tiny weights


def test_hf_folder_round_trip(tmp_path):
    source = _tiny(0)
    torch.save(_with_counters(source.state_dict()), tmp_path / "pytorch_model.bin")
    (tmp_path / "config.yaml").write_text("MODEL:\n  DEVICE: cpu\n")
    state_dict, convention = load_checkpoint(tmp_path)
    assert convention == BoxConvention.detectron2()
    target = _tiny(1)
    load_frcnn_state(target, state_dict, source=str(tmp_path))
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key
    image = torch.randn(3, 64, 96) * 60
    a, b = detect(source, [image])[0], detect(target, [image])[0]
    assert torch.equal(a.features, b.features) and torch.equal(a.proposals, b.proposals)


def test_detectron2_pickle_needs_permission_and_round_trips(tmp_path):
    source = _tiny(0)
    arrays = {k: v.numpy() for k, v in source.state_dict().items() if k != ANCHORS}
    path = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    with open(path, "wb") as handle:
        pickle.dump({"model": arrays, "__author__": "test"}, handle)
    with pytest.raises(PermissionError, match="allow_pickle"):
        load_checkpoint(path)
    state_dict, convention = load_checkpoint(path, allow_pickle=True)
    assert convention == BoxConvention.detectron2() and ANCHORS not in state_dict
    target = _tiny(1)
    load_frcnn_state(
        target, state_dict, source=str(path)
    )  # anchors: the model's own (same convention)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def _to_milvlg(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our layout -> MILVLG's, written independently of convert.py."""
    gen = torch.Generator().manual_seed(3)
    out = {}
    for key, value in state_dict.items():
        if key == ANCHORS:
            continue
        if key.startswith(RPN + "objectness_logits"):
            background = torch.randn(value.shape, generator=gen)
            value = torch.cat([background, background + value])  # softmax pairs [bg | fg]
        elif key.startswith((PRED + "cls_score", PRED + "cls_embedding", PRED + "attr_score")):
            value = torch.cat([value[-1:], value[:-1]])  # background / no-attribute first
        elif key.startswith(PRED + "bbox_pred"):
            value = torch.cat([torch.randn((4, *value.shape[1:]), generator=gen), value])
        key = key.replace("cls_embedding.", "cls_embed.").replace("fc_attr.", "attr_linear1.")
        out[key.replace("attr_score.", "attr_linear2.")] = value
    return out


def test_milvlg_pth_round_trip(tmp_path):
    source = _tiny(0)
    path = tmp_path / "bua-caffe-frcn-r101-k36.pth"
    torch.save({"model": _with_counters(_to_milvlg(source.state_dict())), "iteration": 1}, path)
    state_dict, convention = load_checkpoint(path)
    assert convention == BoxConvention.caffe()
    target = _tiny(1, BoxConvention.caffe())
    load_frcnn_state(target, state_dict, source=str(path))
    for key, value in source.state_dict().items():
        if key != ANCHORS:
            torch.testing.assert_close(target.state_dict()[key], value, msg=key)
    caffe_anchors = target.state_dict()[ANCHORS]
    assert caffe_anchors[0].tolist() == [-3.5, 2.0, 18.5, 13.0]  # 23 x 12 around 7.5


def test_milvlg_heads_mean_the_same_after_conversion():
    """MILVLG's head (background / no-attribute first) run on its own weights gives our
    head's outputs, permuted: checks the embedding rows follow the class rows."""
    ours = _tiny(0).roi_heads.box_predictor
    theirs = {
        k[len(PRED) :]: v
        for k, v in _to_milvlg({PRED + k: v for k, v in ours.state_dict().items()}).items()
    }
    x = torch.randn(20, ours.cls_score.in_features) * 5
    scores = x @ theirs["cls_score.weight"].T + theirs["cls_score.bias"]
    embedded = theirs["cls_embed.weight"][scores.argmax(-1)]
    hidden = (
        torch.cat([x, embedded], -1) @ theirs["attr_linear1.weight"].T + theirs["attr_linear1.bias"]
    )
    attrs = hidden.relu() @ theirs["attr_linear2.weight"].T + theirs["attr_linear2.bias"]
    with torch.no_grad():
        cls, _, attr = ours(x)
    torch.testing.assert_close(cls, torch.cat([scores[:, 1:], scores[:, :1]], 1))
    torch.testing.assert_close(attr, torch.cat([attrs[:, 1:], attrs[:, :1]], 1))


def test_objectness_pairs_become_sigmoid_logits():
    gen = torch.Generator().manual_seed(0)
    pairs_w, pairs_b = torch.randn(24, 8, 1, 1, generator=gen), torch.randn(24, generator=gen)
    converted = convert_caffe_state_dict(
        {RPN + "objectness_logits.weight": pairs_w, RPN + "objectness_logits.bias": pairs_b}
    )
    x = torch.randn(8, generator=gen)
    pairs = (pairs_w[:, :, 0, 0] @ x + pairs_b).reshape(2, 12)  # MILVLG: view as (2, A)
    logits = converted[RPN + "objectness_logits.weight"][:, :, 0, 0] @ x
    logits = logits + converted[RPN + "objectness_logits.bias"]
    torch.testing.assert_close(logits.sigmoid(), pairs.softmax(0)[1])


def test_build_from_checkpoint(tmp_path):
    source = _tiny(0)
    torch.save(source.state_dict(), tmp_path / "weights.pt")
    model = build_from_checkpoint(
        tmp_path / "weights.pt", conventions=TINY_CONVENTIONS, **TINY_TEST_SETTINGS
    )
    assert not model.training
    assert model.config.stage_blocks == (1, 1, 1) and model.config.num_classes == 7
    image = torch.randn(3, 64, 96) * 60
    torch.testing.assert_close(
        detect(model, [image])[0].features, detect(source, [image])[0].features
    )


# ---------------------------------------------------------------- errors and helpers


def test_mismatched_checkpoint_names_file_and_keys(tmp_path):
    state_dict = _tiny(0).state_dict()
    del state_dict["backbone.res3.0.conv2.weight"]
    state_dict["roi_heads.box_predictor.extra.weight"] = torch.zeros(3)
    state_dict[PRED + "cls_score.bias"] = torch.zeros(99)
    path = tmp_path / "broken.pth"
    torch.save(state_dict, path)
    loaded, _ = load_checkpoint(path)
    with pytest.raises(WeightsMismatchError) as info:
        load_frcnn_state(_tiny(1), loaded, source=str(path))
    message = str(info.value)
    assert str(path) in message
    assert "1 missing: backbone.res3.0.conv2.weight" in message
    assert "1 unexpected: roi_heads.box_predictor.extra.weight" in message
    assert "cls_score.bias: file (99,) vs model (8,)" in message


def test_sha256_of_file_and_folder(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"abc" * 1000)
    expected = hashlib.sha256(b"abc" * 1000).hexdigest()
    assert weights_record(tmp_path / "pytorch_model.bin")["weights_sha256"] == expected
    assert weights_record(tmp_path)["weights_sha256"] == expected


def test_config_from_tiny_state_dict():
    config = config_from_state_dict(
        _tiny(0).state_dict(), BoxConvention.detectron2(), **TINY_TEST_SETTINGS
    )
    tiny = FrcnnConfig.tiny()
    for name in (
        "stage_blocks",
        "res5_blocks",
        "stem_channels",
        "res2_channels",
        "rpn_channels",
        "bottleneck_channels",
        "num_classes",
        "num_attributes",
        "class_embed_dim",
        "attr_hidden_dim",
        "anchor_sizes",
    ):
        assert getattr(config, name) == getattr(tiny, name), name
