"""kernels.preprocess against the host path (vision_svc.tiling: Pillow resize + numpy normalize), its specification.

Measured tolerance (Pillow 13, these cases): pixels differ by at most 2 of 256 levels after the resize, in
under 0.5% of the values on noise and under 0.05% on photo-like content; in normalized units that is a max
abs difference of 2 / 255 / 0.224 = 0.035 and a mean below 1e-4. Where no resize happens the tiles are
bit-equal to the host's.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from kernels.preprocess import normalize, resize_and_tile, resize_like_pillow
from vision_svc.tiling import TileOptions, image_to_tile_array, normalize_tiles, tile_grid

# One level of 8 bits in normalized units, for the channel with the smallest std (the largest step).
LEVEL = 1 / 255 / 0.224
MAX_LEVELS = 2

# (width, height): up- and down-scaling, wide and tall, tiny, odd sizes, ties between grids, and sizes where
# Pillow 13 resizes vertically first (900x500 onto 896x448; 304x1466 onto its thumbnail).
SIZES = [(900, 500), (1920, 1080), (300, 200), (64, 640), (17, 33), (2000, 301), (449, 448), (1000, 1000),
         (1500, 1501), (304, 1466), (1100, 620), (333, 999), (2400, 180), (5, 700), (896, 448)]


def noise(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)  # [H, W, 3]


def photo_like(width: int, height: int, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 / width, y * 255 / height, 128 + 100 * np.sin(x / 40) * np.cos(y / 30)], axis=-1)
    rgb += np.random.default_rng(seed).normal(0, 8, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)  # [H, W, 3]


def device_tiles(pixels: np.ndarray, options: TileOptions) -> np.ndarray:
    height, width = pixels.shape[:2]
    cols, rows = tile_grid(width, height, options.min_tiles, options.max_tiles, options.image_size)
    image = torch.from_numpy(pixels).permute(2, 0, 1)  # uint8 [3, H, W]
    return resize_and_tile(image, cols, rows, options.use_thumbnail, options.image_size).numpy()


@pytest.mark.parametrize("content", [noise, photo_like])
def test_tiles_match_the_host_path_within_two_levels(content):
    options = TileOptions(max_tiles=12, use_thumbnail=True)
    total, count, differing = 0.0, 0, 0
    for i, (width, height) in enumerate(SIZES):
        pixels = content(width, height, seed=i)
        expected = image_to_tile_array(Image.fromarray(pixels), options)
        got = device_tiles(pixels, options)
        assert got.shape == expected.shape and got.dtype == np.float32, (width, height)
        diff = np.abs(got - expected)
        assert diff.max() <= MAX_LEVELS * LEVEL + 1e-6, (width, height, diff.max() / LEVEL)
        total, count, differing = total + diff.sum(), count + diff.size, differing + np.count_nonzero(diff)
    assert total / count < 1e-4
    assert differing / count < (0.005 if content is noise else 0.0005)


@pytest.mark.parametrize("max_tiles,use_thumbnail", [(1, True), (6, False), (12, True), (24, True)])
def test_tile_counts_and_order_follow_the_options(max_tiles, use_thumbnail):
    options = TileOptions(max_tiles=max_tiles, use_thumbnail=use_thumbnail)
    pixels = photo_like(1300, 700)
    expected = image_to_tile_array(Image.fromarray(pixels), options)
    got = device_tiles(pixels, options)
    assert got.shape == expected.shape
    # Tile by tile: a wrong order or a misplaced thumbnail would differ by far more than two levels.
    for tile, (ours, theirs) in enumerate(zip(got, expected)):
        assert np.abs(ours - theirs).max() <= MAX_LEVELS * LEVEL + 1e-6, tile


def test_at_the_grids_own_size_tiles_are_bit_equal_to_the_host():
    # 1344x896 is exactly a 3x2 grid of 448 tiles: no resize, so only the cropping and normalizing remain.
    pixels = noise(3 * 448, 2 * 448)
    options = TileOptions(max_tiles=6, use_thumbnail=False)
    assert tile_grid(3 * 448, 2 * 448, 1, 6, 448) == (3, 2)
    np.testing.assert_array_equal(device_tiles(pixels, options),
                                  image_to_tile_array(Image.fromarray(pixels), options))


def test_normalize_is_bit_equal_to_the_host_for_every_level():
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16), (1, 3, 16, 16))
    expected = normalize_tiles(np.ascontiguousarray(levels))
    np.testing.assert_array_equal(normalize(torch.from_numpy(levels.copy()).float()).numpy(), expected)


@pytest.mark.parametrize("source,target", [((900, 500), (896, 448)), ((500, 900), (448, 896)),
                                           ((1920, 1080), (1792, 896)), ((1920, 1160), (1792, 896)),
                                           ((300, 200), (448, 448)), ((2000, 90), (448, 448))])
def test_resize_follows_pillows_pass_order(source, target):
    # On noise, running the two passes in the other order than Pillow's changes values by 20 levels and more.
    pixels = noise(*source)
    expected = np.asarray(Image.fromarray(pixels).resize(target, Image.Resampling.BICUBIC)).astype(int)
    got = resize_like_pillow(torch.from_numpy(pixels).permute(2, 0, 1).float(), *target)
    assert np.abs(got.permute(1, 2, 0).numpy().astype(int) - expected).max() <= MAX_LEVELS


@pytest.mark.parametrize("image", [torch.zeros(3, 8, 8), torch.zeros(8, 8, 3, dtype=torch.uint8),
                                   torch.zeros(4, 8, 8, dtype=torch.uint8)], ids=["float", "hwc", "rgba"])
def test_refuses_what_is_not_a_uint8_rgb_image(image):
    with pytest.raises(ValueError, match=r"uint8 \[3, H, W\]"):
        resize_and_tile(image, 1, 1, True, 448)
