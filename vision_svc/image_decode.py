"""Turns untrusted image bytes into an RGB PIL image, or refuses them with an `ImageError`.

Every limit is checked before the expensive step it protects: the byte count before parsing, the pixel
count from the header before any pixel is decoded (a 40000x40000 PNG of a few KB is refused without
allocating). Pillow's own `Image.MAX_IMAGE_PIXELS` is process-global, so it is never changed here.

Parity with the InternVL reference (`Image.open(f).convert('RGB')`) decides every colour question:
- alpha (RGBA, LA, palette transparency) is dropped, not composited: hidden pixels keep their stored colour;
- 16-bit greyscale (`I;16`, `I`) is clipped to 0..255 by Pillow's convert, not rescaled;
- CMYK goes through Pillow's plain CMYK -> RGB conversion;
- animated GIF / WebP and multi-page TIFF: the first frame only;
- EXIF orientation is ignored (the reference does not apply it, and the model was trained that way).
"""

import dataclasses
import io
import re

from PIL import Image, UnidentifiedImageError

# Pillow plugin names; "JPEG" also opens MPO files (phone cameras) through the same plugin.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
_ALLOWED_FOR_HUMANS = "PNG, JPEG, WebP, GIF, BMP, TIFF"

# Leading bytes of allowed formats: a file that starts like one but fails to open is corrupt, not foreign.
_ALLOWED_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)
# Leading bytes of formats people send by mistake, so that the refusal can name them.
_REFUSED_MAGIC = (
    (b"%PDF", "PDF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"8BPS", "PSD"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"icns", "ICNS"),
    (b"qoif", "QOI"),
)

MIB = 1 << 20


class ImageError(ValueError):
    """The image bytes are refused; the message names the problem and the limit. Maps to INVALID_ARGUMENT."""


@dataclasses.dataclass(frozen=True)
class ImageLimits:
    # 20 MiB holds any sane photo; larger uploads are almost always raw scans or abuse.
    max_image_bytes: int = 20 * MIB
    # 40 MP covers 8K UHD (33 MP) and most camera photos; one such RGB image is 120 MB decoded, and the
    # tiles never need more than 12 * 448^2 = 2.4 MP, so larger images only cost memory.
    max_image_pixels: int = 40_000_000

    def __post_init__(self):
        if self.max_image_bytes <= 0 or self.max_image_pixels <= 0:
            raise ValueError(f"image limits must be positive, got {self}")
        # Pillow refuses to open anything above twice its global limit, so a larger limit could not be honoured.
        pillow_ceiling = 2 * Image.MAX_IMAGE_PIXELS
        if self.max_image_pixels > pillow_ceiling:
            raise ValueError(f"max_image_pixels={self.max_image_pixels} is above Pillow's ceiling of {pillow_ceiling}")


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decodes the first frame of `data` to an RGB image within `limits`; raises ImageError otherwise."""
    image = open_image(data, limits)
    try:
        return image.convert("RGB")
    except MemoryError:
        raise
    except Exception as e:  # Pillow decoders raise OSError, ValueError, SyntaxError, EOFError... on bad data
        raise ImageError(f"cannot decode {image.format} image ({image.mode}, {image.width}x{image.height}): {e}") from e


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """`data`'s header, parsed and checked against `limits`; no pixel is decoded yet. ImageError otherwise."""
    if not data:
        raise ImageError("image data is empty")
    if len(data) > limits.max_image_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes} bytes")
    image = _open_header(data, limits)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels} pixels"
        )
    return image


def _open_header(data: bytes, limits: ImageLimits) -> Image.Image:
    """Parses only the header (Pillow opens lazily), with the plugins of the allowed formats only."""
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as e:
        # Pillow's own ceiling (far above ours) fired before the size was visible; its message has the count.
        count = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{count.group(1)} pixels" if count else "too many pixels"
        raise ImageError(f"image is {size}, over the limit of {limits.max_image_pixels} pixels") from e
    except MemoryError:
        raise
    except Exception as e:  # header parsers raise UnidentifiedImageError, SyntaxError, struct.error...
        raise ImageError(_describe_unopenable(data, e)) from e


def _describe_unopenable(data: bytes, error: Exception) -> str:
    head = data[:16]
    # UnidentifiedImageError's text is just the stream's repr; the other errors say what broke.
    detail = "unreadable header" if isinstance(error, UnidentifiedImageError) else str(error)
    for magic, name in _ALLOWED_MAGIC:
        if head.startswith(magic):
            return f"corrupt or truncated {name} image: {detail}"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return f"corrupt or truncated WebP image: {detail}"
    for magic, name in _REFUSED_MAGIC:
        if head.startswith(magic):
            return f"unsupported image format {name} (allowed: {_ALLOWED_FOR_HUMANS})"
    if head[4:8] == b"ftyp":
        return f"unsupported image format HEIF/AVIF (allowed: {_ALLOWED_FOR_HUMANS})"
    text_head = data[:256].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text_head.startswith((b"<svg", b"<?xml", b"<!doctype svg")):
        return f"unsupported image format SVG (allowed: {_ALLOWED_FOR_HUMANS})"
    return f"data is not an image in a supported format (allowed: {_ALLOWED_FOR_HUMANS})"
