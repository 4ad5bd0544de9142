"""vision_svc's end of the embedding data plane: each image's bytes go the way the request's offer asks.

The servicer asks a `RequestSender` for the messages of each encoded image. With a shared-memory offer the
bytes are written into the caller's slot for that image, with a mooncake offer into the caller's registered
buffer, with a socket offer they are framed on the caller's data connection; the gRPC message then carries
only the header. With a device IPC offer, embeddings held on a device are exported as a handle that the message
carries, and held until the caller releases them (ReleaseDeviceMemory) or the lease is over; embeddings held on
the CPU go into the shared-memory slots offered beside it. Whatever fails on the way (a slot that cannot be
opened, a full /dev/shm, a lease already over, a broken connection, CPU embeddings and no slots) sends the image
inline instead, so a data-plane fault costs speed, never a request.
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
from protos.transport import device_ipc, mooncake_plane, negotiation, shared_memory, slot_writer, socket_plane
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
        self.slot_writer = slot_writer.SlotWriter(settings.shm_directory)
        self.device_exports = device_ipc.DeviceExports()

    async def start(self) -> None:
        if self._listener is not None:
            self._socket_port = await self._listener.start()
            log.info("data plane: socket transport on port %d", self._socket_port)
        if negotiation.MOONCAKE in self.settings.transports and (reason := mooncake_plane.unavailable_reason()):
            log.warning("data plane: no mooncake transport: %s", reason)
            self._without(negotiation.MOONCAKE)
        if negotiation.DEVICE_IPC in self.settings.transports and not device_ipc.available_kinds():
            log.warning("data plane: no device_ipc transport: no CUDA or NPU device in this process")
            self._without(negotiation.DEVICE_IPC)
        if {negotiation.SHM, negotiation.DEVICE_IPC} & set(self.settings.transports):
            self._sweeping = asyncio.create_task(self._sweep_forever())

    def _without(self, transport: int) -> None:
        self.settings = dataclasses.replace(self.settings, transports=tuple(
            t for t in self.settings.transports if t != transport))

    async def _sweep_forever(self) -> None:
        """Segments of callers killed mid-transfer are unlinked here, since their owner cannot do it any more;
        then the slots this process keeps mapped are let go of once their name is gone (or they sat idle), and
        device memory exported to callers that never released it once its lease is over."""
        while True:
            await asyncio.to_thread(shared_memory.sweep_orphans, self.settings.shm_directory)
            await asyncio.to_thread(self.slot_writer.drop_stale)
            if dropped := self.device_exports.drop_expired():
                log.warning("device IPC: %d exports were not released by their callers before their lease ended",
                            dropped)
            await asyncio.sleep(self.settings.sweep_s)

    async def stop(self) -> None:
        if self._sweeping is not None:
            self._sweeping.cancel()
        if self._listener is not None:
            await self._listener.close()
        self.slot_writer.close()

    def negotiate(self, request: vision_pb2.NegotiateDataPlaneRequest) -> vision_pb2.NegotiateDataPlaneResponse:
        return negotiation.answer(request, transports=self.settings.transports,
                                  shm_directory=self.settings.shm_directory, socket_port=self._socket_port,
                                  instance_id=self.instance_id, device_kinds=device_ipc.available_kinds()
                                  if negotiation.DEVICE_IPC in self.settings.transports else ())

    def release_device_memory(self, request: vision_pb2.ReleaseDeviceMemoryRequest
                              ) -> vision_pb2.ReleaseDeviceMemoryResponse:
        return vision_pb2.ReleaseDeviceMemoryResponse(released=self.device_exports.release(request.lease_ids))

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
        transport = self._transport_for(image.embeddings)
        if transport != negotiation.INLINE:
            try:
                handle = await self._send(transport, image, started)
            except TransferError as error:
                log.warning("image %d goes inline: %s", image.index, error)
                transfer_metrics.record(transport, "sender", 0, started, outcome="fallback")
                if transport == negotiation.SOCKET:
                    self._transport = negotiation.INLINE  # no connection, or a broken one: the rest go inline
            else:
                return [vision_pb2.EncodeResponse(image_index=image.index, header=image_header_to_pb(image),
                                                  last=True, transport=transport, device_handle=handle)]
        messages = list(image_to_pb(image, self._owner._chunk_bytes))
        transfer_metrics.record(negotiation.INLINE, "sender", image.embeddings.numel()
                                * image.embeddings.element_size(), started)
        return messages

    def _transport_for(self, embeddings: torch.Tensor) -> int:
        """Device IPC takes embeddings held on a device whose IPC this process has; the others go into the
        shared-memory slots offered beside it (the caller is on this host), or inline when there are none."""
        if self._transport != negotiation.DEVICE_IPC or device_ipc.backend(embeddings.device.type) is not None:
            return self._transport
        return negotiation.SHM if self._offer.slots and negotiation.SHM in self._owner.settings.transports \
            else negotiation.INLINE

    async def _send(self, transport: int, image: EncodedImage,
                    started: float) -> vision_pb2.DeviceMemoryHandle | None:
        """Device IPC: exports the embeddings, held until released or the lease ends. Shared memory: writes the
        slot. Socket: queues the frame, to go once the message has."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TransferError("the caller's lease is over")
        if transport == negotiation.DEVICE_IPC:
            handle = await asyncio.to_thread(self._owner.device_exports.export, image.embeddings, self._deadline)
            transfer_metrics.record(transport, "sender", image.embeddings.nbytes, started)
            return handle
        index, data = image.index, _bytes_of(image.embeddings)
        if transport == negotiation.SHM:
            slots = self._offer.slots
            if index >= len(slots):
                raise TransferError(f"shared memory: no slot offered for image {index}")
            await asyncio.to_thread(self._owner.slot_writer.write, slots[index], data)
            transfer_metrics.record(transport, "sender", len(data), started)
            return None
        if transport == negotiation.MOONCAKE:
            await asyncio.to_thread(self._write_mooncake, index, data)
            transfer_metrics.record(transport, "sender", len(data), started)
            return None
        if self._sending is not None and self._sending.done() and self._sending.exception() is not None:
            raise TransferError(f"socket: an earlier frame failed: {self._sending.exception()}")
        if self._connection is None:
            self._connection = await self._owner._listener.claim(self._offer.socket_token,
                                                                 min(remaining, CONNECTION_WAIT_S))
        self._sending = asyncio.create_task(self._send_frame(self._sending, index, data, started))
        return None

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
