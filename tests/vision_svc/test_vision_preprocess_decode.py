"""Hostile and unusual image bytes: each is refused with a clear ImageError or decoded like the reference."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from vision_svc.image_decode import ImageError, ImageLimits, decode_image
from vision_svc.preprocess import preprocess_image
from vision_svc.tiling import TileOptions

LIMITS = ImageLimits()


def encode(image, fmt, **save_args):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def reference_decode(data):
    # What InternVL's load_image does with a file.
    return Image.open(io.BytesIO(data)).convert("RGB")


def png_chunk(kind, payload):
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def handmade_png(width, height, bit_depth, color_type, idat=b""):
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def gradient(width, height, mode="RGB"):
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * y) % 256], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8), mode="RGB").convert(mode)


def assert_same_pixels(image, expected):
    assert image.mode == "RGB" and image.size == expected.size
    assert np.array_equal(np.asarray(image), np.asarray(expected))


# ---- refused ----

def test_empty_bytes():
    with pytest.raises(ImageError, match="empty"):
        decode_image(b"", LIMITS)


def test_random_bytes():
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(ImageError, match="not an image in a supported format"):
        decode_image(data, LIMITS)


def test_svg_text():
    svg = b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>'
    with pytest.raises(ImageError, match="unsupported image format SVG"):
        decode_image(svg, LIMITS)


def test_plain_text():
    with pytest.raises(ImageError, match="not an image"):
        decode_image(b"hello, this is not a picture", LIMITS)


def test_over_byte_limit_names_the_limit():
    data = encode(gradient(64, 64), "PNG")
    with pytest.raises(ImageError, match=f"{len(data)} bytes, over the limit of 100 bytes"):
        decode_image(data, ImageLimits(max_image_bytes=100))


def test_truncated_jpeg():
    data = encode(gradient(640, 480), "JPEG", quality=90)
    with pytest.raises(ImageError, match="JPEG"):
        decode_image(data[: len(data) // 2], LIMITS)


def test_truncated_png_header():
    data = encode(gradient(64, 64), "PNG")
    with pytest.raises(ImageError, match="corrupt or truncated PNG"):
        decode_image(data[:20], LIMITS)


def test_truncated_png_pixel_data():
    data = encode(gradient(64, 64), "PNG")
    with pytest.raises(ImageError, match="cannot decode PNG image \\(RGB, 64x64\\): image file is truncated"):
        decode_image(data[: len(data) // 2], LIMITS)


def test_png_with_a_broken_checksum():
    data = bytearray(encode(gradient(64, 64), "PNG"))
    data[data.index(b"IDAT") + 10] ^= 0xFF
    with pytest.raises(ImageError, match="PNG"):
        decode_image(bytes(data), LIMITS)


def test_png_with_zero_width():
    with pytest.raises(ImageError, match="PNG|no pixels"):
        decode_image(handmade_png(0, 10, 8, 2), LIMITS)


@pytest.fixture
def no_pixel_decoded(monkeypatch):
    """Refusing from the header means Pillow never loads a pixel (its `load` decodes them all). pytest.fail's
    exception is no `Exception`, so decode_image's handler of decoder errors lets it through."""
    def load(image):
        pytest.fail(f"decoded the pixels of a {image.width}x{image.height} {image.format}")
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


@pytest.mark.parametrize("side", [8000, 40000])
def test_png_decompression_bomb_is_refused_from_the_header(side, no_pixel_decoded):
    # 40000x40000 RGB would be 4.8 GB decoded; the file is under 100 bytes. Pillow's own ceiling
    # (178M pixels) fires first for it, 8000x8000 passes Pillow and meets ours.
    data = handmade_png(side, side, 8, 2, zlib.compress(b"\x00" * 1024))
    with pytest.raises(ImageError, match=f"{side * side} pixels, over the limit of 40000000 pixels"):
        decode_image(data, LIMITS)


