"""Extraction end to end through the CLI: tiny random models, real and broken images, resume,
weights checks, and the real MiniLM text model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import TINY_BERT, TINY_VIT, TINY_VIT_ARGS, vlpipe, write_image
from vlpipe.cache import FeatureCache
from vlpipe.extract.base import Batch
from vlpipe.pipelines.cli import EXIT_PARTIAL


def vit_args(root, out, *extra):
    return (
        "extract",
        "--dataset",
        "folder",
        "--root",
        root,
        "--out",
        out,
        *TINY_VIT_ARGS,
        "--batch-size",
        4,
        *extra,
    )


def test_vit_folder_extraction(image_folder, tmp_path):
    vlpipe(*vit_args(image_folder, tmp_path / "v.h5"))
    cache = FeatureCache(tmp_path / "v.h5")
    assert cache.kind == "patches" and len(cache) == 6
    assert cache.fields["image_feats"][0] == (4, 32)  # 32px / 16 = 2x2 patches
    item = cache["a/img1"]
    assert item["image_hw"].tolist() == [30, 41]
    prov = cache.provenance
    assert prov["weights"] == "random-init" and prov["backbone"] == "vit"
    assert prov["preprocessing"]["size"] == [32, 32] and prov["dtype"] == "float16"
    assert prov["versions"]["timm"] != "absent" and prov["dataset"] == "folder"


def test_features_match_the_bare_model(image_folder, tmp_path):
    """What lands in the cache is the model's output for that very image (seeded random init
    makes the run's model reproducible here)."""
    from vlpipe.extract.images import load_image
    from vlpipe.pipelines.extract_job import build_from_job, resolve_extract

    vlpipe(*vit_args(image_folder, tmp_path / "v.h5", "--dtype", "float32", "--seed", 7))
    cache = FeatureCache(tmp_path / "v.h5")
    assert cache.provenance["seed"] == 7
    job = resolve_extract(
        {
            "backbone": "vit",
            "dataset": "folder",
            "out": str(tmp_path / "x.h5"),
            "weights": "random",
            "arch": "vit_tiny_patch16_224",
            "model": json.loads(TINY_VIT),
            "image_size": 32,
            "run": {"seed": 7},
        }
    )
    ext = build_from_job(job)
    for key in ("b/img2", "a/img5"):
        image = load_image(image_folder / f"{key}.png")
        batch = Batch([ext.transform(image)], [(image.height, image.width)])
        with torch.inference_mode():
            out = ext.encode(batch)
        np.testing.assert_allclose(cache[key]["image_cls"], out["image_cls"][0], atol=1e-5)
        np.testing.assert_allclose(cache[key]["image_feats"], out["image_feats"][0], atol=1e-5)
        assert cache[key]["image_hw"].tolist() == out["image_hw"][0].tolist()


def test_bad_images_are_recorded_and_exit_status_is_partial(image_folder, tmp_path):
    (image_folder / "zero.jpg").write_bytes(b"")
    (image_folder / "text.jpg").write_text("hello")
    good = write_image(image_folder / "trunc_src.jpg", size=(64, 64))
    (image_folder / "trunc.jpg").write_bytes(good.read_bytes()[:200])
    write_image(image_folder / "gray.jpg", mode="L")
    write_image(image_folder / "cmyk.jpg", mode="CMYK")
    result = vlpipe(*vit_args(image_folder, tmp_path / "v.h5"), code=EXIT_PARTIAL)
    assert "partial run: 3 items" in result.output
    cache = FeatureCache(tmp_path / "v.h5")
    failed = {key: reason for key, _, reason in cache.failures}
    assert set(failed) == {"zero", "text", "trunc"}
    assert "empty" in failed["zero"] and "not an image" in failed["text"]
    assert {"gray", "cmyk", "trunc_src", "a/img1"} <= set(cache.keys())
    # failed items are done: resuming does not retry them or duplicate anything
    vlpipe(*vit_args(image_folder, tmp_path / "v.h5", "--resume"))
    assert len(FeatureCache(tmp_path / "v.h5")) == len(cache)


def test_resume_continues_without_duplicates_or_gaps(image_folder, tmp_path):
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    vlpipe(*vit_args(image_folder, full))
    # an "interrupted" run: only the first 3 items landed (shards of 2 and 1)
    vlpipe(*vit_args(image_folder, part, "--limit", 3, "--shard-items", 2))
    vlpipe(*vit_args(image_folder, part, "--resume", "--shard-items", 2))
    a, b = FeatureCache(full), FeatureCache(part)
    assert sorted(a.keys()) == sorted(b.keys()) and b.num_rows == 6
    assert len(b.shard_files) == 4
    keys = a.keys()
    np.testing.assert_array_equal(a.read(keys)["image_feats"], b.read(keys)["image_feats"])


