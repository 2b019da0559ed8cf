"""Real-world image files: odd ones decode to RGB, broken ones raise BadImage with a reason."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import write_image
from vlpipe.extract.images import ALPHA_BACKGROUND, MAX_PIXELS, BadImage, load_image


def test_rgb_png_round_trips(tmp_path):
    path = write_image(tmp_path / "x.png", size=(7, 5))
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (7, 5)
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(path).convert("RGB")))


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpeg_become_rgb(tmp_path, mode):
    img = load_image(write_image(tmp_path / "x.jpg", mode=mode))
    assert img.mode == "RGB" and img.size == (40, 30)


def test_sixteen_bit_png_is_rescaled_not_clipped(tmp_path):
    arr = np.full((4, 6), 65535, dtype=np.uint16)
    arr[:, :3] = 32768
    Image.fromarray(arr).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "deep.png"))
    assert out[0, 5].tolist() == [255, 255, 255]
    assert out[0, 0].tolist() == [128, 128, 128]  # 32768 / 65535 * 255 = 127.5 -> 128


def test_alpha_is_composited_on_grey(tmp_path):
    arr = np.zeros((2, 2, 4), dtype=np.uint8)
    arr[0, 0] = [255, 0, 0, 255]  # opaque red stays red; transparent pixels show the background
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    out = np.asarray(load_image(tmp_path / "a.png"))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[1, 1].tolist() == list(ALPHA_BACKGROUND)


def test_exif_rotation_is_applied(tmp_path):
    img = Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8))  # 20 wide, 10 high
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW when displayed
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").size == (10, 20)


def test_one_pixel_image_is_fine(tmp_path):
    assert load_image(write_image(tmp_path / "p.png", size=(1, 1))).size == (1, 1)


def test_truncated_jpeg(tmp_path):
    good = write_image(tmp_path / "good.jpg", size=(64, 64))
    (tmp_path / "cut.jpg").write_bytes(good.read_bytes()[:300])
    with pytest.raises(BadImage, match="truncated"):
        load_image(tmp_path / "cut.jpg")


@pytest.mark.parametrize(
    ("content", "reason"), [(b"", "empty"), (b"this is not an image\n", "not an image")]
)
def test_empty_and_text_files(tmp_path, content, reason):
    (tmp_path / "x.jpg").write_bytes(content)
    with pytest.raises(BadImage, match=reason) as info:
        load_image(tmp_path / "x.jpg")
    assert info.value.path.endswith("x.jpg")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    side = int(MAX_PIXELS**0.5) + 100
    buf = io.BytesIO()
    Image.new("1", (side, side)).save(buf, format="PNG")  # tiny file, huge canvas
    (tmp_path / "bomb.png").write_bytes(buf.getvalue())
    with pytest.raises(BadImage, match="decompression bomb"):
        load_image(tmp_path / "bomb.png")


def test_missing_file(tmp_path):
    with pytest.raises(BadImage, match="cannot read"):
        load_image(tmp_path / "nope.jpg")
