"""Video bytes -> InternVL frame tiles: the sampled frames (`video_decode`), each resized to one square tile.

As vLLM's InternVL video processor does it: every frame becomes exactly one tile (a 1x1 grid, no thumbnail),
resized with PIL's bicubic filter, then ImageNet-normalized like an image tile. Runs in the preprocessing pool's
workers (uint8 crosses the process boundary; the caller normalizes).
"""

import numpy as np
from PIL import Image

from vision_svc.tiling import TileOptions, image_to_tile_pixels
from vision_svc.video_decode import FrameSampling, VideoLimits, decode_video


def frame_tile_options(image_size: int) -> TileOptions:
    return TileOptions(max_tiles=1, use_thumbnail=False, image_size=image_size, min_tiles=1)


def frames_to_tile_pixels(frames: np.ndarray, image_size: int) -> np.ndarray:
    """uint8 RGB [frames, H, W, 3] -> uint8 [frames, 3, S, S], one tile per frame."""
    options = frame_tile_options(image_size)
    return np.concatenate([image_to_tile_pixels(Image.fromarray(frame, mode="RGB"), options) for frame in frames])


def decode_to_frame_pixels(data: bytes, limits: VideoLimits, sampling: FrameSampling, image_size: int) -> np.ndarray:
    """Video bytes -> uint8 [frames, 3, S, S]; raises VideoError for refused bytes."""
    return frames_to_tile_pixels(decode_video(data, limits, sampling), image_size)