def test_resume_refuses_another_precision(image_folder, tmp_path):
    vlpipe(*vit_args(image_folder, tmp_path / "v.h5", "--limit", 2))
    out = vlpipe(
        *vit_args(image_folder, tmp_path / "v.h5", "--resume", "--precision", "bf16"), code=1
    )
    assert "cannot resume" in out.output and "precision: 'fp32' -> 'bf16'" in out.output
    assert len(FeatureCache(tmp_path / "v.h5")) == 2


def test_a_file_name_that_is_not_utf8_is_one_failed_item(image_folder, tmp_path):
    import os

    name = os.path.join(os.fsencode(image_folder), b"caf\xe9.png")  # latin-1 "café"
    with open(name, "wb") as fh:
        fh.write((image_folder / "a" / "img1.png").read_bytes())
    out = vlpipe(*vit_args(image_folder, tmp_path / "v.h5"), code=EXIT_PARTIAL).output
    cache = FeatureCache(tmp_path / "v.h5")
    assert len(cache) == 6 and cache.failures[0][0] == "caf\\xe9"
    assert "not valid UTF-8" in cache.failures[0][2] and "caf\\xe9" in out
    vlpipe(*vit_args(image_folder, tmp_path / "v.h5", "--resume"))  # done: not retried
    assert len(FeatureCache(tmp_path / "v.h5").failures) == 1


def test_existing_cache_needs_overwrite(image_folder, tmp_path):
    vlpipe(*vit_args(image_folder, tmp_path / "v.h5"))
    result = vlpipe(*vit_args(image_folder, tmp_path / "v.h5"), code=1)
    assert "already exists" in result.output
    vlpipe(*vit_args(image_folder, tmp_path / "v.h5", "--overwrite", "--limit", 2))
    assert len(FeatureCache(tmp_path / "v.h5")) == 2


def test_weights_are_required_or_explicitly_random(image_folder, tmp_path):
    args = [a for a in vit_args(image_folder, tmp_path / "v.h5") if a != "random"]
    args.remove("--weights")
    result = vlpipe(*args, code=1)
    assert "--weights random" in result.output and not (tmp_path / "v.h5").exists()


def test_missing_and_mismatched_weights_fail_before_work(image_folder, tmp_path):
    from safetensors.torch import save_file

    result = vlpipe(
        *vit_args(image_folder, tmp_path / "v.h5", "--weights", tmp_path / "no.pth"), code=1
    )
    assert "no.pth" in result.output and "does not exist" in result.output
    bad = {"cls_token": torch.zeros(1, 1, 32), "blocks.0.attn.qkv.weight": torch.zeros(5, 5)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    result = vlpipe(
        *vit_args(image_folder, tmp_path / "v.h5", "--weights", tmp_path / "bad.safetensors"),
        code=1,
    )
    assert "bad.safetensors" in result.output and "missing" in result.output
    assert "blocks.0.attn.qkv.weight: file (5, 5)" in result.output
    assert not (tmp_path / "v.h5").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_checkpoint_loads_and_is_hashed(image_folder, tmp_path, fmt):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, num_classes=0, **json.loads(TINY_VIT)
    )
    file = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, file)
    else:
        save_file(model.state_dict(), str(file))
    vlpipe(*vit_args(image_folder, tmp_path / "v.h5", "--weights", file, "--dtype", "float32"))
    cache = FeatureCache(tmp_path / "v.h5")
    assert cache.provenance["weights"] == file.name
    assert len(cache.provenance["weights_sha256"]) == 64
    from vlpipe.extract.images import load_image

    img = load_image(image_folder / "a/img3.png").resize((32, 32), 3)  # 3 = bicubic
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    with torch.inference_mode():
        expect = model.forward_features((x - 127.5) / 127.5)[0, 0].numpy()
    np.testing.assert_allclose(cache["a/img3"]["image_cls"], expect, atol=1e-4)


def test_resnet_grid_and_pooled(image_folder, tmp_path):
    vlpipe(
        "extract",
        "--backbone",
        "resnet",
        "--dataset",
        "folder",
        "--root",
        image_folder,
        "--out",
        tmp_path / "r.h5",
        "--weights",
        "random",
        "--arch",
        "resnet18",
        "--image-size",
        64,
        "--num-workers",
        0,
        "--no-progress",
        "--dtype",
        "float32",
    )
    cache = FeatureCache(tmp_path / "r.h5")
    item = cache["b/img0"]
    assert cache.kind == "grid" and item["image_feats"].shape == (4, 512)
    np.testing.assert_allclose(item["image_feats"].mean(0), item["image_cls"], rtol=1e-4, atol=1e-5)


