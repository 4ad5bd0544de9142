"""The handshake of the data plane: which transport one caller and one server use for embedding bytes.

The caller offers transports best first; the server accepts those it can use; the caller takes the first of
its offer that was accepted. Shared memory is accepted only with proof of one host: the caller creates a probe
segment holding a random nonce, the server opens it (read and write, as a slot would be) and returns what it
read. Device IPC needs the same proof, and both sides naming the same kind of device (the caller the one it
wants embeddings on, the server one whose IPC it can export). gRPC inline is always accepted: it is the fallback
of every image.
"""

import dataclasses
import logging

import grpc

from protos import vision_pb2
from protos.transport import shared_memory
from protos.transport.errors import TransferError
from protos.transport.metrics import transport_name

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
SHM, SOCKET, INLINE, MOONCAKE, DEVICE_IPC = (
    vision_pb2.TRANSPORT_SHARED_MEMORY, vision_pb2.TRANSPORT_SOCKET, vision_pb2.TRANSPORT_GRPC_INLINE,
    vision_pb2.TRANSPORT_MOONCAKE, vision_pb2.TRANSPORT_DEVICE_IPC)
# What --embedding-transport names, and the order `auto` offers them in, best first.
BY_NAME = {"device_ipc": DEVICE_IPC, "shm": SHM, "socket": SOCKET, "grpc": INLINE, "mooncake": MOONCAKE}
AUTO_ORDER = (DEVICE_IPC, SHM, MOONCAKE, SOCKET, INLINE)
# Transports that need the probe's proof of one host.
SAME_HOST = (DEVICE_IPC, SHM)


@dataclasses.dataclass(frozen=True)
class DataPlane:
    """What a caller and one server agreed."""
    transport: int
    socket_port: int = 0
    peer_instance: str = ""
    refusals: str = ""
    device_kind: str = ""  # DEVICE_IPC: the kind of device both sides hold embeddings on
    shm_beside: bool = False  # DEVICE_IPC: shared memory accepted too, for embeddings the server holds on the CPU

    @property
    def name(self) -> str:
        return transport_name(self.transport)


INLINE_PLANE = DataPlane(INLINE)


async def negotiate(stub, instance_id: str, offered: tuple[int, ...], shm_directory: str,
                    timeout_s: float, device_kind: str = "") -> DataPlane:
    """Caller side: asks the server behind `stub`; a server that predates the data plane gets gRPC inline.
    `device_kind`: the kind of device this caller wants embeddings on, for device IPC."""
    probe = None
    refusals = []
    if not device_kind:
        offered = tuple(t for t in offered if t != DEVICE_IPC)
    if any(t in SAME_HOST for t in offered):
        try:
            probe = shared_memory.SameHostProbe(shm_directory, instance_id)
        except OSError as error:
            refusals.append(f"shm: no probe segment in {shm_directory}: {error.strerror}")
            offered = tuple(t for t in offered if t not in SAME_HOST)
    try:
        response = await stub.NegotiateDataPlane(vision_pb2.NegotiateDataPlaneRequest(
            protocol_version=PROTOCOL_VERSION, instance_id=instance_id, offered=offered,
            shm_probe_name=probe.name if probe else "", device_kind=device_kind if DEVICE_IPC in offered else ""),
            timeout=timeout_s)
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        return DataPlane(INLINE, refusals="the server has no data plane")
    finally:
        if probe is not None:
            probe.close()
    accepted = set(response.accepted)
    if response.refusals:
        refusals.append(response.refusals)
    if accepted & set(SAME_HOST) and not probe.matches(response.shm_probe_nonce):
        refusals.append("shm: the server read another nonce: not the same shared memory")
        accepted -= set(SAME_HOST)
    if DEVICE_IPC in accepted and response.device_kind != device_kind:
        refusals.append(f"device_ipc: the server exports {response.device_kind or 'no device'}, not {device_kind}")
        accepted.discard(DEVICE_IPC)
    if SOCKET in accepted and not response.socket_port:
        accepted.discard(SOCKET)
    chosen = next((t for t in offered if t in accepted), INLINE)
    device = chosen == DEVICE_IPC
    return DataPlane(chosen, response.socket_port, response.instance_id, "; ".join(refusals),
                     device_kind if device else "", shm_beside=device and SHM in offered and SHM in accepted)


def answer(request: vision_pb2.NegotiateDataPlaneRequest, *, transports: tuple[int, ...], shm_directory: str,
           socket_port: int, instance_id: str,
           device_kinds: tuple[str, ...] = ()) -> vision_pb2.NegotiateDataPlaneResponse:
    """Server side: the transports of the offer that this server can use, and the probe's nonce.
    `device_kinds`: the kinds of device whose IPC this server can export."""
    accepted, refusals, nonce = [], [], b""
    same_host = None  # whether the probe could be read, once asked
    for transport in request.offered:
        if transport in SAME_HOST and transport in transports:
            if transport == DEVICE_IPC and request.device_kind not in device_kinds:
                refusals.append(f"device_ipc: no {request.device_kind or 'device'} IPC here")
                continue
            if same_host is None:
                try:
                    nonce = shared_memory.read_probe(shm_directory, request.shm_probe_name)
                    same_host = True
                except TransferError as error:
                    refusals.append(str(error))
                    same_host = False
            if same_host:
                accepted.append(transport)
        elif transport == SOCKET and SOCKET in transports and socket_port:
            accepted.append(SOCKET)
        elif transport == MOONCAKE and MOONCAKE in transports:
            accepted.append(MOONCAKE)
        elif transport == INLINE:
            accepted.append(INLINE)
        elif transport != INLINE:
            refusals.append(f"{transport_name(transport)}: not served here")
    if INLINE not in accepted:
        accepted.append(INLINE)
    return vision_pb2.NegotiateDataPlaneResponse(
        protocol_version=PROTOCOL_VERSION, instance_id=instance_id, accepted=accepted, shm_probe_nonce=nonce,
        socket_port=socket_port if SOCKET in accepted else 0, refusals="; ".join(refusals),
        device_kind=request.device_kind if DEVICE_IPC in accepted else "")
