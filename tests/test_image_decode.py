"""The shard writer's and predict's decoder: simplejpeg where it gives Pillow's pixels, Pillow for everything else."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.sources.base import decode_image_bytes, decode_plain_jpeg
from tests.conftest import SHARED_DATA, requires_shared_data


def pillow_decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def encoded(image: Image.Image, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def noise_image(height: int, width: int, seed: int = 0) -> Image.Image:
    """Noise, so that any difference in DCT or chroma upsampling shows in many pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


PLAIN_JPEGS = {
    "4:4:4": lambda: encoded(noise_image(37, 53), subsampling=0),
    "4:2:2": lambda: encoded(noise_image(37, 53), subsampling=1),
    "4:2:0 odd size": lambda: encoded(noise_image(37, 53), subsampling=2, quality=75),
    "progressive": lambda: encoded(noise_image(64, 48), progressive=True),
    "grey": lambda: encoded(noise_image(31, 29).convert("L")),
    "stored as RGB (Adobe)": lambda: encoded(noise_image(20, 24), keep_rgb=True),
    "1x1": lambda: encoded(noise_image(1, 1)),
}


@pytest.mark.parametrize("kind", PLAIN_JPEGS)
def test_a_plain_jpeg_takes_the_fast_path_with_pillows_mode_and_pixels(kind: str) -> None:
    data = PLAIN_JPEGS[kind]()
    fast = decode_plain_jpeg(data)
    assert fast is not None, f"{kind} fell back to Pillow"
    reference = pillow_decode(data)
    assert fast.mode == reference.mode and fast.size == reference.size
    assert np.array_equal(np.asarray(fast), np.asarray(reference))
    assert np.array_equal(np.asarray(decode_image_bytes(data)), np.asarray(reference))


def test_cmyk_png_and_transparent_images_go_to_pillow_unchanged() -> None:
    cmyk = encoded(noise_image(16, 16).convert("CMYK"))
    png = encoded(noise_image(16, 16), format="PNG")
    assert decode_plain_jpeg(cmyk) is None and decode_plain_jpeg(png) is None
    assert decode_image_bytes(cmyk).mode == "CMYK"
    assert np.array_equal(np.asarray(decode_image_bytes(cmyk)), np.asarray(pillow_decode(cmyk)))
    assert np.array_equal(np.asarray(decode_image_bytes(png)), np.asarray(pillow_decode(png)))
    transparent = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image_bytes(encoded(transparent, format="PNG")).getpixel((0, 0)) == (124, 116, 104)


def test_truncated_and_corrupt_jpegs_fail_with_pillows_message() -> None:
    whole = encoded(noise_image(64, 64))
    truncated, corrupt = whole[: len(whole) // 2], whole[:200] + bytes(range(256)) * 8
    for data in (truncated, corrupt, b"\xff\xd8 not a jpeg"):
        assert decode_plain_jpeg(data) is None
    with pytest.raises(OSError, match="truncated"):
        decode_image_bytes(truncated)
    with pytest.raises(Exception) as raised:
        pillow_decode(corrupt)
    with pytest.raises(type(raised.value)):
        decode_image_bytes(corrupt)


def test_an_image_over_pillows_pixel_limit_is_left_to_pillows_bomb_check(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encoded(noise_image(40, 40))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 700)  # 1600 pixels: over twice the limit, an error in Pillow
    assert decode_plain_jpeg(data) is None
    with pytest.raises(Image.DecompressionBombError):
        decode_image_bytes(data)


@requires_shared_data("utkface.tar")
def test_real_utkface_photos_decode_to_pillows_pixels() -> None:
    checked = 0
    with tarfile.open(SHARED_DATA / "utkface.tar") as archive:
        for member in archive:
            if not member.name.endswith(".jpg"):
                continue
            data = archive.extractfile(member).read()
            fast = decode_plain_jpeg(data)
            assert fast is not None, member.name
            assert np.array_equal(np.asarray(fast), np.asarray(pillow_decode(data))), member.name
            checked += 1
            if checked == 300:
                break
    assert checked == 300