def test_resnet_earlier_stage_max_pooled(image_folder, tmp_path):
    args = ["extract", "--backbone", "resnet", "--dataset", "folder", "--root", image_folder]
    args += ["--weights", "random", "--arch", "resnet18", "--image-size", 64, "--num-workers", 0]
    args += ["--no-progress", "--dtype", "float32"]
    vlpipe(*args, "--out", tmp_path / "r.h5", "--layer", "layer2", "--pool", "max")
    cache = FeatureCache(tmp_path / "r.h5")
    item = cache["b/img0"]
    assert item["image_feats"].shape == (64, 128)  # stride 8 at 64 px, 128 channels
    np.testing.assert_array_equal(item["image_feats"].max(0), item["image_cls"])
    pre = cache.provenance["preprocessing"]
    assert (pre["layer"], pre["pool"], pre["grid"]) == ("layer2", "max", [8, 8])

    import timm

    from vlpipe.extract.images import load_image

    torch.manual_seed(0)  # the extractor's random init under its default --seed 0
    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    assert pre["interpolation"] == "bicubic"  # timm resnet18 default config
    img = load_image(image_folder / "b/img0.png").resize((64, 64), 3)  # 3 = bicubic
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.inference_mode():
        expect = model.layer2(
            model.layer1(
                model.maxpool(
                    model.act1(
                        model.bn1(model.conv1((x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)))
                    )
                )
            )
        )
    np.testing.assert_allclose(item["image_feats"], expect[0].flatten(1).T.numpy(), atol=1e-4)

    err = vlpipe(*args, "--out", tmp_path / "x.h5", "--layer", "layer9", code=1).output
    assert "--layer 'layer9': resnet18 has stages act1, layer1, layer2, layer3, layer4" in err
    vit = ["extract", "--backbone", "vit", "--dataset", "folder", "--root", image_folder]
    vit += ["--weights", "random"]
    err = vlpipe(*vit, "--out", tmp_path / "y.h5", "--pool", "max", code=1).output
    assert "--pool: only for --backbone resnet | cnn, not 'vit'" in err


def test_bert_easy_vqa_with_real_minilm(minilm_dir, tmp_path):
    vlpipe(
        "extract",
        "--backbone",
        "bert",
        "--dataset",
        "easy-vqa",
        "--split",
        "test",
        "--limit",
        300,
        "--weights",
        minilm_dir,
        "--out",
        tmp_path / "q.h5",
        "--no-progress",
        "--max-length",
        16,
    )
    cache = FeatureCache(tmp_path / "q.h5")
    assert cache.kind == "tokens" and len(cache) == 300 and cache.num_rows < 300  # deduplicated
    item = cache["test/q5"]
    assert item["text_feats"].shape == (16, 384) and item["text_ids"][0] == 101  # [CLS]
    assert item["text_mask"].sum() == (item["text_ids"] != 0).sum()
    assert cache.provenance["weights"] == "model.safetensors"
    assert cache.provenance["preprocessing"]["vocab_size"] == 30522
    # identical questions share one row and therefore identical features
    from vlpipe.data_manifests.registry import read_texts

    recs = read_texts("easy-vqa", [], "test", 300)
    a, b = next((x, y) for x in recs for y in recs if x.key != y.key and x.text == y.text)
    np.testing.assert_array_equal(cache[a.key]["text_cls"], cache[b.key]["text_cls"])
    assert cache[a.key]["text"] == a.text


def test_tiny_random_bert_uses_packaged_vocab(tmp_path, minilm_dir):
    vlpipe(
        "extract",
        "--backbone",
        "bert",
        "--dataset",
        "easy-vqa",
        "--split",
        "train",
        "--limit",
        20,
        "--weights",
        "random",
        "--model-kwargs",
        TINY_BERT,
        "--out",
        tmp_path / "q.h5",
        "--no-progress",
        "--cls-only",
    )
    cache = FeatureCache(tmp_path / "q.h5")
    assert "text_feats" not in cache.fields and cache.fields["text_cls"][0] == (32,)


def test_inspect_json_and_text(image_folder, tmp_path):
    vlpipe(*vit_args(image_folder, tmp_path / "v.h5"))
    out = json.loads(vlpipe("inspect", tmp_path / "v.h5", "--json").output)
    assert out["items"] == 6 and out["fields"]["image_cls"]["shape"] == [32]
    assert out["provenance"]["backbone"] == "vit" and len(out["sample_keys"]) == 5
    text = vlpipe("inspect", tmp_path / "v.h5").output
    assert "RANDOM-INIT" in text and "image_feats" in text
    assert "no such cache" in vlpipe("inspect", tmp_path / "none.h5", code=1).output


def test_dataloader_workers_decode_images(image_folder, tmp_path):
    vlpipe(*vit_args(image_folder, tmp_path / "w.h5", "--num-workers", 2))
    assert len(FeatureCache(tmp_path / "w.h5")) == 6
