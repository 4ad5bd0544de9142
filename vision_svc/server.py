"""Assembles the vision stage from its config: encoder, runner, preprocessing pool, cache, gRPC server."""

import asyncio
import logging
import os
import time
from collections.abc import Callable

import torch
from prometheus_client import start_http_server

from kernels import cpu as cpu_kernels
from protos import tensors, vision_pb2, vision_pb2_grpc
from protos.server import GrpcServer
from vision_svc import metrics
from vision_svc.cache import EmbeddingCache
from vision_svc.config import VisionConfig
from vision_svc.device_preprocess import DevicePreprocessPool
from vision_svc.encoder import load_encoder
from vision_svc.encoder_compile import BucketedEncoder, batch_buckets
from vision_svc.encoder_runner import EncoderRunner
from vision_svc.limits import RequestLimits
from vision_svc.preprocess import PreprocessPool
from vision_svc.progress import InHand, StallWatch
from vision_svc.service import TileSettings, VisionService
from vision_svc.servicer import VisionEncoderServicer
from vision_svc.transport_sender import EmbeddingSender, sender_settings
from vision_svc.video_servicer import VideoEncoding
from vision_svc.video_service import VideoService, video_info, video_settings

log = logging.getLogger(__name__)

SERVICE_NAME = vision_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    return getattr(torch, name)


def resolve_threads(requested: int | None) -> int:
    """Torch's intra-op threads: `requested`, else every CPU this process may use but one.

    The spare CPU keeps the event loop and the preprocessing workers off the encoder's cores, as vLLM's CPU
    worker keeps one for its scheduler. A thread more than there are free cores costs far more than it
    brings: every operator ends at a barrier that waits for whichever thread the kernel left off its core, so
    on a busy machine a CPU forward pass gets several times slower, not faster.
    """
    return requested or max(1, len(os.sched_getaffinity(0)) - 1)


def preprocess_in_threads(pool: str, device_type: str) -> bool:
    """--preprocess-pool: `auto` is threads where the encoder runs on the CPU. There preprocessing and the encoder
    share the same cores, and what a process pool adds (the tiles pickled, piped and unpickled) is CPU taken from
    both; with an accelerator the host's cores only feed it, and processes scale past the GIL."""
    return pool == "threads" or (pool == "auto" and device_type == "cpu")


