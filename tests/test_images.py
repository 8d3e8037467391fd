"""Image files: which files count as images, and decoding every mode into 8-bit RGB."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.errors import UserError
from finetune.images import BadImageError, is_image_file, load_rgb


def _rgb(path: Path) -> np.ndarray:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def test_greyscale_becomes_three_equal_channels(tmp_path):
    grey = np.arange(0, 240, 10, dtype=np.uint8).reshape(4, 6)
    Image.fromarray(grey, mode="L").save(tmp_path / "grey.png")
    pixels = _rgb(tmp_path / "grey.png")
    assert pixels.shape == (4, 6, 3)
    for channel in range(3):
        assert np.array_equal(pixels[..., channel], grey)


def test_rgba_drops_alpha_and_keeps_the_colour(tmp_path):
    rgba = np.zeros((3, 3, 4), dtype=np.uint8)
    rgba[...] = (200, 100, 50, 0)  # fully transparent: the colour stays, not composited on black
    rgba[0, 0] = (10, 20, 30, 255)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    pixels = _rgb(tmp_path / "alpha.png")
    assert pixels[0, 0].tolist() == [10, 20, 30]
    assert pixels[2, 2].tolist() == [200, 100, 50]


def test_palette_with_transparency_keeps_the_palette_colours(tmp_path):
    image = Image.new("P", (4, 2))
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 - 3) * 3)
    image.putdata([1, 2, 0, 1, 2, 0, 1, 2])  # red, blue, index 0 (transparent)
    image.save(tmp_path / "palette.png", transparency=0)
    with Image.open(tmp_path / "palette.png") as saved:
        assert saved.mode == "P" and "transparency" in saved.info
    pixels = _rgb(tmp_path / "palette.png")
    assert pixels[0, 0].tolist() == [255, 0, 0]
    assert pixels[0, 1].tolist() == [0, 0, 255]
    assert pixels[0, 2].tolist() == [0, 0, 0]


def test_16_bit_greyscale_keeps_its_top_8_bits(tmp_path):
    """Pillow's own conversion clips 16-bit values to 255 (a white image); ours scales them."""
    top = np.array([[0, 1, 127], [128, 254, 255]], dtype=np.uint16)
    Image.fromarray(top * 257).save(tmp_path / "deep.png")  # 65535 at the top
    with Image.open(tmp_path / "deep.png") as saved:
        assert saved.mode.startswith("I")
    pixels = _rgb(tmp_path / "deep.png")
    for channel in range(3):
        assert np.array_equal(pixels[..., channel], top.astype(np.uint8))


def test_cmyk_becomes_rgb(tmp_path):
    cmyk = np.zeros((2, 2, 4), dtype=np.uint8)
    cmyk[0, 0] = (0, 0, 0, 0)  # white
    cmyk[0, 1] = (255, 0, 0, 0)  # cyan
    cmyk[1, 0] = (0, 0, 0, 255)  # black
    cmyk[1, 1] = (0, 255, 255, 0)  # red
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "print.tif")
    pixels = _rgb(tmp_path / "print.tif")
    assert pixels.tolist() == [[[255, 255, 255], [0, 255, 255]], [[0, 0, 0], [255, 0, 0]]]


def test_rgb_is_returned_loaded(tmp_path):
    Image.new("RGB", (5, 4), (1, 2, 3)).save(tmp_path / "plain.png")
    image = load_rgb(tmp_path / "plain.png")
    assert image.size == (5, 4) and image.getpixel((4, 3)) == (1, 2, 3)  # usable after close


@pytest.mark.parametrize("content", [b"", b"just some notes, not a picture\n"])
def test_a_file_that_is_no_image_fails_naming_it(tmp_path, content):
    path = tmp_path / "photo.png"
    path.write_bytes(content)
    with pytest.raises(BadImageError, match="cannot read this image") as caught:
        load_rgb(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert isinstance(caught.value, UserError)  # the CLI shows it without a traceback


@pytest.mark.parametrize(
    "name, expected",
    [
        ("a.jpg", True),
        ("a.JPG", True),
        ("b.JpEg", True),
        ("c.PNG", True),
        ("d.tiff", True),
        ("e.webp", True),
        ("f.bmp", True),
        ("g.txt", False),
        ("h.csv", False),
        ("noextension", False),
        ("._x.jpg", False),
        (".DS_Store", False),
        (".hidden.png", False),
    ],
)
def test_is_image_file(name, expected):
    assert is_image_file(Path("/data/cat") / name) is expected


def test_bad_image_error_from_a_dataloader_worker_keeps_the_original_message():
    """torch re-raises a worker's exception as ``type(error)(text)`` with a traceback inside."""
    wrapped = (
        "Caught BadImageError in DataLoader worker process 0.\n"
        "Original Traceback (most recent call last):\n"
        '  File "/site-packages/torch/utils/data/_utils/worker.py", line 349, in _worker\n'
        "    data = fetcher.fetch(index)\n"
        "finetune.images.BadImageError: /x.png: cannot read\n"
    )
    assert str(BadImageError(wrapped)) == "/x.png: cannot read"
    assert str(BadImageError("/y.png: cannot read")) == "/y.png: cannot read"  # left alone
