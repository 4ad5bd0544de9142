"""Encode requests end to end, below the wire: limits, cache, preprocessing, the encoder, in that order.

It knows nothing of protobuf: the servicer converts requests into `ImageSource`s and `EncodeOptions`, and
streams the `EncodedImage`s it yields, in the order they finish. Each request is first admitted against the
stage's work limit (`admit`), holding its message's bytes until it ends.
"""

import asyncio
import dataclasses
import logging
import re
import time
from collections.abc import AsyncIterator

import torch

from protos import tracing
from protos.errors import InvalidInput, NotFound, Overloaded
from protos.work_limits import AdmittedWork, WorkLimit
from vision_svc import metrics
from vision_svc.cache import CacheKey, EmbeddingCache, content_hash
from vision_svc.encoder_runner import EncoderRunner
from vision_svc.image_decode import ImageError
from vision_svc.limits import RequestLimits
from vision_svc.preprocess import PreprocessPool
from vision_svc.progress import InHand
from vision_svc.tiling import TileOptions

log = logging.getLogger(__name__)

_HASH = re.compile(r"^[0-9a-f]{64}$")
MISSING_IMAGES_KEY = "missing-image-indices"


@dataclasses.dataclass(frozen=True)
class ImageSource:
    """Encoded bytes, or the content hash of bytes encoded before."""
    data: bytes | None = None
    content_hash: str | None = None


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    max_tiles: int
    use_thumbnail: bool


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    index: int
    content_hash: str
    num_tiles: int
    embeddings: torch.Tensor  # [num_tiles * tokens_per_tile, llm_hidden], on the CPU
    cache_hit: bool


@dataclasses.dataclass(frozen=True)
class TileSettings:
    """How the model cuts images into tiles: its geometry, and the defaults a request may narrow."""
    image_size: int  # side of a square tile, in pixels
    min_tiles: int
    max_tiles: int  # the default and the most a request may ask for
    default_thumbnail: bool
    tokens_per_tile: int  # embedding rows per tile


