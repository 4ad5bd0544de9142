"""Image token counts from headers alone: equal to the tiles vision_svc makes from the same bytes, refusals
with the vision stage's messages, hash-only images from memory or at a lower bound."""

import hashlib
import io
import itertools

import pytest
from PIL import Image

from llm_svc.image_tokens import ImageTokenCounter, ImageTokens, TilingPolicy
from llm_svc.vision_client import ImageBlob
from protos import vision_pb2
from protos.errors import InvalidInput
from vision_svc.image_decode import ImageLimits
from vision_svc.tiling import TileOptions, decode_to_tile_pixels, fewest_tiles, tile_count

from tests.llm_svc.llm_helpers import image

INFO = vision_pb2.GetInfoResponse(tokens_per_tile=256, image_size=448, max_tiles=12, min_tiles=1, use_thumbnail=True,
                                  max_image_bytes=8 << 20, max_image_pixels=4_000_000)
POLICY = TilingPolicy.from_info(INFO)


def blob(picture: Image.Image, fmt: str = "PNG") -> ImageBlob:
    buffer = io.BytesIO()
    picture.save(buffer, format=fmt)
    return ImageBlob(hashlib.sha256(buffer.getvalue()).hexdigest(), buffer.getvalue())


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
@pytest.mark.parametrize("size,max_tiles", [((1200, 900), 0), ((900, 500), 6), ((60, 2000), 12), ((449, 448), 2)])
def test_tokens_from_the_header_equal_the_tiles_vision_svc_makes(fmt, size, max_tiles):
    picture = blob(image(*size, seed=3), fmt)
    (counted,) = ImageTokenCounter(POLICY).count([picture], max_tiles)
    tiles = decode_to_tile_pixels(picture.data, POLICY.image_limits, POLICY.options(max_tiles)).shape[0]
    assert counted == ImageTokens(tiles * 256, exact=True)


def test_an_image_named_by_hash_is_counted_from_its_size_seen_before():
    counter = ImageTokenCounter(POLICY)
    picture = blob(image(1200, 900, seed=4))
    by_hash = ImageBlob(picture.content_hash, None)
    assert counter.count([by_hash], 0) == [ImageTokens(256, exact=False)]  # never seen: one tile at least
    counter.count([picture], 0)
    assert counter.count([by_hash], 0) == [ImageTokens(13 * 256, exact=True)]
    assert counter.count([by_hash], 6) == [ImageTokens(7 * 256, exact=True)]  # any options: the size is kept


def test_remembered_sizes_are_bounded_least_recently_used_first():
    counter = ImageTokenCounter(POLICY, remembered=2)
    pictures = [blob(image(900, 500, seed=s)) for s in range(3)]
    counter.count(pictures[:2], 0)
    counter.count([ImageBlob(pictures[0].content_hash, None)], 0)  # used again: kept
    counter.count(pictures[2:], 0)
    assert [c.exact for c in counter.count([ImageBlob(p.content_hash, None) for p in pictures], 0)] == [
        True, False, True]


@pytest.mark.parametrize("data,message", [
    (b"%PDF-1.7 a document", "image 1: unsupported image format PDF"),
    (b"\x89PNG\r\n\x1a\n truncated", "image 1: corrupt or truncated PNG image"),
    (b"x" * ((8 << 20) + 1), "image 1: image is 8388609 bytes, over the limit of 8388608 bytes"),
])
def test_what_the_vision_stage_would_refuse_from_the_header_is_refused_here(data, message):
    with pytest.raises(InvalidInput, match=message):
        ImageTokenCounter(POLICY).count([blob(image(50, 50, seed=1)), ImageBlob("a" * 64, data)], 0)


def test_too_many_pixels_are_refused_from_the_header():
    with pytest.raises(InvalidInput, match="image 0: image is 2500x2000 = 5000000 pixels, over the limit of 4000000"):
        ImageTokenCounter(POLICY).count([blob(Image.new("RGB", (2500, 2000)))], 0)


def test_max_tiles_over_the_vision_stages_limit_is_refused_as_it_would_refuse_it():
    with pytest.raises(InvalidInput, match="max_tiles 13 is over this server's limit of 12"):
        ImageTokenCounter(POLICY).count([blob(image(50, 50, seed=1))], 13)


def test_options_follow_the_vision_stage():
    policy = TilingPolicy.from_info(vision_pb2.GetInfoResponse(
        tokens_per_tile=256, image_size=448, max_tiles=12, min_tiles=4, use_thumbnail=False, max_image_bytes=1,
        max_image_pixels=1))
    assert policy.options(0) == TileOptions(max_tiles=12, use_thumbnail=False, image_size=448, min_tiles=4)
    assert policy.options(2) == TileOptions(max_tiles=2, use_thumbnail=False, image_size=448, min_tiles=2)
    # A vision stage that does not report min_tiles (0) means the original's 1.
    assert TilingPolicy.from_info(vision_pb2.GetInfoResponse(
        image_size=448, max_tiles=12, max_image_bytes=1, max_image_pixels=1)).options(0).min_tiles == 1
    assert policy.image_limits == ImageLimits(max_image_bytes=1, max_image_pixels=1)


@pytest.mark.parametrize("min_tiles,max_tiles,thumbnail", [
    (m, n, t) for m, n, t in itertools.product((1, 2, 3), (1, 3, 6, 12), (True, False)) if m <= n])
def test_fewest_tiles_is_the_fewest_any_image_makes(min_tiles, max_tiles, thumbnail):
    options = TileOptions(max_tiles=max_tiles, use_thumbnail=thumbnail, min_tiles=min_tiles)
    sides = (1, 10, 30, 100, 448, 900, 2000, 5000)
    assert min(tile_count(w, h, options) for w, h in itertools.product(sides, sides)) == fewest_tiles(options)
