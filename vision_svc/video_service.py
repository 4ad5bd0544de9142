"""Encode requests for videos, below the wire: limits, cache, decoding and frame sampling, the encoder.

A video is decoded and its frames sampled in the preprocessing pool (`video_frames`, never on the event loop), each
frame becomes one tile, and the tiles of all its frames go to the encoder as one batch of work: its embeddings are
[frames * tokens_per_tile, llm_hidden], the frames in clip order. The cache holds them by the file's content and
the sampling options (other options sample other frames).
"""

import asyncio
import dataclasses
import re
import time
from collections.abc import AsyncIterator

import torch

from protos import vision_pb2
from protos.errors import InvalidInput, NotFound
from vision_svc import metrics
from vision_svc.cache import EmbeddingCache, content_hash
from vision_svc.encoder_runner import EncoderRunner
from vision_svc.preprocess import PreprocessPool
from vision_svc.progress import InHand
from vision_svc.service import EncodedImage, ImageSource
from vision_svc.tiling import normalize_tiles
from vision_svc.video_decode import DEFAULT_NUM_FRAMES, FrameSampling, VideoError, VideoLimits
from vision_svc.video_frames import decode_to_frame_pixels

_HASH = re.compile(r"^[0-9a-f]{64}$")
MISSING_VIDEOS_KEY = "missing-video-indices"


@dataclasses.dataclass(frozen=True)
class VideoCacheKey:
    content_hash: str
    sampling: FrameSampling


@dataclasses.dataclass(frozen=True)
class VideoSettings:
    max_videos_per_request: int
    limits: VideoLimits
    image_size: int  # side of a frame's tile
    tokens_per_tile: int

    @property
    def default_frames(self) -> int:
        return min(DEFAULT_NUM_FRAMES, self.limits.max_frames)


class VideoService:
    def __init__(self, settings: VideoSettings, runner: EncoderRunner, pool: PreprocessPool, cache: EmbeddingCache,
                 in_hand: InHand):
        self.settings = settings
        self._runner = runner
        self._pool = pool
        self._cache = cache
        self._in_hand = in_hand  # sent back if the stage's work gets stuck (server.py)

    def sampling(self, num_frames: int | None, fps: float | None) -> FrameSampling:
        """vLLM's options within this server's limits; None takes the defaults (vLLM's 32 frames, fewer when this
        server's limit is lower; no fps cap). As in vLLM, num_frames <= 0 means every frame and fps <= 0 no cap; the
        frames that makes are limited once the clip's length is known."""
        num_frames = self.settings.default_frames if num_frames is None else max(num_frames, -1) or -1
        fps = -1.0 if fps is None or not fps > 0 else fps
        limit = self.settings.limits.max_frames
        if num_frames > limit:
            raise InvalidInput(f"num_frames {num_frames} is over this server's limit of {limit} frames per video")
        return FrameSampling(num_frames=num_frames, fps=float(fps))

    async def encode(self, videos: list[ImageSource], sampling: FrameSampling) -> AsyncIterator[EncodedImage]:
        """Each video's embeddings as it is ready (`index` counts the request's videos)."""
        self._check(videos)
        digests = await asyncio.to_thread(
            lambda: [content_hash(v.data) if v.data is not None else v.content_hash for v in videos])
        keys = [VideoCacheKey(digest, sampling) for digest in digests]
        missing = [i for i, (video, key) in enumerate(zip(videos, keys))
                   if video.data is None and self._cache.get(key) is None]
        if missing:
            metrics.CACHE_MISSES.inc(len(missing))
            raise NotFound(f"videos {missing} named by content hash are not cached here with these options; "
                           "resend their bytes", metadata=((MISSING_VIDEOS_KEY, ",".join(map(str, missing))),))
        tasks = [asyncio.create_task(self._encode_one(i, video, key)) for i, (video, key) in
                 enumerate(zip(videos, keys))]
        try:
            for next_done in asyncio.as_completed(tasks):
                yield await next_done
        finally:
            for task in tasks:
                task.cancel()

    def _check(self, videos: list[ImageSource]) -> None:
        limit = self.settings.max_videos_per_request
        if len(videos) > limit:
            raise InvalidInput(f"{len(videos)} videos in one request; the limit is {limit}"
                               if limit else "this server does not encode videos (--max-videos-per-request 0)")
        for i, video in enumerate(videos):
            if video.data is not None:
                if len(video.data) > self.settings.limits.max_video_bytes:
                    raise InvalidInput(f"video {i}: {len(video.data)} bytes, over the limit of "
                                       f"{self.settings.limits.max_video_bytes}")
            elif video.content_hash is None or not _HASH.match(video.content_hash):
                raise InvalidInput(f"video {i}: neither bytes nor a content hash of 64 lowercase hex digits")

    async def _encode_one(self, index: int, video: ImageSource, key: VideoCacheKey) -> EncodedImage:
        tokens_per_tile = self.settings.tokens_per_tile
        if (cached := self._cache.get(key)) is not None:
            metrics.CACHE_HITS.inc()
            return EncodedImage(index, key.content_hash, len(cached) // tokens_per_tile, cached, True)
        if video.data is None:  # evicted since the check
            raise NotFound(f"video {index} named by content hash is no longer cached; resend its bytes",
                           metadata=((MISSING_VIDEOS_KEY, str(index)),))
        self._in_hand.refuse_if_stuck()
        work = asyncio.ensure_future(self._encoded(index, video.data, key))
        self._in_hand.hold(work)
        try:
            return await work
        except asyncio.CancelledError:
            self._in_hand.raise_if_sent_back(work)
            raise

    async def _encoded(self, index: int, data: bytes, key: VideoCacheKey) -> EncodedImage:
        metrics.CACHE_MISSES.inc()
        started = time.perf_counter()
        try:
            # Unwatched: decoding walks the clip up to its last sampled frame, which for a long clip can rightly
            # take longer than --stall-timeout-s.
            pixels = await self._pool.in_worker(decode_to_frame_pixels, data, self.settings.limits,
                                                key.sampling, self.settings.image_size, watched=False)
        except VideoError as error:
            raise InvalidInput(f"video {index}: {error}") from error
        tiles = torch.from_numpy(await asyncio.get_running_loop().run_in_executor(None, normalize_tiles, pixels))
        metrics.PREPROCESS_SECONDS.observe(time.perf_counter() - started)
        embeddings = await self._runner.encode(tiles)  # [frames * tokens_per_tile, llm_hidden]
        self._cache.put(key, embeddings)
        metrics.CACHE_BYTES.set(self._cache.bytes_used)
        return EncodedImage(index, key.content_hash, len(tiles), embeddings, False)


def video_settings(config, tiling) -> VideoSettings:
    """From the stage's `VisionConfig` and `TileSettings`."""
    return VideoSettings(max_videos_per_request=config.max_videos_per_request,
                         limits=VideoLimits(config.max_video_bytes, config.max_video_frames, config.max_video_seconds,
                                            config.max_video_frame_pixels),
                         image_size=tiling.image_size, tokens_per_tile=tiling.tokens_per_tile)


def video_info(settings: VideoSettings) -> vision_pb2.GetInfoResponse:
    """The GetInfo fields that describe this server's videos."""
    limits = settings.limits
    return vision_pb2.GetInfoResponse(
        max_videos_per_request=settings.max_videos_per_request, max_video_bytes=limits.max_video_bytes,
        max_video_frames=limits.max_frames, max_video_seconds=limits.max_seconds,
        max_video_frame_pixels=limits.max_frame_pixels, default_video_frames=settings.default_frames)
