"""The language stage's client of vision_svc: balanced over replicas, retried, cache-aware.

- Affinity: a request goes to the replica chosen by its first image's content hash, so the images of a
  multi-turn chat (resent every turn) land on the replica whose cache already holds them.
- Hash first: images this client sent recently go as their hash only; on NOT_FOUND (evicted, or another
  replica) the request is resent with bytes.
- On UNAVAILABLE (replica down) or RESOURCE_EXHAUSTED (replica full) the request is retried once on the
  next replica.
"""

import collections
import dataclasses
import logging

import grpc
import torch

from protos import errors, tensors, vision_pb2, vision_pb2_grpc
from protos.security import TlsFiles, open_channel
from protos.server import channel_options

log = logging.getLogger(__name__)

RECENT_HASHES = 4096


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


class VisionClient:
    def __init__(self, targets: list[str], max_message_bytes: int, max_embedding_bytes: int, *,
                 tls: TlsFiles = TlsFiles(), server_name: str | None = None, token: str | None = None):
        if not targets:
            raise ValueError("no vision_svc address given")
        self.targets = targets
        self._channels = [open_channel(t, channel_options(max_message_bytes), tls, server_name, token)
                          for t in targets]
        self._stubs = [vision_pb2_grpc.VisionEncoderStub(c) for c in self._channels]
        self._max_embedding_bytes = max_embedding_bytes
        # (replica, content hash) pairs recently encoded there: those may travel as hash only.
        self._recent: collections.OrderedDict[tuple[int, str], None] = collections.OrderedDict()

    async def get_info(self, timeout_s: float) -> vision_pb2.GetInfoResponse:
        """GetInfo from the first replica that answers."""
        last_error = None
        for target, stub in zip(self.targets, self._stubs):
            try:
                return await stub.GetInfo(vision_pb2.GetInfoRequest(), timeout=timeout_s, wait_for_ready=True)
            except grpc.aio.AioRpcError as error:
                if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    # Waiting for ready hides why no connection came up (a refused TLS handshake, a certificate
                    # for another name): one call that fails at once says it.
                    error = await _fail_fast(stub) or error
                last_error = errors.from_rpc_error(error, f"vision_svc {target}")
        raise errors.Unavailable(f"no vision_svc replica answered GetInfo: {last_error}")

    async def encode(self, request_id: str, images: list[ImageBlob], max_tiles: int,
                     timeout_s: float) -> list[ImageEmbedding]:
        """Embeddings of `images`, in order."""
        first = int(images[0].content_hash[:8], 16) % len(self._stubs)
        replicas = [first, (first + 1) % len(self._stubs)] if len(self._stubs) > 1 else [first]
        for attempt, replica in enumerate(replicas):
            try:
                return await self._encode_on(replica, request_id, images, max_tiles, timeout_s)
            except (errors.Unavailable, errors.Overloaded) as error:
                if attempt == len(replicas) - 1:
                    raise
                log.warning("vision_svc %s: %s; retrying on %s", self.targets[replica], error,
                            self.targets[replicas[attempt + 1]])
        raise AssertionError("unreachable")

    async def _encode_on(self, replica: int, request_id: str, images: list[ImageBlob], max_tiles: int,
                         timeout_s: float) -> list[ImageEmbedding]:
        send_bytes = [img.data is not None and (replica, img.content_hash) not in self._recent for img in images]
        try:
            return await self._call(replica, request_id, images, send_bytes, max_tiles, timeout_s)
        except errors.NotFound as miss:
            missing = {int(i) for k, v in miss.metadata if k == "missing-image-indices" for i in v.split(",")}
            if any(images[i].data is None for i in missing):
                raise errors.InvalidInput(f"images {sorted(i for i in missing if images[i].data is None)} are "
                                          "named by content hash but the vision stage does not hold them; "
                                          "send their bytes") from miss
            return await self._call(replica, request_id, images, [img.data is not None for img in images],
                                    max_tiles, timeout_s)

    async def _call(self, replica: int, request_id: str, images: list[ImageBlob], send_bytes: list[bool],
                    max_tiles: int, timeout_s: float) -> list[ImageEmbedding]:
        request = vision_pb2.EncodeRequest(
            request_id=request_id, options=vision_pb2.PreprocessOptions(max_tiles=max_tiles),
            images=[vision_pb2.ImageInput(data=img.data) if send else vision_pb2.ImageInput(content_hash=img.content_hash)
                    for img, send in zip(images, send_bytes)])
        results: list[ImageEmbedding | None] = [None] * len(images)
        assembling: dict[int, tuple[vision_pb2.ImageHeader, tensors.TensorAssembler]] = {}
        target = self.targets[replica]
        try:
            async for message in self._stubs[replica].Encode(request, timeout=timeout_s):
                index = message.image_index
                if message.HasField("header"):
                    assembling[index] = (message.header, tensors.TensorAssembler(message.header.tensor,
                                                                                 self._max_embedding_bytes))
                header, assembler = assembling[index]
                assembler.add(message.data)
                if message.last:
                    results[index] = ImageEmbedding(header.content_hash, header.num_tiles, assembler.finish(),
                                                    header.cache_hit)
                    self._remember(replica, header.content_hash)
        except grpc.aio.AioRpcError as error:
            raise errors.from_rpc_error(error, f"vision_svc {target}", stage="vision_svc") from error
        except (KeyError, IndexError, tensors.TensorFormatError) as error:
            raise errors.InternalError(f"vision_svc {target} sent a malformed stream: {error}") from error
        if any(r is None for r in results):
            raise errors.InternalError(f"vision_svc {target} ended the stream before sending every image")
        return results

    def _remember(self, replica: int, content_hash: str) -> None:
        self._recent[(replica, content_hash)] = None
        self._recent.move_to_end((replica, content_hash))
        while len(self._recent) > RECENT_HASHES:
            self._recent.popitem(last=False)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()


async def _fail_fast(stub: vision_pb2_grpc.VisionEncoderStub) -> grpc.aio.AioRpcError | None:
    try:
        await stub.GetInfo(vision_pb2.GetInfoRequest(), timeout=5)
    except grpc.aio.AioRpcError as error:
        return error
    return None
