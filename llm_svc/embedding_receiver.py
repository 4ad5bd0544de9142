"""llm_svc's end of the embedding data plane: per vision replica a negotiated transport, per call an offer, per
image a tensor in memory this process owns.

- A replica's transport is negotiated on its first call, and again after a call to it failed (a restarted
  replica is a new peer, perhaps elsewhere). `--embedding-transport auto` takes the best both sides accept:
  shared memory (same host, proven by a probe), then mooncake (when offered), then the socket, then gRPC
  inline; a named transport is forced: a replica that cannot use it fails the call (UNAVAILABLE) instead of
  falling back.
- Shared memory: a call leases one slot per image (`SlotPool`), for as long as the call's deadline; an
  embedding received there is a tensor that views its slot, which returns to the pool when the tensor is freed
  (or a copy, when the pool runs short).
- Mooncake: a call registers one buffer per image with this process's transfer engine; the sender writes them.
- Socket: a call opens one data connection to the replica's data port, sending a fresh token, and reads each
  image's frame into a new tensor.
- Device IPC (with `device` set, e.g. cuda:0): the replica exports each image's device memory as a handle; it
  is opened here, copied into a tensor on `device`, and released (ReleaseDeviceMemory) once copied. The call
  also leases shared-memory slots when shared memory was accepted too: embeddings the replica holds on its CPU
  come that way.
- A call that finds no free slots goes inline; the sender may send any image inline (its transport failed).
"""

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import Callable

import grpc
import torch

from protos import errors, tensors, vision_pb2
from protos.transport import device_ipc
from protos.transport import metrics as transfer_metrics
from protos.transport import mooncake_plane, negotiation, shared_memory, socket_plane
from protos.transport.errors import TransferError

log = logging.getLogger(__name__)

GiB = 1 << 30
TRANSPORT_CHOICES = ("auto", "device_ipc", "shm", "socket", "grpc", "mooncake")
# How long a release of device memory may take; the replica lets go at the lease's end anyway.
RELEASE_TIMEOUT_S = 5.0
_releasing: set[asyncio.Task] = set()  # releases still under way, kept from the garbage collector


@dataclasses.dataclass(frozen=True)
class ReceiverSettings:
    transport: str = "auto"  # one of TRANSPORT_CHOICES
    shm_directory: str = shared_memory.DEFAULT_DIRECTORY
    shm_max_bytes: int = 2 * GiB  # most bytes of slots at once (each slot's pages are taken when it is made)
    negotiate_timeout_s: float = 5.0
    mooncake_protocol: str | None = None  # offered by auto only when set (and the package imports)
    device: str = ""  # where device IPC puts embeddings ("cuda:0", "npu:0"); empty: device IPC is not offered

    def __post_init__(self):
        if self.transport not in TRANSPORT_CHOICES:
            raise ValueError(f"--embedding-transport must be one of {', '.join(TRANSPORT_CHOICES)}, "
                             f"got {self.transport!r}")
        if self.shm_max_bytes < 0:
            raise ValueError("--shm-max-bytes must be >= 0")
        if self.device:
            try:
                torch.device(self.device)
            except RuntimeError as error:
                raise ValueError(f"--embedding-device: {error}") from None
        elif self.transport == "device_ipc":
            raise ValueError("--embedding-transport device_ipc needs --embedding-device")

    @property
    def device_kind(self) -> str:
        """The kind of device offered for device IPC: `device`'s, when this process has its IPC."""
        kind = torch.device(self.device).type if self.device else ""
        return kind if kind and device_ipc.backend(kind) is not None else ""

    @property
    def offered(self) -> tuple[int, ...]:
        if self.transport == "auto":
            left_out = set()
            if self.mooncake_protocol is None or mooncake_plane.unavailable_reason() is not None:
                left_out.add(negotiation.MOONCAKE)
            if not self.device_kind:
                left_out.add(negotiation.DEVICE_IPC)
            return tuple(t for t in negotiation.AUTO_ORDER if t not in left_out)
        return (negotiation.BY_NAME[self.transport],)


