"""Per-transfer metrics of the data plane, shared by both stages (one registry per process)."""

import time

from prometheus_client import Counter, Histogram

from protos import vision_pb2

TRANSPORT_NAMES = {
    vision_pb2.TRANSPORT_UNSPECIFIED: "grpc",
    vision_pb2.TRANSPORT_GRPC_INLINE: "grpc",
    vision_pb2.TRANSPORT_SHARED_MEMORY: "shm",
    vision_pb2.TRANSPORT_SOCKET: "socket",
    vision_pb2.TRANSPORT_MOONCAKE: "mooncake",
    vision_pb2.TRANSPORT_DEVICE_IPC: "device_ipc",
}

TRANSFER_BYTES = Counter("embedding_transfer_bytes", "Embedding bytes moved between the stages",
                         ["transport", "role"])
TRANSFERS = Counter("embedding_transfers", "Embedding transfers (one per image), by outcome: ok, or fallback when "
                    "the negotiated transport failed and the image went inline", ["transport", "role", "outcome"])
TRANSFER_SECONDS = Histogram("embedding_transfer_seconds", "Time to move one image's embeddings (sender: writing "
                             "them out; receiver: from the image's header to a tensor)", ["transport", "role"],
                             buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))


def transport_name(transport: int) -> str:
    return TRANSPORT_NAMES.get(transport, "unknown")


def record(transport: int, role: str, nbytes: int, started: float, outcome: str = "ok") -> None:
    """One transfer of `nbytes` that began at `started` (time.perf_counter); role is "sender" or "receiver"."""
    name = transport_name(transport)
    TRANSFER_BYTES.labels(name, role).inc(nbytes)
    TRANSFERS.labels(name, role, outcome).inc()
    TRANSFER_SECONDS.labels(name, role).observe(time.perf_counter() - started)
