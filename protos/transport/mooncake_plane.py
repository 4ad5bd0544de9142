"""Mooncake Transfer Engine as a transport, optional: used when the `mooncake` module imports (the package
`mooncake-transfer-engine`, or its `-non-cuda` build on hosts without CUDA; it needs libibverbs) and both stages
enable it.

The receiver registers one buffer per image of a call with its engine and offers their addresses and its
session ("host:port"; engines handshake peer to peer, no metadata server). The sender registers its embeddings
and writes them into the receiver's buffer with `transfer_sync_write` before sending the image's header: RDMA
between hosts with RDMA NICs (`--mooncake-protocol rdma`), TCP anywhere else. A buffer that the sender may still
be writing (a failed call) is kept registered and alive until the lease is over, then freed.
"""

import logging
import socket
import threading
import time

import torch

from protos.transport.errors import TransferError

log = logging.getLogger(__name__)

# After a lease ends, how long a buffer of a failed call stays registered for a write already under way.
LATE_WRITE_GRACE_S = 5.0


def unavailable_reason() -> str | None:
    try:
        from mooncake.engine import TransferEngine  # noqa: F401
    except (ImportError, OSError) as error:
        return f"mooncake: {error}"
    return None


def local_address_towards(host: str) -> str:
    """The address of this host that `host` reaches it at (the route's source address; no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((host, 9))
        return probe.getsockname()[0]


class MooncakeEngine:
    """This process's transfer engine on one local address, started on first use."""

    def __init__(self, hostname: str, protocol: str = "tcp", device_name: str = ""):
        from mooncake.engine import TransferEngine
        self._engine = TransferEngine()
        if self._engine.initialize(hostname, "P2PHANDSHAKE", protocol, device_name) != 0:
            raise TransferError(f"mooncake: the transfer engine did not start on {hostname} ({protocol})")
        self.session = f"{hostname}:{self._engine.get_rpc_port()}"
        self._lock = threading.Lock()
        self._quarantine: list[tuple[float, torch.Tensor]] = []

    def register(self, tensor: torch.Tensor) -> None:
        if self._engine.register_memory(tensor.data_ptr(), tensor.nbytes) != 0:
            raise TransferError("mooncake: registering memory failed")

    def unregister(self, tensor: torch.Tensor) -> None:
        self._engine.unregister_memory(tensor.data_ptr())

    def write(self, session: str, source: torch.Tensor, address: int, capacity: int) -> None:
        """Blocking: `source` (contiguous, CPU or a device the build supports) into the peer's buffer."""
        if source.nbytes > capacity:
            raise TransferError(f"mooncake: {source.nbytes} bytes do not fit a buffer of {capacity}")
        self.register(source)
        try:
            if self._engine.transfer_sync_write(session, source.data_ptr(), address, source.nbytes) != 0:
                raise TransferError(f"mooncake: writing to {session} failed")
        finally:
            self.unregister(source)

    def retire(self, buffers: list[torch.Tensor], deadline: float) -> None:
        """Buffers a writer may still fill: registered and alive until `deadline` plus a grace, then freed."""
        with self._lock:
            self._quarantine += [(deadline + LATE_WRITE_GRACE_S, b) for b in buffers]
        self.release_expired()

    def release_expired(self) -> None:
        now = time.monotonic()
        with self._lock:
            expired = [b for until, b in self._quarantine if until <= now]
            self._quarantine = [(until, b) for until, b in self._quarantine if until > now]
        for buffer in expired:
            self.unregister(buffer)

    @property
    def quarantined(self) -> int:
        return len(self._quarantine)


_engines: dict[tuple[str, str], MooncakeEngine] = {}
_engines_lock = threading.Lock()


def engine_for(hostname: str, protocol: str) -> MooncakeEngine:
    """One engine per local address and protocol in this process."""
    with _engines_lock:
        if (hostname, protocol) not in _engines:
            _engines[(hostname, protocol)] = MooncakeEngine(hostname, protocol)
        return _engines[(hostname, protocol)]