INLINE_ONLY = ReceiverSettings(transport="grpc")


class EmbeddingReceiver:
    def __init__(self, settings: ReceiverSettings, slot_bytes: int):
        """`slot_bytes`: the largest embedding of one image (narrowed by `set_slot_bytes` once GetInfo is known)."""
        self.settings = settings
        self.instance_id = shared_memory.new_instance_id()
        self._slot_bytes = slot_bytes
        self._planes: dict[str, negotiation.DataPlane] = {}
        self._stubs: dict[str, object] = {}  # per replica, for releasing device memory
        self._pool: shared_memory.SlotPool | None = None

    def set_slot_bytes(self, slot_bytes: int) -> None:
        """Before the first call: slots the size of the largest embedding the vision stage can send."""
        self._slot_bytes = min(self._slot_bytes, slot_bytes)

    @property
    def pool(self) -> shared_memory.SlotPool | None:
        return self._pool

    async def plane(self, target: str, stub) -> negotiation.DataPlane:
        """The transport agreed with the replica at `target`, negotiated when not known."""
        if stub is not None:
            self._stubs[target] = stub
        if (known := self._planes.get(target)) is not None:
            return known
        if self.settings.transport == "grpc":
            plane = negotiation.INLINE_PLANE
        else:
            try:
                plane = await negotiation.negotiate(stub, self.instance_id, self.settings.offered,
                                                    self.settings.shm_directory, self.settings.negotiate_timeout_s,
                                                    self.settings.device_kind)
            except grpc.aio.AioRpcError as error:
                raise errors.from_rpc_error(error, f"vision_svc {target}", stage="vision_svc") from error
            log.info("data plane with vision_svc %s: %s%s", target, plane.name,
                     f" ({plane.refusals})" if plane.refusals else "")
        if self.settings.transport not in ("auto", plane.name):
            raise errors.Unavailable(f"vision_svc {target} cannot use the forced embedding transport "
                                     f"{self.settings.transport}: {plane.refusals or 'not accepted'}",
                                     metadata=((errors.FAILED_STAGE_KEY, "vision_svc"),), peer=target)
        self._planes[target] = plane
        return plane

    def forget(self, target: str) -> None:
        """After a failed call: the next one negotiates again."""
        self._planes.pop(target, None)

    def open_call(self, target: str, host: str, plane: negotiation.DataPlane, image_count: int,
                  timeout_s: float) -> "CallReceiver":
        """One call's receiving end; the caller closes it when the call ends, however it ends."""
        mooncake = None
        if plane.transport == negotiation.MOONCAKE:
            try:
                engine = mooncake_plane.engine_for(mooncake_plane.local_address_towards(host),
                                                   self.settings.mooncake_protocol or "tcp")
                mooncake = MooncakeBuffers(engine, image_count, self._slot_bytes)
            except (TransferError, OSError) as error:
                log.warning("mooncake: %s; this call goes inline", error)
        device = None
        if plane.transport == negotiation.DEVICE_IPC:
            device = DeviceCopies(plane.device_kind, torch.device(self.settings.device), self._stubs.get(target))
        with_slots = plane.transport == negotiation.SHM or plane.shm_beside
        return CallReceiver(self._lease(image_count, timeout_s) if with_slots else None,
                            (host, plane.socket_port) if plane.transport == negotiation.SOCKET else None, timeout_s,
                            mooncake, on_socket_failure=lambda error: self._without_socket(target, error),
                            device=device)

    def _without_socket(self, target: str, error: BaseException) -> None:
        """The replica's data port cannot be reached (a firewall, a policy): its calls go inline from now on,
        rather than each waiting for a connection that will not come."""
        if self.settings.transport == "auto" and self._planes.get(target, negotiation.INLINE_PLANE).transport \
                == negotiation.SOCKET:
            log.warning("data plane with vision_svc %s: %s; inline from now on", target, error)
            self._planes[target] = dataclasses.replace(negotiation.INLINE_PLANE, refusals=str(error))

    def _lease(self, image_count: int, timeout_s: float) -> shared_memory.SlotLease | None:
        if self._pool is None:
            max_slots = max(self.settings.shm_max_bytes // max(self._slot_bytes, 1), 0)
            if not max_slots:
                return None
            self._pool = shared_memory.SlotPool(self.settings.shm_directory, self._slot_bytes, max_slots,
                                                self.instance_id)
        return self._pool.lease(image_count, timeout_s)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


class MooncakeBuffers:
    """One registered buffer per image of a call, each the size of a slot; this process's memory."""

    def __init__(self, engine: mooncake_plane.MooncakeEngine, count: int, nbytes: int):
        engine.release_expired()
        self.engine = engine
        self.nbytes = nbytes
        self.buffers: list[torch.Tensor | None] = []
        try:
            for _ in range(count):
                buffer = torch.empty(nbytes, dtype=torch.uint8)
                engine.register(buffer)
                self.buffers.append(buffer)
        except TransferError:
            self.close(writer_finished=True, deadline=0)  # nothing was offered yet: no writer
            raise

    def take(self, index: int, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
        buffer = self.buffers[index] if 0 <= index < len(self.buffers) else None
        if buffer is None or nbytes > self.nbytes:
            raise TransferError(f"mooncake: no buffer of {nbytes} bytes for image {index}")
        self.buffers[index] = None
        self.engine.unregister(buffer)  # written: the sender returned before announcing it
        return buffer[:nbytes].view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)

    def close(self, writer_finished: bool, deadline: float) -> None:
        left = [b for b in self.buffers if b is not None]
        self.buffers = []
        if writer_finished:
            for buffer in left:
                self.engine.unregister(buffer)
        else:
            self.engine.retire(left, deadline)


class DeviceCopies:
    """Device IPC for one call: each image's export copied onto `device`, then released to the replica."""

    def __init__(self, kind: str, device: torch.device, stub):
        self.kind = kind
        self.device = device
        self._stub = stub

    async def take(self, handle: vision_pb2.DeviceMemoryHandle, dtype: torch.dtype, shape: tuple[int, ...],
                   nbytes: int) -> torch.Tensor:
        try:
            return await asyncio.to_thread(device_ipc.open_copy, handle, self.kind, dtype, shape, nbytes, self.device)
        finally:  # copied, or failed: the replica need not hold it any longer either way
            task = asyncio.create_task(self._release(handle.lease_id))
            _releasing.add(task)
            task.add_done_callback(_releasing.discard)

    async def _release(self, lease_id: str) -> None:
        if self._stub is None:
            return  # no channel to the replica known: it lets go at the lease's end
        try:
            await self._stub.ReleaseDeviceMemory(vision_pb2.ReleaseDeviceMemoryRequest(lease_ids=[lease_id]),
                                                 timeout=RELEASE_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            log.warning("device IPC: releasing lease %s failed (%s); the replica drops it when it ends",
                        lease_id, error.code().name)


class CallReceiver:
    """One Encode call's end of the data plane: its offer, and a tensor for each image sent outside the stream."""

    def __init__(self, lease: shared_memory.SlotLease | None, data_address: tuple[str, int] | None,
                 timeout_s: float, mooncake: MooncakeBuffers | None = None,
                 on_socket_failure: Callable[[BaseException], None] = lambda error: None,
                 device: DeviceCopies | None = None):
        self._lease = lease
        self._mooncake = mooncake
        self._device = device
        self._deadline = time.monotonic() + timeout_s
        self._writer_finished = False
        self._token = socket_plane.new_token() if data_address else b""
        self._connecting: asyncio.Task | None = None
        if data_address is not None:
            self._connecting = asyncio.create_task(asyncio.to_thread(
                socket_plane.open_data_connection, *data_address, self._token, min(timeout_s, 10.0)))
            self._connecting.add_done_callback(
                lambda task: task.cancelled() or task.exception() is None or on_socket_failure(task.exception()))

    @property
    def offer(self) -> vision_pb2.DataPlaneOffer | None:
        lease_ms = max(int((self._deadline - time.monotonic()) * 1000), 1)
        if self._device is not None:  # with the slots of shared memory beside it, when it was accepted too
            slots = self._lease.offer().slots if self._lease is not None else []
            return vision_pb2.DataPlaneOffer(transport=negotiation.DEVICE_IPC, lease_ms=lease_ms, slots=slots)
        if self._lease is not None:
            return self._lease.offer()
        if self._connecting is not None:
            return vision_pb2.DataPlaneOffer(transport=negotiation.SOCKET, socket_token=self._token,
                                             lease_ms=lease_ms)
        if self._mooncake is not None:
            return vision_pb2.DataPlaneOffer(
                transport=negotiation.MOONCAKE, lease_ms=lease_ms, mooncake_session=self._mooncake.engine.session,
                mooncake_buffers=[b.data_ptr() for b in self._mooncake.buffers],
                mooncake_buffer_bytes=self._mooncake.nbytes)
        return None

    @staticmethod
    def carries(message: vision_pb2.EncodeResponse) -> bool:
        """Whether the message's image came outside the stream (it then has the header, `last`, no data)."""
        return message.transport in (negotiation.SHM, negotiation.SOCKET, negotiation.MOONCAKE,
                                     negotiation.DEVICE_IPC)

    async def receive(self, message: vision_pb2.EncodeResponse, dtype: torch.dtype, shape: tuple[int, ...],
                      nbytes: int) -> torch.Tensor:
        started = time.perf_counter()
        if message.transport == negotiation.SHM:
            if self._lease is None:
                raise TransferError("shared memory: an image came in a slot, but none was offered")
            tensor = self._lease.take(message.image_index, dtype, shape, nbytes)
        elif message.transport == negotiation.DEVICE_IPC:
            if self._device is None:
                raise TransferError("device IPC: an image came as a device handle, but none was offered")
            tensor = await self._device.take(message.device_handle, dtype, shape, nbytes)
        elif message.transport == negotiation.MOONCAKE:
            if self._mooncake is None:
                raise TransferError("mooncake: an image came in a registered buffer, but none was offered")
            tensor = self._mooncake.take(message.image_index, dtype, shape, nbytes)
        else:
            if self._connecting is None:
                raise TransferError("socket: an image came on a data connection, but none was offered")
            conn = await self._connecting
            tensor = await asyncio.to_thread(socket_plane.receive_frame, conn, message.image_index, dtype, shape,
                                             nbytes, self._deadline - time.monotonic())
        transfer_metrics.record(message.transport, "receiver", nbytes, started)
        return tensor

    def writer_finished(self) -> None:
        """The stream ended normally: the sender writes nothing more, so unread slots may be reused."""
        self._writer_finished = True

    def close(self) -> None:
        if self._lease is not None:
            self._lease.close(self._writer_finished)
        if self._mooncake is not None:
            self._mooncake.close(self._writer_finished, self._deadline)
        if self._connecting is not None:
            # A connection still being opened is closed when it opens (the thread cannot be stopped).
            self._connecting.add_done_callback(_close_connection)


def _close_connection(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is None:
        conn: socket.socket = task.result()
        conn.close()


def largest_embedding_bytes(info: vision_pb2.GetInfoResponse) -> int:
    """The most bytes one image's embeddings take with this vision stage's tiling: the size of a slot."""
    tiles = max(info.max_tiles, 1) + (1 if info.use_thumbnail else 0)
    itemsize = tensors.dtype_from_proto(info.dtype).itemsize if info.dtype else 4
    return tiles * max(info.tokens_per_tile, 1) * max(info.llm_hidden, 1) * itemsize
