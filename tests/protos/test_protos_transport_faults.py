"""kill -9 of either side of the embedding data plane mid-transfer, with real processes (tests/protos/
transport_peer.py): the caller gets a clear error, nothing is left behind (shared-memory segment, descriptor,
connection, slot) once the lease is over, and the next request succeeds."""

import asyncio
import hashlib
import os
import pathlib
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch

from llm_svc.embedding_receiver import ReceiverSettings
from llm_svc.vision_client import ImageBlob, VisionClient
from protos import errors

from tests.protos.transport_peer import embeddings_of, serve

PEER = pathlib.Path(__file__).parent / "transport_peer.py"
ENV = {**os.environ, "PYTHONPATH": os.getcwd()}


def image() -> list[ImageBlob]:
    return [ImageBlob(hashlib.sha256(b"x").hexdigest(), b"x")]


async def wait_until(condition, timeout_s: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def start_sender(tmp_path: pathlib.Path, shm_dir: str, port: int = 0) -> tuple[subprocess.Popen, int]:
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, str(PEER), "serve", str(port_file), shm_dir, str(tmp_path), str(port)],
                            env=ENV)
    await wait_until(lambda: port_file.exists() and port_file.read_text(), what="the sender to start")
    return proc, int(port_file.read_text())


def descriptors_into(directory: str) -> int:
    """Descriptors of this process open on files of `directory`."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith(directory + "/")
        except OSError:
            pass
    return count


def mappings_into(directory: str) -> int:
    """Mappings of this process onto files of `directory` (an unlinked one still shows, marked deleted)."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if f" {directory}/" in line)


def connections_to(port: int) -> int:
    """Connected sockets of this process to or from `port` (a leaked one sits in CLOSE_WAIT)."""
    return sum(1 for c in psutil.Process().net_connections("tcp") if c.status != psutil.CONN_LISTEN
               and port in (c.laddr.port if c.laddr else None, c.raddr.port if c.raddr else None))


async def encode_when_up(client: VisionClient) -> torch.Tensor:
    """The first request that finds the restarted sender (the channel reconnects with a backoff)."""
    deadline = time.monotonic() + 60
    while True:
        try:
            [result] = await client.encode("ok", image(), 0, 60)
            return result.embeddings
        except errors.Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("transport, mode, error", [
    ("shm", "stall", "vision_svc"),  # written into the slot, killed before its message
    ("socket", "half", "closed the connection after 524288 of 1048576 bytes"),  # killed halfway through a frame
])
async def test_a_sender_killed_mid_transfer_fails_the_call_clearly_and_leaves_nothing(tmp_path, shm_dir, transport,
                                                                                      mode, error):
    sender, port = await start_sender(tmp_path, shm_dir)
    client = VisionClient([f"127.0.0.1:{port}"], 64 << 20, 4 << 20, data_plane=ReceiverSettings(transport, shm_dir))
    try:
        await client.encode("ok", image(), 0, 30)  # channel and data plane set up
        data_port = (await client.receiver.plane(f"127.0.0.1:{port}", None)).socket_port
        call = asyncio.create_task(client.encode(mode, image(), 0, 60))
        await wait_until((tmp_path / "written").exists, what="the transfer to start")
        sender.send_signal(signal.SIGKILL)
        sender.wait()
        with pytest.raises(errors.Unavailable, match=error):
            await call
        pool = client.receiver.pool
        if pool is not None:  # the slot the dead sender wrote into is retired, not reused
            assert pool.live_slots == pool.free_slots
            assert len(os.listdir(shm_dir)) == pool.live_slots == descriptors_into(shm_dir)
        await wait_until(lambda: connections_to(port) + connections_to(data_port) == 0, 10, "the connections to close")

        sender, _ = await start_sender(tmp_path, shm_dir, port)  # restarted at the same address
        assert torch.equal(await encode_when_up(client), embeddings_of(0))
        assert (await client.receiver.plane(f"127.0.0.1:{port}", None)).name == transport
    finally:
        await client.close()
        sender.kill()
        sender.wait()
    assert os.listdir(shm_dir) == []


@pytest.mark.parametrize("transport", ["shm", "socket"])
async def test_a_receiver_killed_mid_transfer_leaves_the_sender_nothing_once_its_lease_is_swept(tmp_path, shm_dir,
                                                                                                transport):
    server, sender = await serve(shm_dir, tmp_path, sweep_s=0.5)
    data_port = sender._socket_port
    try:
        receiver = subprocess.Popen([sys.executable, str(PEER), "receive", str(server.port), shm_dir, transport],
                                    env=ENV)
        try:
            await wait_until((tmp_path / "written").exists, what="the transfer to start")
        finally:
            receiver.send_signal(signal.SIGKILL)
            receiver.wait()
        # The dead receiver's segments go once the sweeper finds their flock free; its connection closes.
        await wait_until(lambda: os.listdir(shm_dir) == [], 30, "the dead receiver's segments to be swept")
        await wait_until(lambda: connections_to(data_port) == 0, 10, "the data connection to close")
        assert sender._listener.unclaimed == 0 and descriptors_into(shm_dir) == 0
        # The slot the sender wrote into stays mapped in it only until the sweep after its name went.
        await wait_until(lambda: sender.slot_writer.mapped == 0, 10, "the sender to unmap the dead receiver's slot")
        assert mappings_into(shm_dir) == 0

        client = VisionClient([f"127.0.0.1:{server.port}"], 64 << 20, 4 << 20,
                              data_plane=ReceiverSettings(transport, shm_dir))
        try:
            [result] = await client.encode("ok", image(), 0, 60)
            assert torch.equal(result.embeddings, embeddings_of(0))
        finally:
            await client.close()
    finally:
        await sender.stop()
        await server.drain()
