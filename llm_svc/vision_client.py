"""The language stage's client of vision_svc: balanced over replicas, retried, cache-aware.

- Replicas: every address the targets resolve to is one (`protos.endpoints`), re-resolved as DNS changes.
- Affinity: a request goes to the replica that its first image's content hash ranks first (rendezvous
  hashing), so the images of a multi-turn chat (resent every turn) land on the replica whose cache already
  holds them, and a replica joining or leaving moves only its own share of images.
- Hash first: images this client sent recently go as their hash only; on NOT_FOUND (evicted, or another
  replica) the request is resent with bytes.
- On UNAVAILABLE (replica down) or RESOURCE_EXHAUSTED (replica full) the request, of images or of videos, is
  retried once on the hash's second replica; UNAVAILABLE also asks for a new resolution of the names. A replica
  whose channel is failing (unreachable, or its health says NOT_SERVING: draining, its work stuck) goes last
  without a call.
- Embedding bytes come over the data plane negotiated with each replica (`embedding_receiver`): shared
  memory, a direct socket, or inline in the stream.
- Bytes held: each embedding's size is counted against the caller's budget (`hold_bytes`) when its header
  arrives, before anything is allocated for it; past the budget the call ends with Overloaded.
"""

import asyncio
import collections
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import torch

from llm_svc.embedding_receiver import INLINE_ONLY, CallReceiver, EmbeddingReceiver, ReceiverSettings
from llm_svc.video_client import VideoBlob, VideoEmbedding, VideoOptions, encode_videos
from protos import errors, tensors, tracing, vision_pb2, vision_pb2_grpc
from protos.endpoints import (DEFAULT_RETIRE_S, MIN_REFRESH_GAP_S, Address, Endpoint, EndpointSet, certificate_name,
                              down_last, rendezvous_order)
from protos.security import TlsFiles, open_channel
from protos.transport.errors import TransferError
from protos.server import channel_options, channel_state, connection_options

log = logging.getLogger(__name__)

RECENT_HASHES = 4096
MISSING_IMAGES_KEY = "missing-image-indices"  # vision_svc's NotFound names the images to resend under this key
# A replica that answered UNAVAILABLE (down, or found silent by keepalive) takes new images only after this long,
# and once its channel has connected again; until then its images go to their next replica.
UNAVAILABLE_COOLDOWN_S = 5.0

T = TypeVar("T")


def hold_nothing(nbytes: int) -> None:
    """The `hold_bytes` of a caller that keeps no budget."""


@dataclasses.dataclass(frozen=True)
class ImageBlob:
    """An image as bytes with their content hash, or as the hash alone (bytes sent in an earlier request)."""
    content_hash: str
    data: bytes | None


@dataclasses.dataclass(frozen=True)
class ImageEmbedding:
    content_hash: str
    num_tiles: int
    embeddings: torch.Tensor  # [num_tiles * tokens_per_tile, llm_hidden]
    cache_hit: bool


@dataclasses.dataclass(frozen=True)
class VisionReplica:
    channel: grpc.aio.Channel
    stub: vision_pb2_grpc.VisionEncoderStub


