"""InternVL dynamic tiling: an RGB image -> normalized 448x448 tiles, pixel-equal to the OpenGVLab reference.

The reference (`dynamic_preprocess` + `build_transform` of InternVL's `load_image`) picks the tile grid
whose aspect ratio is closest to the image's, resizes the image onto that grid with bicubic filtering,
crops the tiles row-major, appends a bicubic 448x448 thumbnail of the whole image when there is more than
one tile, then applies ToTensor + ImageNet Normalize. This module does the same with one PIL resize and
numpy float32 arithmetic in the reference's operation order (divide by 255, subtract mean, divide by
std), which gives bit-identical values without torchvision. It imports no torch, so that the pool's
worker processes (which run `decode_to_tile_pixels`, timed or not) start fast and stay small.
"""

import dataclasses
import functools
import time

import numpy as np
from PIL import Image

from vision_svc.image_decode import ImageLimits, decode_image

IMAGE_SIZE = 448
# ImageNet statistics, as in InternVL's build_transform; [1, 3, 1, 1] to broadcast over [tiles, 3, S, S].
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32).reshape(1, 3, 1, 1)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32).reshape(1, 3, 1, 1)


@dataclasses.dataclass(frozen=True)
class TileOptions:
    max_tiles: int = 12
    use_thumbnail: bool = True
    image_size: int = IMAGE_SIZE
    min_tiles: int = 1

    def __post_init__(self):
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {self.min_tiles}, {self.max_tiles}")
        if self.image_size <= 0:
            raise ValueError(f"image_size must be positive, got {self.image_size}")


@functools.lru_cache(maxsize=64)
def _candidate_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    # (cols, rows) sorted by tile count. The reference sorts a set, so grids with equal counts come in
    # hash order there; that order never changes the result (tested exhaustively on every tie point).
    grids = [(c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if min_tiles <= c * r <= max_tiles]
    return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def tile_grid(width: int, height: int, min_tiles: int, max_tiles: int, image_size: int) -> tuple[int, int]:
    """The (cols, rows) grid of the reference's find_closest_aspect_ratio."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    aspect_ratio = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        # A tie (the same ratio, as 1x1 and 2x2, or exactly halfway between two): take the later, larger
        # grid only when the image has pixels enough to fill half of it, so small images are not blown up.
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def tile_count(width: int, height: int, options: TileOptions) -> int:
    """Tiles that image_to_tile_array makes for an image of this size, thumbnail included."""
    cols, rows = tile_grid(width, height, options.min_tiles, options.max_tiles, options.image_size)
    blocks = cols * rows
    return blocks + 1 if options.use_thumbnail and blocks != 1 else blocks


def fewest_tiles(options: TileOptions) -> int:
    """The fewest tiles that any image makes with these options: the smallest grid has exactly min_tiles."""
    return options.min_tiles + 1 if options.use_thumbnail and options.min_tiles != 1 else options.min_tiles


def image_to_tile_pixels(image: Image.Image, options: TileOptions) -> np.ndarray:
    """Tiles of an RGB image before normalization, uint8 [tiles, 3, S, S], grid tiles row-major then the thumbnail."""
    if image.mode != "RGB":
        raise ValueError(f"tiling needs an RGB image, got mode {image.mode}")
    size = options.image_size
    cols, rows = tile_grid(image.width, image.height, options.min_tiles, options.max_tiles, size)
    blocks = cols * rows
    with_thumbnail = options.use_thumbnail and blocks != 1
    tiles = np.empty((blocks + with_thumbnail, 3, size, size), dtype=np.uint8)  # [tiles, 3, S, S]

    resized = np.asarray(image.resize((cols * size, rows * size), Image.Resampling.BICUBIC))  # [rows*S, cols*S, 3]
    # [rows, S, cols, S, 3] -> [rows, cols, 3, S, S]: tile i is row i // cols, column i % cols
    tiles[:blocks].reshape(rows, cols, 3, size, size)[...] = resized.reshape(rows, size, cols, size, 3).transpose(0, 2, 4, 1, 3)
    if with_thumbnail:
        thumbnail = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))  # [S, S, 3]
        tiles[blocks] = thumbnail.transpose(2, 0, 1)
    return tiles


def normalize_tiles(pixels: np.ndarray) -> np.ndarray:
    """uint8 [tiles, 3, S, S] -> float32 [tiles, 3, S, S]: ToTensor then ImageNet Normalize.

    Op for op in float32 (divide by 255, subtract mean, divide by std), so bit-identical to torchvision.
    """
    out = np.divide(pixels, np.float32(255), dtype=np.float32)
    out -= _MEAN
    out /= _STD
    return out


def image_to_tile_array(image: Image.Image, options: TileOptions) -> np.ndarray:
    """Normalized tiles of an RGB image, float32 [tiles, 3, S, S]."""
    return normalize_tiles(image_to_tile_pixels(image, options))


def decode_to_tile_pixels(data: bytes, limits: ImageLimits, options: TileOptions) -> np.ndarray:
    """Image bytes -> uint8 [tiles, 3, S, S]; raises ImageError for refused bytes. Runs in pool workers:
    uint8 is a quarter of the float32 bytes that would otherwise cross the process boundary."""
    return image_to_tile_pixels(decode_image(data, limits), options)


def decode_to_tile_pixels_timed(data: bytes, limits: ImageLimits, options: TileOptions) -> tuple:
    """`decode_to_tile_pixels`, and when its decoding began and ended (ns since the epoch): the trace's
    image_decode span, measured inside the worker."""
    started = time.time_ns()
    image = decode_image(data, limits)
    decoded = time.time_ns()
    return image_to_tile_pixels(image, options), started, decoded
