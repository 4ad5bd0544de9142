"""vision_svc's end of the embedding data plane: each image's bytes go the way the request's offer asks.

The servicer asks a `RequestSender` for the messages of each encoded image. With a shared-memory offer the
bytes are written into the caller's slot for that image, with a mooncake offer into the caller's registered
buffer, with a socket offer they are framed on the caller's data connection; the gRPC message then carries
only the header. Whatever fails on the way (a slot
that cannot be opened, a full /dev/shm, a lease already over, a broken connection) sends the image inline
instead, so a data-plane fault costs speed, never a request.
"""

import asyncio
import contextlib
import dataclasses
import logging
import socket
import time
from collections.abc import Iterator

import torch

from protos import vision_pb2
from protos.transport import metrics as transfer_metrics
from protos.transport import mooncake_plane, negotiation, shared_memory, socket_plane
from protos.transport.errors import TransferError
from vision_svc.service import EncodedImage
from vision_svc.servicer import image_header_to_pb, image_to_pb

log = logging.getLogger(__name__)

# How long a call waits for the caller's data connection before its images go inline.
CONNECTION_WAIT_S = 2.0


@dataclasses.dataclass(frozen=True)
class SenderSettings:
    transports: tuple[int, ...]  # besides gRPC inline, which is always served
    shm_directory: str = shared_memory.DEFAULT_DIRECTORY
    data_host: str = "0.0.0.0"
    data_port: int = 0
    sweep_s: float = 10.0
    mooncake_protocol: str = "tcp"


