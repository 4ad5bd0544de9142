"""The handshake of the data plane: which transport one caller and one server use for embedding bytes.

The caller offers transports best first; the server accepts those it can use; the caller takes the first of
its offer that was accepted. Shared memory is accepted only with proof of one host: the caller creates a probe
segment holding a random nonce, the server opens it (read and write, as a slot would be) and returns what it
read. gRPC inline is always accepted: it is the fallback of every image.
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
SHM, SOCKET, INLINE, MOONCAKE = (vision_pb2.TRANSPORT_SHARED_MEMORY, vision_pb2.TRANSPORT_SOCKET,
                                 vision_pb2.TRANSPORT_GRPC_INLINE, vision_pb2.TRANSPORT_MOONCAKE)
# What --embedding-transport names, and the order `auto` offers them in, best first.
BY_NAME = {"shm": SHM, "socket": SOCKET, "grpc": INLINE, "mooncake": MOONCAKE}
AUTO_ORDER = (SHM, MOONCAKE, SOCKET, INLINE)


@dataclasses.dataclass(frozen=True)
class DataPlane:
    """What a caller and one server agreed."""
    transport: int
    socket_port: int = 0
    peer_instance: str = ""
    refusals: str = ""

    @property
    def name(self) -> str:
        return transport_name(self.transport)


INLINE_PLANE = DataPlane(INLINE)


async def negotiate(stub, instance_id: str, offered: tuple[int, ...], shm_directory: str,
                    timeout_s: float) -> DataPlane:
    """Caller side: asks the server behind `stub`; a server that predates the data plane gets gRPC inline."""
    probe = None
    refusals = []
    if SHM in offered:
        try:
            probe = shared_memory.SameHostProbe(shm_directory, instance_id)
        except OSError as error:
            refusals.append(f"shm: no probe segment in {shm_directory}: {error.strerror}")
            offered = tuple(t for t in offered if t != SHM)
    try:
        response = await stub.NegotiateDataPlane(vision_pb2.NegotiateDataPlaneRequest(
            protocol_version=PROTOCOL_VERSION, instance_id=instance_id, offered=offered,
            shm_probe_name=probe.name if probe else ""), timeout=timeout_s)
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
    if SHM in accepted and not probe.matches(response.shm_probe_nonce):
        refusals.append("shm: the server read another nonce: not the same shared memory")
        accepted.discard(SHM)
    if SOCKET in accepted and not response.socket_port:
        accepted.discard(SOCKET)
    chosen = next((t for t in offered if t in accepted), INLINE)
    return DataPlane(chosen, response.socket_port, response.instance_id, "; ".join(refusals))


def answer(request: vision_pb2.NegotiateDataPlaneRequest, *, transports: tuple[int, ...], shm_directory: str,
           socket_port: int, instance_id: str) -> vision_pb2.NegotiateDataPlaneResponse:
    """Server side: the transports of the offer that this server can use, and the probe's nonce."""
    accepted, refusals, nonce = [], [], b""
    for transport in request.offered:
        if transport == SHM and SHM in transports:
            try:
                nonce = shared_memory.read_probe(shm_directory, request.shm_probe_name)
                accepted.append(SHM)
            except TransferError as error:
                refusals.append(str(error))
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
        socket_port=socket_port if SOCKET in accepted else 0, refusals="; ".join(refusals))