def test_jpeg_with_huge_declared_size(no_pixel_decoded):
    data = bytearray(encode(gradient(16, 16), "JPEG"))
    sof = data.index(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", 8000, 6000)
    with pytest.raises(ImageError, match="6000x8000 = 48000000 pixels, over the limit"):
        decode_image(bytes(data), LIMITS)


def test_gif_with_huge_logical_screen():
    data = bytearray(encode(Image.new("P", (8, 8)), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    with pytest.raises(ImageError, match="over the limit"):
        decode_image(bytes(data), LIMITS)


def test_pixel_limit_is_configurable():
    data = encode(gradient(100, 100), "PNG")
    with pytest.raises(ImageError, match="100x100 = 10000 pixels, over the limit of 9999 pixels"):
        decode_image(data, ImageLimits(max_image_pixels=9999))
    assert decode_image(data, ImageLimits(max_image_pixels=10000)).size == (100, 100)


@pytest.mark.parametrize("fmt,name", [("ICO", "ICO"), ("PDF", "PDF")])
def test_valid_but_unsupported_formats(fmt, name):
    data = encode(gradient(32, 32), fmt)
    with pytest.raises(ImageError, match=f"unsupported image format {name} \\(allowed: PNG, JPEG"):
        decode_image(data, LIMITS)


def test_pillow_format_outside_the_allowed_list():
    # PPM opens in Pillow, but only the allowed formats' parsers ever see request bytes.
    with pytest.raises(ImageError, match="not an image in a supported format"):
        decode_image(encode(gradient(32, 32), "PPM"), LIMITS)


def test_limits_are_validated():
    with pytest.raises(ValueError):
        ImageLimits(max_image_bytes=0)
    with pytest.raises(ValueError, match="Pillow's ceiling"):
        ImageLimits(max_image_pixels=10**12)


# ---- decoded like the reference ----

@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_allowed_formats_decode_like_the_reference(fmt):
    data = encode(gradient(97, 61), fmt)
    assert_same_pixels(decode_image(data, LIMITS), reference_decode(data))


def test_palette_png_with_transparency():
    image = gradient(40, 30).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    data = encode(image, "PNG", transparency=3)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 3
    assert_same_pixels(decode_image(data, LIMITS), reference_decode(data))


def test_rgba_alpha_is_dropped_not_composited():
    rgba = gradient(40, 30, "RGBA")
    rgba.putalpha(0)  # fully transparent: the stored colours survive, as in the reference
    data = encode(rgba, "PNG")
    decoded = decode_image(data, LIMITS)
    assert_same_pixels(decoded, reference_decode(data))
    assert np.array_equal(np.asarray(decoded), np.asarray(gradient(40, 30)))


def test_grey_with_alpha():
    data = encode(gradient(40, 30, "LA"), "PNG")
    assert_same_pixels(decode_image(data, LIMITS), reference_decode(data))


def test_16_bit_grey_png_is_clipped_like_the_reference():
    grey16 = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)
    data = encode(Image.fromarray(grey16), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = decode_image(data, LIMITS)
    assert_same_pixels(decoded, reference_decode(data))
    assert np.asarray(decoded)[63, 63, 0] == 255  # 65520 clipped, not scaled to 255 * 65520 / 65535


def test_16_bit_rgb_png():
    rows = b"".join(b"\x00" + struct.pack(">" + "H" * 24, *range(x * 2000, x * 2000 + 24)) for x in range(8))
    data = handmade_png(8, 8, 16, 2, zlib.compress(rows))
    assert_same_pixels(decode_image(data, LIMITS), reference_decode(data))


def test_cmyk_jpeg():
    data = encode(gradient(64, 48, "CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert_same_pixels(decode_image(data, LIMITS), reference_decode(data))


def test_cmyk_tiff():
    data = encode(gradient(64, 48, "CMYK"), "TIFF")
    assert_same_pixels(decode_image(data, LIMITS), reference_decode(data))


def test_one_bit_bmp():
    data = encode(gradient(64, 48, "1"), "BMP")
    assert_same_pixels(decode_image(data, LIMITS), reference_decode(data))


def test_animated_gif_gives_the_first_frame():
    frames = [Image.new("RGB", (20, 10), color) for color in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    decoded = decode_image(data, LIMITS)
    assert_same_pixels(decoded, reference_decode(data))
    assert decoded.getpixel((5, 5)) == (255, 0, 0)


def test_animated_webp_gives_the_first_frame():
    frames = [Image.new("RGB", (20, 10), color) for color in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True, duration=50)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    decoded = decode_image(data, LIMITS)
    assert decoded.getpixel((5, 5)) == (255, 0, 0)


def test_exif_orientation_is_ignored_like_the_reference():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encode(gradient(60, 20), "JPEG", exif=exif)
    decoded = decode_image(data, LIMITS)
    assert decoded.size == (60, 20)
    assert_same_pixels(decoded, reference_decode(data))


def test_extreme_aspect_ratio_is_served_like_the_reference():
    # 1x10000 is a valid image for the reference: the 1x12 grid, each tile stretched from a 1-pixel column.
    data = encode(gradient(1, 10000), "PNG")
    tiles = preprocess_image(data, LIMITS, TileOptions(max_tiles=12, use_thumbnail=True))
    assert tiles.shape == (13, 3, 448, 448)


def test_bytes_to_tiles_applies_the_limits():
    data = encode(gradient(100, 100), "PNG")
    with pytest.raises(ImageError, match="over the limit of 9999 pixels"):
        preprocess_image(data, ImageLimits(max_image_pixels=9999), TileOptions())