class EmbeddingSender:
    def __init__(self, settings: SenderSettings, chunk_bytes: int):
        self.settings = settings
        self.instance_id = shared_memory.new_instance_id()
        self._chunk_bytes = chunk_bytes
        self._listener = (socket_plane.DataListener(settings.data_host, settings.data_port)
                          if negotiation.SOCKET in settings.transports else None)
        self._socket_port = 0
        self._sweeping: asyncio.Task | None = None

    async def start(self) -> None:
        if self._listener is not None:
            self._socket_port = await self._listener.start()
            log.info("data plane: socket transport on port %d", self._socket_port)
        if negotiation.SHM in self.settings.transports:
            self._sweeping = asyncio.create_task(self._sweep_forever())
        if negotiation.MOONCAKE in self.settings.transports and (reason := mooncake_plane.unavailable_reason()):
            log.warning("data plane: no mooncake transport: %s", reason)
            self.settings = dataclasses.replace(self.settings, transports=tuple(
                t for t in self.settings.transports if t != negotiation.MOONCAKE))

    async def _sweep_forever(self) -> None:
        """Segments of callers killed mid-transfer are unlinked here, since their owner cannot do it any more."""
        while True:
            await asyncio.to_thread(shared_memory.sweep_orphans, self.settings.shm_directory)
            await asyncio.sleep(self.settings.sweep_s)

    async def stop(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
        if self._listener is not None:
            await self._listener.close()

    def negotiate(self, request: vision_pb2.NegotiateDataPlaneRequest) -> vision_pb2.NegotiateDataPlaneResponse:
        return negotiation.answer(request, transports=self.settings.transports,
                                  shm_directory=self.settings.shm_directory, socket_port=self._socket_port,
                                  instance_id=self.instance_id)

    @contextlib.contextmanager
    def open(self, request: vision_pb2.EncodeRequest) -> Iterator["RequestSender"]:
        offer = request.data_plane if request.HasField("data_plane") else None
        sender = RequestSender(self, offer)
        try:
            yield sender
        finally:
            sender.close()


class RequestSender:
    """The messages of one Encode call's images, on the transport its offer names while that works.

    Shared memory is written before the image's message. A socket frame is sent after it, in the background:
    the receiver reads a frame only once its message announced it, so a frame larger than the socket's
    buffers, sent first, would wait forever. Frames go one after the other on the call's one connection."""

    def __init__(self, owner: EmbeddingSender, offer: vision_pb2.DataPlaneOffer | None):
        self._owner = owner
        self._offer = offer
        self._transport = offer.transport if offer is not None else negotiation.INLINE
        if self._transport not in owner.settings.transports:
            self._transport = negotiation.INLINE
        self._deadline = time.monotonic() + (offer.lease_ms / 1000 if offer is not None else 0)
        self._connection: socket.socket | None = None
        self._sending: asyncio.Task | None = None  # the last frame sent in the background

    async def messages(self, image: EncodedImage) -> list[vision_pb2.EncodeResponse]:
        started = time.perf_counter()
        if self._transport != negotiation.INLINE:
            data = _bytes_of(image.embeddings)
            try:
                await self._send(image.index, data, started)
            except TransferError as error:
                log.warning("image %d goes inline: %s", image.index, error)
                transfer_metrics.record(self._transport, "sender", 0, started, outcome="fallback")
                if self._transport == negotiation.SOCKET:
                    self._transport = negotiation.INLINE  # no connection, or a broken one: the rest go inline
            else:
                return [vision_pb2.EncodeResponse(image_index=image.index, header=image_header_to_pb(image),
                                                  last=True, transport=self._transport)]
        messages = list(image_to_pb(image, self._owner._chunk_bytes))
        transfer_metrics.record(negotiation.INLINE, "sender", image.embeddings.numel()
                                * image.embeddings.element_size(), started)
        return messages

    async def _send(self, index: int, data: memoryview, started: float) -> None:
        """Shared memory: writes the slot. Socket: queues the frame, to go once the message has."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TransferError("the caller's lease is over")
        if self._transport == negotiation.SHM:
            slots = self._offer.slots
            if index >= len(slots):
                raise TransferError(f"shared memory: no slot offered for image {index}")
            await asyncio.to_thread(shared_memory.write_slot, self._owner.settings.shm_directory, slots[index], data)
            transfer_metrics.record(self._transport, "sender", len(data), started)
            return
        if self._transport == negotiation.MOONCAKE:
            await asyncio.to_thread(self._write_mooncake, index, data)
            transfer_metrics.record(self._transport, "sender", len(data), started)
            return
        if self._sending is not None and self._sending.done() and self._sending.exception() is not None:
            raise TransferError(f"socket: an earlier frame failed: {self._sending.exception()}")
        if self._connection is None:
            self._connection = await self._owner._listener.claim(self._offer.socket_token,
                                                                 min(remaining, CONNECTION_WAIT_S))
        self._sending = asyncio.create_task(self._send_frame(self._sending, index, data, started))

    def _write_mooncake(self, index: int, data: memoryview) -> None:
        buffers, session = self._offer.mooncake_buffers, self._offer.mooncake_session
        if index >= len(buffers) or ":" not in session:
            raise TransferError(f"mooncake: no buffer offered for image {index}")
        try:
            engine = mooncake_plane.engine_for(mooncake_plane.local_address_towards(session.rpartition(":")[0]),
                                               self._owner.settings.mooncake_protocol)
        except OSError as error:
            raise TransferError(f"mooncake: no route to {session}: {error}") from None
        source = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
        engine.write(session, source, buffers[index], self._offer.mooncake_buffer_bytes)

    async def _send_frame(self, previous: asyncio.Task | None, index: int, data: memoryview, started: float) -> None:
        if previous is not None:
            await previous
        await asyncio.to_thread(socket_plane.send_frame, self._connection, index, data,
                                self._deadline - time.monotonic())
        transfer_metrics.record(negotiation.SOCKET, "sender", len(data), started)

    def close(self) -> None:
        """The call ended: its connection closes once its frames are out (or failed: the caller is gone)."""
        if self._connection is not None:
            connection = self._connection
            if self._sending is None:
                connection.close()
            else:
                self._sending.add_done_callback(lambda task: _close_after(task, connection))
        if self._offer is not None and self._offer.socket_token and self._owner._listener is not None:
            self._owner._listener.discard(self._offer.socket_token)


def _close_after(task: asyncio.Task, connection: socket.socket) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("socket: a frame was not sent whole: %s", task.exception())
    connection.close()


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy())



def sender_settings(config) -> SenderSettings:
    """From a VisionConfig: the socket transport is left out under TLS, since its bytes travel unencrypted."""
    names = [n for n in config.embedding_transports.split(",") if n and n != "grpc"]
    if "socket" in names and config.tls.enabled:
        log.warning("data plane: no socket transport with TLS (its bytes would travel unencrypted)")
        names.remove("socket")
    return SenderSettings(tuple(negotiation.BY_NAME[n] for n in names), config.shm_dir, config.host,
                          config.data_port, mooncake_protocol=config.mooncake_protocol)