class VisionServer:
    """The running stage; `start()` returns once it is warm and SERVING."""

    def __init__(self, config: VisionConfig):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.set_num_threads(resolve_threads(config.threads))
        encoder, self.spec = load_encoder(config.model, self.device, self.dtype, config.kernel_backend)
        if encoder.ops.name == "cpu" and self.dtype not in cpu_kernels.NATIVE_MATMUL_DTYPES:
            # kernels.cpu: torch's fallback for such a dtype is several times slower than float32.
            log.info("CPU: oneDNN has no %s matmuls on this CPU (bf16 needs AVX-512): the encoder's matmuls run in "
                     "float32 and round to %s", self.dtype, self.dtype)
        max_tiles = config.max_tiles or self.spec.max_dynamic_patch
        # Batch sizes that the warm-up runs: with --compile, every bucket, so none compiles under traffic.
        self.warm_up_batches = (1, config.max_batch_tiles)
        if config.compile:
            encoder = BucketedEncoder(encoder, batch_buckets(config.max_batch_tiles), self.device)
            self.warm_up_batches = encoder.buckets
        self.runner = EncoderRunner(encoder, self.device, self.dtype, config.max_batch_tiles,
                                    config.batch_wait_ms / 1000, config.max_queue_tiles)
        limits = RequestLimits.from_config(config)
        threads = preprocess_in_threads(config.preprocess_pool, self.device.type)
        if config.preprocess_on == "device":
            self.pool = DevicePreprocessPool(config.preprocess_workers, limits.image, self.device, self.dtype,
                                             decode_on_device=config.decode_on == "device", threads=threads)
        else:
            self.pool = PreprocessPool(config.preprocess_workers, limits.image, threads)
        self.cache = EmbeddingCache(config.cache_bytes)
        tiling = TileSettings(image_size=self.spec.image_size, min_tiles=self.spec.min_dynamic_patch,
                              max_tiles=max_tiles, default_thumbnail=self.spec.use_thumbnail,
                              tokens_per_tile=self.spec.tokens_per_tile)
        self.in_hand = InHand()  # images and videos being encoded, sent back should the work get stuck
        self.service = VisionService(tiling, limits, self.runner, self.pool, self.cache, self.in_hand)
        self.info = vision_pb2.GetInfoResponse(
            model=config.served_model_name or config.model.resolve().name, llm_hidden=self.spec.llm_hidden,
            dtype=tensors.dtype_to_proto(self.dtype), tokens_per_tile=tiling.tokens_per_tile,
            image_size=tiling.image_size, max_tiles=tiling.max_tiles,
            max_images_per_request=limits.max_images_per_request, max_image_bytes=limits.image.max_image_bytes,
            max_image_pixels=limits.image.max_image_pixels, use_thumbnail=tiling.default_thumbnail,
            min_tiles=tiling.min_tiles, max_request_bytes=limits.max_request_bytes)
        self.grpc = GrpcServer(config.host, config.port, limits.max_request_bytes, config.grace_s, tls=config.tls,
                               auth_token=config.auth_token, reflection=config.reflection,
                               health_port=config.health_port)
        self.sender = EmbeddingSender(sender_settings(config), config.chunk_bytes)
        videos = VideoEncoding(VideoService(video_settings(config, tiling), self.runner, self.pool, self.cache,
                                            self.in_hand),
                               config.chunk_bytes)
        self.info.MergeFrom(video_info(videos.service.settings))
        self.grpc.add_service(vision_pb2_grpc.add_VisionEncoderServicer_to_server,
                              VisionEncoderServicer(self.service, self.info, self.sender, videos), SERVICE_NAME)
        self._stall_watch: asyncio.Task | None = None

    async def start(self, before_serving: Callable[[], object] = lambda: None) -> int:
        """Warms up, runs `before_serving` (what the process does once up: `vision_svc.__main__` freezes its heap),
        then serves; returns the bound port."""
        port = await self.grpc.start()
        if self.config.metrics_port is not None:
            start_http_server(self.config.metrics_port, addr=self.config.host)
        await self.pool.warm_up()
        await self._warm_up()
        await self.sender.start()
        before_serving()
        await self.grpc.set_serving()
        watches = {"preprocessing": self.pool.progress, "encoder": self.runner.progress}
        for part, watch in watches.items():
            metrics.STALLED_SECONDS.labels(part).set_function(watch.stalled_s)
        if self.config.stall_timeout_s > 0:
            watch = StallWatch(watches, self.config.stall_timeout_s, self.stalled, self.moving_again)
            self._stall_watch = asyncio.create_task(watch.run())
        return port

    async def stalled(self, reason: str) -> None:
        """The stall watch found the work stuck: NOT_SERVING, and the work in hand goes back to its callers."""
        await self.grpc.set_not_serving(reason)
        sent_back = self.in_hand.send_back(reason)
        log.warning("%d images and videos in hand sent back to their callers (UNAVAILABLE), to be retried elsewhere",
                    sent_back)

    async def moving_again(self) -> None:
        log.warning("image work is moving again")
        self.in_hand.moving_again()
        await self.grpc.set_serving()

    async def _warm_up(self) -> None:
        """One pass at batch 1 and one full batch (every bucket when compiled), so that the first request pays
        no one-time costs."""
        size = self.spec.image_size
        started = time.perf_counter()
        for batch in self.warm_up_batches:
            batch_started = time.perf_counter()
            await self.runner.encode(torch.zeros(batch, 3, size, size))
            # With --compile each bucket compiles here: on large encoders minutes in all, so say where they go.
            log.info("warm-up pass of %d tiles: %.1f s", batch, time.perf_counter() - batch_started)
        log.info("warm: %s on %s (%s), %d tiles per batch, preprocessing on %d %s, warm-up %.1f s", self.info.model,
                 self.device, self.dtype, self.config.max_batch_tiles, max(self.pool.workers, 1),
                 "threads" if self.pool.in_threads else "processes", time.perf_counter() - started)

    async def stop(self) -> None:
        if self._stall_watch is not None:
            self._stall_watch.cancel()  # else it could turn a draining server SERVING again
        await self.grpc.drain()
        await self.sender.stop()
        self.runner.stop()
        self.pool.close()
