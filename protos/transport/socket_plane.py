"""A direct TCP connection for embedding bytes, between hosts (or processes that cannot share memory).

The receiver (llm_svc) opens one data connection per Encode call to the sender's data port and sends the call's
token first (16 random bytes it also put in the EncodeRequest, over gRPC and its TLS if any); the sender
(vision_svc) claims the connection by that token. For each image sent this way, the sender writes a frame
(magic, image index, byte count, then the bytes) before its gRPC message, and the receiver reads the frame
straight into a tensor it allocated. A connection nobody claims within its time limit is closed.

Both ends do the bulk I/O with blocking calls in a thread (`sendall`, `recv_into`): no copies through asyncio's
buffers, and the GIL is released while bytes move.
"""

import asyncio
import logging
import secrets
import socket
import struct

import torch

from protos.transport.errors import TransferError

log = logging.getLogger(__name__)

TOKEN_BYTES = 16
_FRAME = struct.Struct("<4sIQ")  # magic, image index, byte count
_MAGIC = b"DVD1"
# How long an accepted connection may take to send its token, and then wait unclaimed.
HANDSHAKE_S = 5.0
UNCLAIMED_S = 30.0
MAX_UNCLAIMED = 256


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


class DataListener:
    """The sender's data port: accepts connections and holds each, under its token, until an Encode call claims it."""

    def __init__(self, host: str, port: int):
        self._host, self._port = host, port
        self._socket: socket.socket | None = None
        self._accepting: asyncio.Task | None = None
        self._unclaimed: dict[bytes, socket.socket] = {}
        self._arrived: dict[bytes, asyncio.Future] = {}

    @property
    def unclaimed(self) -> int:
        return len(self._unclaimed)

    async def start(self) -> int:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        self._socket = socket.socket(family, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind((self._host, self._port))
        self._socket.listen(128)
        self._socket.setblocking(False)
        self._accepting = asyncio.create_task(self._accept_loop())
        return self._socket.getsockname()[1]

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._socket)
            conn.setblocking(False)
            asyncio.create_task(self._admit(conn))

    async def _admit(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            token = await asyncio.wait_for(_recv_exactly(loop, conn, TOKEN_BYTES), HANDSHAKE_S)
        except (OSError, asyncio.TimeoutError, TransferError):
            conn.close()
            return
        if len(self._unclaimed) >= MAX_UNCLAIMED or token in self._unclaimed:
            conn.close()
            return
        self._unclaimed[token] = conn
        if (waiter := self._arrived.get(token)) is not None and not waiter.done():
            waiter.set_result(None)
        loop.call_later(UNCLAIMED_S, self.discard, token)

    async def claim(self, token: bytes, timeout_s: float) -> socket.socket:
        """The connection that presented `token` (waiting up to `timeout_s` for it); it is the caller's to close."""
        if token not in self._unclaimed:
            waiter = self._arrived.setdefault(token, asyncio.get_running_loop().create_future())
            try:
                await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
            except asyncio.TimeoutError:
                raise TransferError("socket: the caller's data connection did not arrive in time") from None
            finally:
                self._arrived.pop(token, None)
        conn = self._unclaimed.pop(token, None)
        if conn is None:
            raise TransferError("socket: the caller's data connection is gone")
        return conn

    def discard(self, token: bytes) -> None:
        """Closes the connection of `token` if nobody claimed it (the call ended without using it)."""
        if (conn := self._unclaimed.pop(token, None)) is not None:
            conn.close()

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
        if self._socket is not None:
            self._socket.close()
        for token in list(self._unclaimed):
            self.discard(token)


async def _recv_exactly(loop: asyncio.AbstractEventLoop, conn: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        part = await loop.sock_recv(conn, n - len(data))
        if not part:
            raise TransferError("socket: connection closed early")
        data += part
    return data


def send_frame(conn: socket.socket, index: int, data: memoryview, timeout_s: float) -> None:
    """Blocking (run it in a thread): one image's frame on a claimed connection."""
    conn.setblocking(True)
    conn.settimeout(max(timeout_s, 0.001))
    try:
        conn.sendall(_FRAME.pack(_MAGIC, index, len(data)))
        conn.sendall(data)
    except OSError as error:
        raise TransferError(f"socket: sending image {index}: {error}") from None


def open_data_connection(host: str, port: int, token: bytes, timeout_s: float) -> socket.socket:
    """Blocking: the receiver's data connection to the sender, its token sent."""
    try:
        conn = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as error:
        raise TransferError(f"socket: cannot connect to the data port {host}:{port}: {error}") from None
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.sendall(token)
    except OSError as error:
        conn.close()
        raise TransferError(f"socket: sending the token to {host}:{port}: {error}") from None
    return conn


def receive_frame(conn: socket.socket, index: int, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int,
                  timeout_s: float) -> torch.Tensor:
    """Blocking: the frame of image `index`, read into a new tensor of `shape` (the receiver's own memory)."""
    conn.settimeout(max(timeout_s, 0.001))
    try:
        magic, got_index, got_bytes = _FRAME.unpack(_read_exactly(conn, _FRAME.size))
        if magic != _MAGIC or got_index != index or got_bytes != nbytes:
            raise TransferError(f"socket: expected image {index} of {nbytes} bytes, the frame says image "
                                f"{got_index} of {got_bytes} bytes")
        tensor = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(tensor.numpy())
        received = 0
        while received < nbytes:
            n = conn.recv_into(view[received:], nbytes - received)
            if n == 0:
                raise TransferError(f"socket: the sender closed the connection after {received} of {nbytes} bytes")
            received += n
    except OSError as error:
        raise TransferError(f"socket: receiving image {index}: {error}") from None
    return tensor.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)


def _read_exactly(conn: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        part = conn.recv(n - len(data))
        if not part:
            raise TransferError("socket: the sender closed the connection")
        data += part
    return bytes(data)
