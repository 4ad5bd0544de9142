"""Preprocessing split between host and device: decode on the host, resize + tile + normalize on the device.

With `--preprocess-on device` the preprocessing pool (processes or a thread) only decodes, with the same
guarded `decode_image` and limits as the host path, and hands back the RGB image (8-bit, a quarter of the
float tiles' bytes). One dedicated thread per server uploads it and runs `kernels.preprocess.resize_and_tile`
on the encoder's device, so the event loop never waits on the device and the encoder's worker thread keeps
to forward passes. The tiles it returns are already on the device in the encoder's dtype; they wait in the
encoder's queue there (a 448x448 tile is 1.2 MB in bf16: the queue limit bounds that memory too).
"""

import asyncio
import concurrent.futures

import numpy as np
import torch
from PIL import Image

from kernels.preprocess import resize_and_tile
from vision_svc.image_decode import ImageLimits, decode_image
from vision_svc.preprocess import PreprocessPool
from vision_svc.tiling import TileOptions, tile_grid


def image_tiles_on_device(image: Image.Image, options: TileOptions, device: torch.device,
                          dtype: torch.dtype) -> torch.Tensor:
    """RGB image -> normalized tiles [tiles, 3, S, S] in `dtype` on `device`, the grid chosen as the host's."""
    if image.mode != "RGB":
        raise ValueError(f"tiling needs an RGB image, got mode {image.mode}")
    cols, rows = tile_grid(image.width, image.height, options.min_tiles, options.max_tiles, options.image_size)
    # np.array, not asarray: Pillow's buffer is read-only, which torch refuses to wrap without a warning.
    # Upload the contiguous [H, W, 3] and permute on the device, rather than copy a strided view on the host.
    pixels = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)  # uint8 [3, H, W]
    with torch.inference_mode():
        tiles = resize_and_tile(pixels, cols, rows, options.use_thumbnail, options.image_size)  # [T, 3, S, S]
        return tiles.to(dtype)


class DevicePreprocessPool(PreprocessPool):
    """`PreprocessPool` whose `tiles` decode on the pool and tile on `device`; the same interface and warm-up."""

    def __init__(self, workers: int, limits: ImageLimits, device: torch.device, dtype: torch.dtype):
        super().__init__(workers, limits)
        self.device = device
        self.dtype = dtype
        # One thread: device work is serialized per device anyway, and one queue keeps the order of arrival.
        self._device_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                    thread_name_prefix="device-preprocess")

    async def tiles(self, data: bytes, options: TileOptions) -> torch.Tensor:
        """Tiles [tiles, 3, S, S] of one image, in the encoder's dtype on its device; ImageError for refused bytes."""
        image = await self.in_worker(decode_image, data, self.limits)
        return await asyncio.get_running_loop().run_in_executor(self._device_thread, image_tiles_on_device, image, options,
                                          self.device, self.dtype)

    def close(self) -> None:
        super().close()
        self._device_thread.shutdown(wait=True, cancel_futures=True)