class VisionService:
    def __init__(self, tiling: TileSettings, limits: RequestLimits, runner: EncoderRunner, pool: PreprocessPool,
                 cache: EmbeddingCache, in_hand: InHand):
        self.tiling = tiling
        self.limits = limits
        self.work_limit = WorkLimit("vision_svc", limits.max_requests_in_flight, limits.max_bytes_in_flight)
        metrics.watch_work_limit(self.work_limit)
        self._runner = runner
        self._pool = pool
        self._cache = cache
        self._in_hand = in_hand  # sent back if the stage's work gets stuck (server.py)
        self._pending = 0
        self._waiters: dict[CacheKey, int] = {}

    def admit(self, request_bytes: int) -> AdmittedWork:
        """A slot for one request holding its message's bytes, or Overloaded (holding nothing) past the limits."""
        return self.work_limit.admit(request_bytes)

    def options(self, max_tiles: int, thumbnail: bool | None) -> EncodeOptions:
        """Per-request options within the server's limits; 0 / None take the defaults."""
        if max_tiles > self.tiling.max_tiles:
            raise InvalidInput(f"max_tiles {max_tiles} is over this server's limit of {self.tiling.max_tiles}")
        return EncodeOptions(max_tiles=max_tiles or self.tiling.max_tiles,
                             use_thumbnail=self.tiling.default_thumbnail if thumbnail is None else thumbnail)

    async def encode(self, images: list[ImageSource], options: EncodeOptions) -> AsyncIterator[EncodedImage]:
        self._check(images)
        # Off the event loop: 16 images of 20 MB take about 200 ms to hash (hashlib lets go of the GIL).
        digests = await asyncio.to_thread(_digests, images)
        keys = self._cached_or_sent(images, digests, options)
        tasks = [asyncio.create_task(self._encode_one(i, image, key))
                 for i, (image, key) in enumerate(zip(images, keys))]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()

    def _check(self, images: list[ImageSource]) -> None:
        """Validates every image before any work starts, so a bad request costs nothing."""
        if not images:
            raise InvalidInput("no images in the request")
        if len(images) > self.limits.max_images_per_request:
            raise InvalidInput(f"{len(images)} images in one request; the limit is "
                               f"{self.limits.max_images_per_request}")
        for i, image in enumerate(images):
            if image.data is not None:
                if len(image.data) > self.limits.image.max_image_bytes:
                    raise InvalidInput(f"image {i}: {len(image.data)} bytes, over the limit of "
                                       f"{self.limits.image.max_image_bytes}")
            elif image.content_hash is not None:
                if not _HASH.match(image.content_hash):
                    raise InvalidInput(f"image {i}: content_hash must be 64 lowercase hex digits (SHA-256)")
            else:
                raise InvalidInput(f"image {i}: neither bytes nor a content hash")

    def _cached_or_sent(self, images: list[ImageSource], digests: list[str], options: EncodeOptions
                        ) -> list[CacheKey]:
        """The images' cache keys; NotFound names those sent by hash alone that this replica does not hold."""
        keys = [CacheKey(digest, options.max_tiles, options.use_thumbnail) for digest in digests]
        missing = [i for i, (image, key) in enumerate(zip(images, keys))
                   if image.data is None and self._cache.get(key) is None and self._cache.in_flight(key) is None]
        if missing:
            metrics.CACHE_MISSES.inc(len(missing))
            raise NotFound(f"images {missing} named by content hash are not cached here; resend their bytes",
                           metadata=((MISSING_IMAGES_KEY, ",".join(map(str, missing))),))
        return keys

    async def _encode_one(self, index: int, image: ImageSource, key: CacheKey) -> EncodedImage:
        if (cached := self._cache.get(key)) is not None:
            return self._hit(index, key, cached)
        if (work := self._cache.in_flight(key)) is not None:
            return self._hit(index, key, await self._wait(key, work))
        if image.data is None:  # evicted since the check
            raise NotFound(f"image {index} named by content hash is no longer cached; resend its bytes",
                           metadata=((MISSING_IMAGES_KEY, str(index)),))
        self._in_hand.refuse_if_stuck()  # cached images are still served
        if self._pending >= self.limits.max_pending_images:
            raise Overloaded(f"{self._pending} images are being encoded, the limit of this replica; retry later "
                             "or on another replica")
        metrics.CACHE_MISSES.inc()
        # The work is shared by every request for the same image, so it is not tied to this one.
        self._pending += 1
        metrics.PENDING_IMAGES.set(self._pending)
        work = asyncio.ensure_future(self._run(index, image.data, key))
        self._in_hand.hold(work)
        work.add_done_callback(self._release)
        self._cache.track(key, work)
        embeddings = await self._wait(key, work)
        return EncodedImage(index, key.content_hash, len(embeddings) // self.tiling.tokens_per_tile, embeddings, False)

    async def _wait(self, key: CacheKey, work: asyncio.Future) -> torch.Tensor:
        """Awaits shared work; when its last waiter goes away (clients cancelled), the work is cancelled too."""
        self._waiters[key] = self._waiters.get(key, 0) + 1
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            self._in_hand.raise_if_sent_back(work)
            raise
        finally:
            self._waiters[key] -= 1
            if not self._waiters[key]:
                del self._waiters[key]
                work.cancel()  # nothing left to use the result (a no-op when it is done)

    def _release(self, _work: asyncio.Future) -> None:
        self._pending -= 1
        metrics.PENDING_IMAGES.set(self._pending)

    async def _run(self, index: int, data: bytes, key: CacheKey) -> torch.Tensor:
        started = time.perf_counter()
        with self._runner.expecting() as expected:  # a batch being gathered may wait for this image
            try:
                # Decoding included: the workers decode and tile in one pass (image_decode, a child, times the first).
                with tracing.span("preprocess") as span:
                    tiles = await self._pool.tiles(data, TileOptions(
                        max_tiles=key.max_tiles, use_thumbnail=key.use_thumbnail, image_size=self.tiling.image_size,
                        min_tiles=min(self.tiling.min_tiles, key.max_tiles)))
                    if span.is_recording():
                        span.set_attributes({"image.index": index, "image.bytes": len(data), "tiles": len(tiles)})
            except ImageError as error:
                raise InvalidInput(f"image {index}: {error}") from error
            metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - started)
            embeddings = await self._runner.encode(tiles, expected)
        self._cache.put(key, embeddings)
        metrics.CACHE_BYTES.set(self._cache.bytes_used)
        metrics.IMAGES.labels("encoder").inc()
        return embeddings

    def _hit(self, index: int, key: CacheKey, embeddings: torch.Tensor) -> EncodedImage:
        metrics.CACHE_HITS.inc()
        metrics.IMAGES.labels("cache").inc()
        return EncodedImage(index, key.content_hash, len(embeddings) // self.tiling.tokens_per_tile, embeddings, True)


def _digests(images: list[ImageSource]) -> list[str]:
    return [content_hash(image.data) if image.data is not None else image.content_hash for image in images]