class VisionClient:
    def __init__(self, targets: list[str], max_message_bytes: int, max_embedding_bytes: int, *,
                 tls: TlsFiles = TlsFiles(), server_name: str | None = None, token: str | None = None,
                 retire_s: float = DEFAULT_RETIRE_S, data_plane: ReceiverSettings = INLINE_ONLY):
        if not targets:
            raise ValueError("no vision_svc address given")
        def open_to(address: Address, options: list[tuple[str, int | str]]) -> grpc.aio.Channel:
            return open_channel(address.target, options, tls, server_name or certificate_name(address), token)

        def connect(address: Address) -> VisionReplica:
            channel = open_to(address, channel_options(max_message_bytes))
            return VisionReplica(channel, vision_pb2_grpc.VisionEncoderStub(channel))

        # GetInfo at start asks a replica that may still be warming up (NOT_SERVING), which the replicas' channels,
        # as they check health, would not reach: the language engine then loads while the encoder warms.
        self._open_unchecked = lambda address: open_to(address, connection_options(max_message_bytes))

        async def close(replica: VisionReplica) -> None:
            await replica.channel.close()

        self._endpoints = EndpointSet(targets, connect, close, retire_s=retire_s)
        self._max_embedding_bytes = max_embedding_bytes
        self._receiver = EmbeddingReceiver(data_plane, max_embedding_bytes)
        # (replica address, content hash) pairs recently encoded there: those may travel as hash only.
        self._recent: collections.OrderedDict[tuple[str, str], None] = collections.OrderedDict()

    async def start(self) -> None:
        """Resolves the targets and keeps them current (without it, they are resolved on the first call only)."""
        await self._endpoints.start()

    async def get_info(self, timeout_s: float) -> vision_pb2.GetInfoResponse:
        """GetInfo from the first replica that answers, waiting up to `timeout_s` for one to exist and be reachable
        (serving or still warming up)."""
        deadline = time.monotonic() + timeout_s
        last_error = None
        while not (replicas := await self._endpoints.ensure_some()) and time.monotonic() < deadline:
            await asyncio.sleep(MIN_REFRESH_GAP_S)  # a name with no address yet: its replicas are starting
        for endpoint in replicas:
            async with self._open_unchecked(endpoint.address) as channel:
                stub = vision_pb2_grpc.VisionEncoderStub(channel)
                try:
                    return await stub.GetInfo(vision_pb2.GetInfoRequest(),
                                              timeout=max(deadline - time.monotonic(), 1), wait_for_ready=True)
                except grpc.aio.AioRpcError as error:
                    if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        # Waiting for ready hides why no connection came up (a refused TLS handshake, a certificate
                        # for another name): one call that fails at once says it.
                        error = await _fail_fast(stub) or error
                    last_error = errors.from_rpc_error(error, f"vision_svc {endpoint.address.target}")
        raise errors.Unavailable(f"no vision_svc replica answered GetInfo: {last_error or 'none resolved'}")

    async def encode(self, request_id: str, images: list[ImageBlob], max_tiles: int, timeout_s: float,
                     hold_bytes: Callable[[int], None] = hold_nothing) -> list[ImageEmbedding]:
        """Embeddings of `images`, in order; `hold_bytes(n)` is called before each embedding of n bytes is
        received, and may refuse it by raising (Overloaded). Embeddings of an attempt that failed stay counted:
        the budget errs on the side of holding too much, until the caller releases it all."""
        return await self._retried(images[0].content_hash, lambda replica: self._encode_on(
            replica, request_id, images, max_tiles, timeout_s, hold_bytes))

    async def _retried(self, content_hash: str, call: Callable[[Endpoint[VisionReplica]], Awaitable[T]]) -> T:
        """`call` on the replica that `content_hash` picks, and once more on the next one if that one was down
        (UNAVAILABLE) or full (RESOURCE_EXHAUSTED)."""
        replicas = (await self._ordered(content_hash))[:2]
        if not replicas:
            raise errors.Unavailable("vision_svc: no replica resolved",
                                     metadata=((errors.FAILED_STAGE_KEY, "vision_svc"),))
        for attempt, replica in enumerate(replicas):
            try:
                result = await call(replica)
            except (errors.Unavailable, errors.Overloaded) as error:
                # Without a peer the error is the caller's own budget, which another replica would not change.
                if error.peer is None:
                    raise
                if isinstance(error, errors.Unavailable):
                    replica.down_until = time.monotonic() + UNAVAILABLE_COOLDOWN_S
                    self._endpoints.refresh_soon()
                if attempt == len(replicas) - 1:
                    raise
                log.warning("vision_svc %s: %s; retrying on %s", replica.address.target, error,
                            replicas[attempt + 1].address.target)
                continue
            replica.down_until = 0.0
            return result
        raise AssertionError("unreachable")

    async def _ordered(self, content_hash: str) -> list[Endpoint[VisionReplica]]:
        """The replicas by their weight for `content_hash` (its cache's home first), those that are down last."""
        return down_last(rendezvous_order(content_hash, await self._endpoints.ensure_some()),
                         lambda replica: channel_state(replica.channel))

    async def _encode_on(self, replica: Endpoint[VisionReplica], request_id: str, images: list[ImageBlob],
                         max_tiles: int, timeout_s: float, hold_bytes: Callable[[int], None]) -> list[ImageEmbedding]:
        recent = [(replica.address.target, img.content_hash) in self._recent for img in images]
        send_bytes = [img.data is not None and not was_sent for img, was_sent in zip(images, recent)]
        try:
            return await self._call(replica, request_id, images, send_bytes, max_tiles, timeout_s, hold_bytes)
        except errors.NotFound as miss:
            missing = {int(i) for k, v in miss.metadata if k == MISSING_IMAGES_KEY for i in v.split(",")}
            if any(images[i].data is None for i in missing):
                raise errors.InvalidInput(f"images {sorted(i for i in missing if images[i].data is None)} are "
                                          "named by content hash but the vision stage does not hold them; "
                                          "send their bytes") from miss
            return await self._call(replica, request_id, images, [img.data is not None for img in images],
                                    max_tiles, timeout_s, hold_bytes)

    async def _call(self, replica: Endpoint[VisionReplica], request_id: str, images: list[ImageBlob],
                    send_bytes: list[bool], max_tiles: int, timeout_s: float,
                    hold_bytes: Callable[[int], None]) -> list[ImageEmbedding]:
        request = vision_pb2.EncodeRequest(
            request_id=request_id, options=vision_pb2.PreprocessOptions(max_tiles=max_tiles),
            images=[vision_pb2.ImageInput(data=img.data) if send else vision_pb2.ImageInput(content_hash=img.content_hash)
                    for img, send in zip(images, send_bytes)])
        results: list[ImageEmbedding | None] = [None] * len(images)
        assembling: dict[int, tuple[vision_pb2.ImageHeader, tensors.TensorAssembler]] = {}
        target = replica.address.target
        plane = await self._receiver.plane(target, replica.connection.stub)
        receiving = self._receiver.open_call(target, replica.address.host, plane, len(images), timeout_s)
        if receiving.offer is not None:
            request.data_plane.CopyFrom(receiving.offer)
        call = replica.connection.stub.Encode(request, timeout=timeout_s, metadata=tracing.outgoing_metadata())
        try:
            async for message in call:
                index = message.image_index
                if receiving.carries(message):
                    results[index] = await self._receive(target, message, receiving, hold_bytes)
                    continue
                if message.HasField("header"):
                    assembling[index] = (message.header, self._assembler(message.header.tensor, hold_bytes))
                header, assembler = assembling[index]
                assembler.add(message.data)
                if message.last:
                    results[index] = ImageEmbedding(header.content_hash, header.num_tiles, assembler.finish(),
                                                    header.cache_hit)
                    self._remember(target, header.content_hash)
            receiving.writer_finished()
        except grpc.aio.AioRpcError as error:
            self._receiver.forget(target)
            raise errors.from_rpc_error(error, f"vision_svc {target}", stage="vision_svc") from error
        except TransferError as error:
            self._receiver.forget(target)  # the data path broke (a replica killed mid-transfer): negotiate again
            raise errors.Unavailable(f"vision_svc {target}: {error}", peer=f"vision_svc {target}",
                                     metadata=((errors.FAILED_STAGE_KEY, "vision_svc"),)) from error
        except (KeyError, IndexError, tensors.TensorFormatError) as error:
            raise errors.InternalError(f"vision_svc {target} sent a malformed stream: {error}") from error
        finally:
            call.cancel()  # the replica drops the work of a stream left early (a no-op once it has ended)
            receiving.close()
        if any(r is None for r in results):
            raise errors.InternalError(f"vision_svc {target} ended the stream before sending every image")
        _annotate_wait(target, results)
        return results

    async def _receive(self, target: str, message: vision_pb2.EncodeResponse, receiving: CallReceiver,
                       hold_bytes: Callable[[int], None]) -> ImageEmbedding:
        """An image whose bytes came over the data plane: held, like an inline one, before it is received."""
        header = message.header
        dtype, shape, nbytes = tensors.checked_spec(header.tensor, self._max_embedding_bytes)
        hold_bytes(nbytes)
        embeddings = await receiving.receive(message, dtype, shape, nbytes)
        self._remember(target, header.content_hash)
        return ImageEmbedding(header.content_hash, header.num_tiles, embeddings, header.cache_hit)

    async def encode_videos(self, request_id: str, videos: list[VideoBlob], options: VideoOptions,
                            timeout_s: float, hold_bytes: Callable[[int], None] = hold_nothing
                            ) -> list[VideoEmbedding]:
        """Embeddings of `videos`, in order, from one Encode call of videos only (`video_client`), retried as
        images are."""
        return await self._retried(videos[0].content_hash, lambda replica: encode_videos(
            replica.connection.stub, replica.address.target, request_id, videos, options, timeout_s,
            lambda header: self._assembler(header, hold_bytes)))

    def _assembler(self, header: vision_pb2.TensorHeader,
                   hold_bytes: Callable[[int], None]) -> tensors.TensorAssembler:
        """Holds the bytes a header announces before the assembler allocates them; a header over the limit or
        malformed holds nothing, and the assembler refuses it."""
        nbytes = math.prod(header.shape) * tensors.dtype_from_proto(header.dtype).itemsize
        if min(header.shape, default=0) >= 0 and nbytes <= self._max_embedding_bytes:
            hold_bytes(nbytes)
        return tensors.TensorAssembler(header, self._max_embedding_bytes)

    def _remember(self, target: str, content_hash: str) -> None:
        self._recent[(target, content_hash)] = None
        self._recent.move_to_end((target, content_hash))
        while len(self._recent) > RECENT_HASHES:
            self._recent.popitem(last=False)

    @property
    def receiver(self) -> EmbeddingReceiver:
        return self._receiver

    async def close(self) -> None:
        await self._endpoints.close()
        self._receiver.close()


async def _fail_fast(stub: vision_pb2_grpc.VisionEncoderStub) -> grpc.aio.AioRpcError | None:
    try:
        await stub.GetInfo(vision_pb2.GetInfoRequest(), timeout=5)
    except grpc.aio.AioRpcError as error:
        return error
    return None


def _annotate_wait(target: str, results: list[ImageEmbedding]) -> None:
    """What the wait for the vision stage brought, on the current span (llm_svc's vision_wait)."""
    span = tracing.current_span()
    if span.is_recording():
        span.set_attributes({"vision.replica": target, "images": len(results),
                             "tiles": sum(r.num_tiles for r in results),
                             "bytes": sum(r.embeddings.nbytes for r in results),
                             "cache_hits": sum(r.cache_hit for r in results)})
