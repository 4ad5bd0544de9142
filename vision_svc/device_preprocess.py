"""Preprocessing split between host and device: decode on the host, resize + tile + normalize on the device.

With `--preprocess-on device` the preprocessing pool (processes or a thread) only decodes, with the same
guarded `decode_image` and limits as the host path, and hands back the RGB image (8-bit, a quarter of the
float tiles' bytes). One dedicated thread per server uploads it and runs `kernels.preprocess.resize_and_tile`
on the encoder's device, so the event loop never waits on the device and the encoder's worker thread keeps
to forward passes. The tiles it returns are already on the device in the encoder's dtype; they wait in the
encoder's queue there (a 448x448 tile is 1.2 MB in bf16: the queue limit bounds that memory too). On an
accelerator that thread works on a stream of its own (`PreprocessStream`), so it overlaps the encoder.

With `--decode-on device` as well, JPEGs skip the workers: the device thread checks the header against the
same limits, then torchvision's `decode_jpeg` decodes on the device (nvJPEG on CUDA; libjpeg-turbo on a CPU,
bit-equal to Pillow). Other formats, CMYK JPEGs and whatever the device decoder refuses go to the workers,
whose decoder then decodes them or names the problem, so refusals read the same on both paths.
"""

import concurrent.futures
import logging

import numpy as np
import torch
from PIL import Image

from kernels.preprocess import resize_and_tile
from protos import tracing
from vision_svc import metrics
from vision_svc.image_decode import ImageLimits, decode_image, open_image
from vision_svc.preprocess import PreprocessPool
from vision_svc.tiling import TileOptions, tile_grid

log = logging.getLogger(__name__)

# Pillow's modes of the JPEGs that decode_jpeg turns into RGB as Pillow does: YCbCr (opened as "RGB") and grey.
DEVICE_JPEG_MODES = ("RGB", "L")


def image_tiles_on_device(image: Image.Image, options: TileOptions, device: torch.device,
                          dtype: torch.dtype) -> torch.Tensor:
    """RGB image -> normalized tiles [tiles, 3, S, S] in `dtype` on `device`, the grid chosen as the host's."""
    if image.mode != "RGB":
        raise ValueError(f"tiling needs an RGB image, got mode {image.mode}")
    # np.array, not asarray: Pillow's buffer is read-only, which torch refuses to wrap without a warning.
    # Upload the contiguous [H, W, 3] and permute on the device, rather than copy a strided view on the host.
    pixels = torch.from_numpy(np.array(image)).to(device).permute(2, 0, 1)  # uint8 [3, H, W]
    return pixels_to_tiles(pixels, options, dtype)


def pixels_to_tiles(pixels: torch.Tensor, options: TileOptions, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [3, H, W] on a device -> normalized tiles [tiles, 3, S, S] in `dtype` there."""
    height, width = pixels.shape[1:]
    cols, rows = tile_grid(width, height, options.min_tiles, options.max_tiles, options.image_size)
    with torch.inference_mode():
        tiles = resize_and_tile(pixels, cols, rows, options.use_thumbnail, options.image_size)  # [T, 3, S, S]
        return tiles.to(dtype)


def decode_jpeg_on_device(data: bytes, limits: ImageLimits, device: torch.device) -> torch.Tensor | None:
    """uint8 [3, H, W] on `device` for a JPEG within `limits`; None when the host should decode it instead.

    Raises ImageError for bytes that the header check refuses (size, pixel count, not an image at all).
    """
    image = open_image(data, limits)
    if image.format != "JPEG" or image.mode not in DEVICE_JPEG_MODES:
        return None
    # Imported here: only servers that decode on the device need torchvision.
    from torchvision.io import ImageReadMode, decode_jpeg

    encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)  # a writable copy of the few hundred KB
    try:
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:  # truncated or corrupt data, or a JPEG variant the device decoder lacks
        log.debug("device JPEG decode refused the image, decoding on the host: %s", e)
        return None


# Devices whose work is queued on streams; on a CPU the device thread's work runs as it is called.
STREAM_DEVICES = ("cuda", "npu")


class PreprocessStream:
    """The device thread's own stream, drained at the end of every run.

    Not the encoder's stream: a copy from pageable host memory synchronizes its stream, so there every upload
    would wait for the forward pass queued before it, and preprocessing would run only between passes.
    Draining at the end makes the tiles complete before the encoder's stream reads them, and leaves the stream
    idle when the next run starts, which torchvision's CUDA `decode_jpeg` needs: it writes its output from a
    private stream without waiting for the caller's, so it could overwrite a block that a kernel still queued
    on the caller's stream reads.
    """

    def __init__(self, device: torch.device, module=None):
        self.device = device
        self._module = module or (torch.get_device_module(device) if device.type in STREAM_DEVICES else None)
        self._stream = self._module.Stream(device) if self._module else None

    def run(self, fn, *args) -> torch.Tensor | None:
        """`fn(*args)` on this stream, finished when it returns; its tensor may then be used on the caller's."""
        if self._stream is None:
            return fn(*args)
        consumer = self._module.current_stream(self.device)  # the encoder's too: neither thread changes its own
        with self._module.stream(self._stream):
            tiles = fn(*args)
            self._stream.synchronize()
        if tiles is not None:
            # Freed, the block goes back to this stream's pool: its reuse must also wait for the encoder's reads.
            tiles.record_stream(consumer)
        return tiles


class DevicePreprocessPool(PreprocessPool):
    """`PreprocessPool` whose `tiles` decode on the pool and tile on `device`; the same interface and warm-up."""

    def __init__(self, workers: int, limits: ImageLimits, device: torch.device, dtype: torch.dtype,
                 decode_on_device: bool = False, threads: bool = False):
        super().__init__(workers, limits, threads)
        self.device = device
        self.dtype = dtype
        self.decode_on_device = decode_on_device
        # One thread: device work is serialized per device anyway, and one queue keeps the order of arrival.
        self._device_thread = concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                    thread_name_prefix="device-preprocess")
        self._stream = PreprocessStream(device)

    async def tiles(self, data: bytes, options: TileOptions) -> torch.Tensor:
        """Tiles [tiles, 3, S, S] of one image, in the encoder's dtype on its device; ImageError for refused bytes."""
        if self.decode_on_device:
            tiles = await self.watched(self._device_thread, self._stream.run, self._decode_and_tile, data, options)
            if tiles is not None:
                metrics.DECODED.labels(on="device").inc()
                return tiles
        with tracing.span("image_decode"):
            image = await self.in_worker(decode_image, data, self.limits)
        metrics.DECODED.labels(on="host").inc()
        return await self.watched(self._device_thread, self._stream.run, image_tiles_on_device, image, options,
                                  self.device, self.dtype)

    def _decode_and_tile(self, data: bytes, options: TileOptions) -> torch.Tensor | None:
        pixels = decode_jpeg_on_device(data, self.limits, self.device)
        return None if pixels is None else pixels_to_tiles(pixels, options, self.dtype)

    def close(self) -> None:
        super().close()
        self._device_thread.shutdown(wait=True, cancel_futures=True)
