"""Runs the encoder on its device in one worker thread, batching tiles of concurrent requests.

The event loop only enqueues tiles and awaits futures; the device work happens on the worker thread, which
gathers queued tiles into one forward pass of at most `max_batch_tiles`. It waits up to `batch_wait_s` for a
batch to fill only while images are known to be on their way (`expecting`: being preprocessed): with nothing
coming, a lone image would wait for nobody. An image larger than a batch is split across passes. The queue is bounded in tiles:
past `max_queue_tiles` a request is refused at once (the caller retries elsewhere or later) rather than
queued behind minutes of work.
"""

import asyncio
import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import torch

from protos import tracing
from protos.errors import Overloaded
from vision_svc import metrics
from vision_svc.progress import ProgressWatch

log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class _Job:
    """One image's tiles; `output` is filled slice by slice as passes complete."""
    tiles: torch.Tensor  # [n, 3, H, W]
    output: torch.Tensor | None
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    next_tile: int = 0
    done_tiles: int = 0
    # For its spans (nanoseconds since the epoch): queued, first pass started, last pass ended; each pass's size.
    queued_ns: int = 0
    first_pass_ns: int = 0
    done_ns: int = 0
    batch_tiles: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Expected:
    """An image announced by `EncoderRunner.expecting`; `arrived` once its tiles are queued."""
    arrived: bool = False


class EncoderRunner:
    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], device: torch.device, dtype: torch.dtype,
                 max_batch_tiles: int, batch_wait_s: float, max_queue_tiles: int):
        """`encode` maps `[tiles, 3, H, W]` on `device` to `[tiles, tokens, hidden]`; it runs only on the worker."""
        self._encode = encode
        self._device = device
        self._dtype = dtype
        self.max_batch_tiles = max_batch_tiles
        self.batch_wait_s = batch_wait_s
        self.max_queue_tiles = max_queue_tiles
        self._queue: collections.deque[_Job] = collections.deque()
        self._queued_tiles = 0
        self._coming = 0  # images being prepared for `encode`
        self._cond = threading.Condition()
        self._stopping = False
        self.progress = ProgressWatch()  # the forward pass under way: one that never returns is a stuck device
        self._thread = threading.Thread(target=self._run, name="encoder-runner", daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def expecting(self):
        """Around the preparation of an image and its `encode(tiles, expected)`: until it is queued (or the block
        ends without it), a partly filled batch may wait for it."""
        expected = Expected()
        with self._cond:
            self._coming += 1
        try:
            yield expected
        finally:
            with self._cond:
                if not expected.arrived:
                    self._coming -= 1
                    self._cond.notify()

    async def encode(self, tiles: torch.Tensor, expected: Expected | None = None) -> torch.Tensor:
        """`[n, 3, H, W]` float pixels -> `[n * tokens, hidden]` embeddings on the CPU."""
        loop = asyncio.get_running_loop()
        job = _Job(tiles=tiles, output=None, future=loop.create_future(), loop=loop, queued_ns=time.time_ns())
        with self._cond:
            if self._stopping:
                raise Overloaded("vision encoder is shutting down")
            # An empty queue takes any image, so an image larger than the queue is slow, not refused forever.
            if self._queue and self._queued_tiles + len(tiles) > self.max_queue_tiles:
                raise Overloaded(f"vision queue full: {self._queued_tiles} tiles queued, limit "
                                 f"{self.max_queue_tiles}; retry later or on another replica")
            self._queue.append(job)
            self._queued_tiles += len(tiles)
            if expected is not None and not expected.arrived:  # queued and no longer coming, in one step
                expected.arrived = True
                self._coming -= 1
            metrics.QUEUE_TILES.set(self._queued_tiles)
            self._cond.notify()
        try:
            output = await asyncio.shield(job.future)
        except asyncio.CancelledError:
            job.future.cancel()  # the worker skips what is left of a cancelled job
            raise
        if tracing.current_span().is_recording():  # within a request (not the warm-up)
            tracing.record_span("batch_wait", job.queued_ns, job.first_pass_ns, {"tiles": len(tiles)})
            tracing.record_span("encode", job.first_pass_ns, job.done_ns,
                                {"tiles": len(tiles), "batch_tiles": job.batch_tiles})
        return output.reshape(-1, output.shape[-1])

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _take_batch(self) -> list[tuple[_Job, int, int]] | None:
        """Blocks for work, then gathers up to max_batch_tiles tiles: (job, start, end) slices."""
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            deadline = time.monotonic() + self.batch_wait_s
            while (self._coming and self._queued_tiles < self.max_batch_tiles
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)
            batch, room = [], self.max_batch_tiles
            while self._queue and room > 0:
                job = self._queue[0]
                take = min(room, len(job.tiles) - job.next_tile)
                batch.append((job, job.next_tile, job.next_tile + take))
                job.next_tile += take
                room -= take
                self._queued_tiles -= take
                if job.next_tile == len(job.tiles):
                    self._queue.popleft()
            metrics.QUEUE_TILES.set(self._queued_tiles)
            return batch

    def _run(self) -> None:
        while (batch := self._take_batch()) is not None:
            live = [(job, start, end) for job, start, end in batch if not job.future.done()]
            if not live:
                continue
            self.progress.started()
            try:
                self._forward(live)
            except Exception as error:  # noqa: BLE001 - a failed pass fails its requests, not the worker
                log.exception("encoder forward pass failed")
                for job, _, _ in live:
                    job.loop.call_soon_threadsafe(_fail, job.future, error)
            finally:
                self.progress.finished()

    def _pixels(self, batch: list[tuple[_Job, int, int]]) -> torch.Tensor:
        """The batch's tiles as one `[tiles, 3, H, W]` tensor on the device, in the encoder's dtype. One image's go as
        they are; several are copied straight into a buffer of that dtype. (`torch.cat` then `.to` copied the float
        pixels twice: 5 ms for the 5 tiles of one image on a CPU, the image's whole time in the batch queue.)"""
        if len(batch) == 1:
            job, start, end = batch[0]
            return job.tiles[start:end].to(self._device, self._dtype)
        tile_shape = batch[0][0].tiles.shape[1:]
        pixels = torch.empty((sum(end - start for _, start, end in batch), *tile_shape), dtype=self._dtype,
                             device=self._device)
        offset = 0
        for job, start, end in batch:
            pixels[offset:offset + end - start].copy_(job.tiles[start:end])
            offset += end - start
        return pixels

    def _forward(self, batch: list[tuple[_Job, int, int]]) -> None:
        started = time.perf_counter()
        started_ns = time.time_ns()
        with torch.inference_mode():
            pixels = self._pixels(batch)
            embeddings = self._encode(pixels).cpu()  # [tiles, tokens, hidden]
        metrics.BATCH_TILES.observe(len(pixels))
        metrics.TILES.inc(len(pixels))
        metrics.FORWARD_SECONDS.observe(time.perf_counter() - started)
        offset = 0
        for job, start, end in batch:
            if job.output is None:
                job.output = embeddings.new_empty((len(job.tiles), *embeddings.shape[1:]))
            job.output[start:end] = embeddings[offset:offset + end - start]
            offset += end - start
            job.done_tiles += end - start
            job.first_pass_ns = job.first_pass_ns or started_ns
            job.batch_tiles.append(len(pixels))
            if job.done_tiles == len(job.tiles):
                job.done_ns = time.time_ns()
                job.loop.call_soon_threadsafe(_resolve, job.future, job.output)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future, error: Exception) -> None:
    if not future.done():
        future.set_exception(error)
