"""Image bytes -> InternVL tile tensors, inline or on a pool of worker threads or processes.

Host-side decode + resize is CPU-bound (about 70 ms of one core for a 1080p JPEG) and would stall the event loop and
the encoder's batching, so the server runs it on workers; refusals come back as `ImageError`. Threads scale as far as
processes on two cores (Pillow and numpy work outside the GIL) and copy nothing between processes: a 9-tile image's
uint8 tiles are 5.4 MB pickled, piped and unpickled, ~10 ms of CPU. Processes keep a crashing decoder away from the
server and no GIL between many workers.
"""

import asyncio
import concurrent.futures
import io
import multiprocessing
from concurrent.futures.process import BrokenProcessPool

import torch
from PIL import Image

from protos import tracing
from protos.lifetime import die_with_parent
from vision_svc import metrics
from vision_svc.image_decode import ImageError, ImageLimits, decode_image
from vision_svc.progress import ProgressWatch
from vision_svc.tiling import (
    IMAGE_SIZE,
    TileOptions,
    decode_to_tile_pixels,
    decode_to_tile_pixels_timed,
    image_to_tile_array,
    normalize_tiles,
    tile_grid,
)

__all__ = [
    "ImageError",
    "ImageLimits",
    "PreprocessPool",
    "PreprocessWorkerDied",
    "TileOptions",
    "decode_image",
    "image_to_tiles",
    "preprocess_image",
    "tile_grid",
]


class PreprocessWorkerDied(RuntimeError):
    """A worker process died mid-image (killed, out of memory); the pool has been replaced. Maps to INTERNAL."""


def image_to_tiles(
    img: Image.Image, max_tiles: int, use_thumbnail: bool, image_size: int = IMAGE_SIZE, min_tiles: int = 1
) -> torch.Tensor:
    """Normalized float32 tiles [tiles, 3, image_size, image_size] of an RGB image."""
    options = TileOptions(max_tiles=max_tiles, use_thumbnail=use_thumbnail, image_size=image_size, min_tiles=min_tiles)
    return torch.from_numpy(image_to_tile_array(img, options))


def preprocess_image(data: bytes, limits: ImageLimits, options: TileOptions) -> torch.Tensor:
    """Image bytes -> float32 [tiles, 3, S, S] within limits; raises ImageError for refused bytes."""
    return torch.from_numpy(normalize_tiles(decode_to_tile_pixels(data, limits, options)))


class PreprocessPool:
    """Runs decode + tiling off the event loop: `workers` processes, or threads (one when `workers == 0`)."""

    def __init__(self, workers: int, limits: ImageLimits = ImageLimits(), threads: bool = False):
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self.limits = limits
        self.in_threads = threads or workers == 0
        self.progress = ProgressWatch()
        self._executor = self._new_executor()

    def _new_executor(self) -> concurrent.futures.Executor:
        if self.in_threads:
            return concurrent.futures.ThreadPoolExecutor(max_workers=max(self.workers, 1),
                                                         thread_name_prefix="preprocess")
        # spawn, not fork: the parent holds gRPC and torch threads, which a forked child would inherit half-dead.
        # What the workers run comes from modules that import no torch (tiling, video_frames): a worker imports
        # the module of each function it is given, and torch would cost it a second and ~200 MB.
        context = multiprocessing.get_context("spawn")
        return concurrent.futures.ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                                      initializer=die_with_parent)

    async def tiles(self, data: bytes, options: TileOptions) -> torch.Tensor:
        """Float32 tiles [tiles, 3, S, S] of one image; raises ImageError for refused bytes."""
        if tracing.current_span().is_recording():
            return await self._traced_tiles(data, options)
        if self.in_threads:
            tiles = await self.in_worker(preprocess_image, data, self.limits, options)
            metrics.DECODED.labels(on="host").inc()
            return tiles
        pixels = await self.in_worker(decode_to_tile_pixels, data, self.limits, options)
        metrics.DECODED.labels(on="host").inc()
        # Normalizing here (numpy frees the GIL, so in the default thread pool) moves a quarter of the
        # bytes through the worker pipe: float32 tiles of a 1080p image are 22 MB, a 60 ms transfer.
        return torch.from_numpy(await asyncio.get_running_loop().run_in_executor(None, normalize_tiles, pixels))

    async def _traced_tiles(self, data: bytes, options: TileOptions) -> torch.Tensor:
        """`tiles`, with the decoding timed inside the worker for the trace's image_decode span."""
        pixels, started, decoded = await self.in_worker(decode_to_tile_pixels_timed, data, self.limits, options)
        metrics.DECODED.labels(on="host").inc()
        tracing.record_span("image_decode", started, decoded)
        return torch.from_numpy(await asyncio.get_running_loop().run_in_executor(None, normalize_tiles, pixels))

    async def in_worker(self, fn, *args, watched: bool = True):
        """`fn(*args)` on a worker; a dead worker fails the images pending on it and the pool is replaced.
        `watched=False` for work that may rightly run long (a video's decoding): it does not count in `progress`."""
        executor = self._executor
        try:
            if not watched:
                return await asyncio.wrap_future(executor.submit(fn, *args))
            return await self.watched(executor, fn, *args)
        except BrokenProcessPool as e:
            # Every pending image of the dead pool fails; only the first replaces it.
            if self._executor is executor:
                self._executor = self._new_executor()
                executor.shutdown(wait=False, cancel_futures=True)
            raise PreprocessWorkerDied(f"preprocessing worker died: {e}") from e

    async def watched(self, executor: concurrent.futures.Executor, fn, *args):
        """`fn(*args)` on `executor`, counted in `progress` from its submission until it ends (a cancelled call
        that had not started is withdrawn, not progress; one that had keeps its worker until it returns)."""
        self.progress.started()
        try:
            future = executor.submit(fn, *args)
        except BaseException:
            self.progress.finished(moved=False)
            raise
        future.add_done_callback(lambda done: self.progress.finished(moved=not done.cancelled()))
        return await asyncio.wrap_future(future)

    async def warm_up(self) -> None:
        """Starts every worker (spawn imports take seconds) so that the first requests do not pay for it."""
        probe = Image.new("RGB", (2 * IMAGE_SIZE, IMAGE_SIZE))
        data = _png_bytes(probe)
        options = TileOptions(max_tiles=2, use_thumbnail=False)
        await asyncio.gather(*(self.tiles(data, options) for _ in range(max(self.workers, 1))))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> "PreprocessPool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
