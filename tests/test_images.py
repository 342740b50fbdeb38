"""Image loading: every mode PIL opens becomes the right 8-bit RGB image; oversized images are refused."""

import numpy as np
import pytest
from PIL import Image

from halo_embed.data.images import ImageLoadError, load_image, to_rgb


def test_16_bit_greyscale_is_rescaled_not_clipped_to_white(tmp_path):
    values = np.array([[0, 1000, 32768, 65535]], dtype=np.uint16).repeat(4, axis=0)
    Image.fromarray(values).save(tmp_path / "grey16.png")  # saved and decoded as 16-bit greyscale
    rgb = np.asarray(load_image(tmp_path / "grey16.png"))
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[0, :, 0], np.rint(values[0] / 65535 * 255).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all()  # grey stays grey


def test_8_bit_data_in_a_32_bit_image_and_float_images():
    ints = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_rgb(ints))[0, :, 1], [0, 100, 255])
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    np.testing.assert_array_equal(np.asarray(to_rgb(floats))[0, :, 1], [0, 128, 255])


def test_palette_with_transparency_and_cmyk(tmp_path):
    import warnings

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 200, 30, 10] + [0] * 762)
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL warns when such an image is converted to RGB directly
        rgb = np.asarray(load_image(tmp_path / "palette.png"))
    assert tuple(rgb[0, 0]) == (200, 30, 10)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red in CMYK
    cmyk.save(tmp_path / "cmyk.jpg")
    r, g, b = np.asarray(load_image(tmp_path / "cmyk.jpg"))[1, 1].astype(int)
    assert r > 200 and g < 40 and b < 40


def test_oversized_images_are_refused_by_name(tmp_path, monkeypatch):
    Image.new("RGB", (300, 200)).save(tmp_path / "big.png")
    with pytest.raises(ImageLoadError, match=r"image .*big.png has 300x200 pixels, over the limit of 50,000"):
        load_image(tmp_path / "big.png", max_pixels=50_000)
    assert load_image(tmp_path / "big.png", max_pixels=None).size == (300, 200)
    # PIL's own decompression-bomb guard (twice its MAX_IMAGE_PIXELS) is moved by a larger limit ...
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert load_image(tmp_path / "big.png", max_pixels=100_000).size == (300, 200)
    assert Image.MAX_IMAGE_PIXELS == 1000  # and restored
    # ... and below it becomes the same error type
    with pytest.raises(ImageLoadError, match=r"image .*big.png is too large to decode safely"):
        load_image(tmp_path / "big.png", max_pixels=500)


def test_missing_and_damaged_files(tmp_path):
    with pytest.raises(ImageLoadError, match="image file not found"):
        load_image(tmp_path / "nope.png")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "ok.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(ImageLoadError, match=r"cannot read image .*cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(TypeError, match="an image must be a file path, encoded bytes or a PIL image, got int"):
        load_image(3)
