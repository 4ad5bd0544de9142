"""A TCP proxy that puts faults on one network hop, in user space: for kernels without netem
(`tc qdisc ... netem`), and for users who may not change the network.

It listens on loopback in front of one upstream address and forwards bytes both ways, on an event loop of its
own thread. The fault in force applies to every connection, and can be changed at any time:

- delay: each chunk of bytes is forwarded `delay_s` after it arrived, in order; chunks stay pipelined, so this
  adds latency without cutting throughput (as netem's delay does);
- reset: each chunk ends its connection with probability `reset_probability`, by a TCP reset to both ends
  (netem drops packets and TCP hides that behind retransmissions; a proxy cannot, so its "loss" is
  connections lost at random);
- blackhole: nothing is forwarded, and connections stay open and silent (a partition seen from one side);
  bytes held meanwhile flow again when it ends, as after a healed partition.
"""

import asyncio
import dataclasses
import random
import socket
import struct
import threading

CHUNK_BYTES = 64 << 10
# Chunks held per direction before the proxy stops reading (then TCP's flow control pushes back on the sender).
QUEUE_CHUNKS = 64
BLACKHOLE_POLL_S = 0.05


@dataclasses.dataclass(frozen=True)
class Fault:
    delay_s: float = 0.0
    reset_probability: float = 0.0
    blackhole: bool = False

    def describe(self) -> str:
        parts = [f"+{self.delay_s * 1e3:.0f} ms per chunk, each way"] if self.delay_s else []
        if self.reset_probability:
            parts.append(f"each chunk resets its connection with p={self.reset_probability:g}")
        if self.blackhole:
            parts.append("nothing forwarded, connections left open")
        return "; ".join(parts) or "none"


NO_FAULT = Fault()


class FaultProxy:
    def __init__(self, upstream_host: str, upstream_port: int, seed: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.fault = NO_FAULT
        self.connections = 0
        self.resets = 0
        self._rng = random.Random(seed)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)

    def start(self) -> str:
        """Starts listening; returns HOST:PORT to give clients in place of the upstream address."""
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, "127.0.0.1", 0), self._loop).result(10)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    def set_fault(self, fault: Fault) -> None:
        self.fault = fault  # read by the pumps at every chunk

    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shut():
            self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
        asyncio.run_coroutine_threadsafe(shut(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _reset(client_writer)  # the upstream refused: the client sees its connection fail, as it would directly
            return
        writers = (client_writer, upstream_writer)
        self._writers.update(writers)
        try:
            await asyncio.gather(self._pump(client_reader, upstream_writer, writers),
                                 self._pump(upstream_reader, client_writer, writers))
        finally:
            self._writers.difference_update(writers)
            for writer in writers:
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    both: tuple[asyncio.StreamWriter, ...]) -> None:
        """One direction: a reader task queues chunks with their arrival time; this task forwards them."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_CHUNKS)
        loop = asyncio.get_running_loop()

        async def read():
            try:
                while chunk := await reader.read(CHUNK_BYTES):
                    await queue.put((loop.time(), chunk))
            except (ConnectionError, OSError):
                pass
            await queue.put((loop.time(), b""))

        reading = asyncio.create_task(read())
        try:
            while True:
                arrived, chunk = await queue.get()
                while self.fault.blackhole:
                    await asyncio.sleep(BLACKHOLE_POLL_S)
                if (wait := arrived + self.fault.delay_s - loop.time()) > 0:
                    await asyncio.sleep(wait)
                if not chunk:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                if self.fault.reset_probability and self._rng.random() < self.fault.reset_probability:
                    self.resets += 1
                    for w in both:
                        _reset(w)
                    return
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            for w in both:
                w.transport.abort()
        finally:
            reading.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Closes with a TCP reset (SO_LINGER 0), as a middlebox that drops a connection does."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
