"""Device IPC on the data plane: negotiated only when both ends are on one host (the probe) and name the same
kind of device, falls back otherwise; each export is held until its caller releases it or its lease ends.

On a CPU machine the device is stood in for by an in-process IPC of CPU storages (`InProcessIpc`): what is
tested is the bookkeeping around the handles (export, lease, copy into the caller's own memory, release). The
real CUDA handles are tested between two processes where a CUDA device exists."""

import asyncio
import hashlib
import multiprocessing
import os
import time

import pytest
import torch

from llm_svc.embedding_receiver import ReceiverSettings
from llm_svc.vision_client import ImageBlob, VisionClient
from protos import errors, vision_pb2
from protos.transport import device_ipc, metrics, negotiation
from protos.transport.errors import TransferError

from tests.protos.transport_peer import embeddings_of, serve

WITH_DEVICE_IPC = (negotiation.DEVICE_IPC, negotiation.SHM, negotiation.SOCKET)


def images(count: int) -> list[ImageBlob]:
    return [ImageBlob(hashlib.sha256(bytes([n])).hexdigest(), bytes([n])) for n in range(count)]


class InProcessIpc:
    """CPU storages exported by key and opened by looking the key up: a device IPC without a device."""

    def __init__(self):
        self.exported: dict[bytes, torch.UntypedStorage] = {}

    def share(self, storage: torch.UntypedStorage) -> tuple:
        key = os.urandom(8)
        self.exported[key] = storage
        return 0, key, storage.nbytes(), 0, b"counter", 0, None, False

    def open(self, device, handle, size, offset, counter, counter_offset, event, event_sync) -> torch.UntypedStorage:
        return self.exported[handle]


@pytest.fixture
def cpu_ipc(monkeypatch) -> InProcessIpc:
    ipc = InProcessIpc()
    monkeypatch.setitem(device_ipc.BACKENDS, "cpu",
                        device_ipc.DeviceBackend("cpu", lambda: True, ipc.share, ipc.open, lambda device: None))
    return ipc


@pytest.fixture
async def device_peer(shm_dir, cpu_ipc):
    server, sender = await serve(shm_dir, None, transports=WITH_DEVICE_IPC)
    yield server, sender
    await sender.stop()
    await server.drain()


async def plane_of(port: int, settings: ReceiverSettings) -> str:
    client = VisionClient([f"127.0.0.1:{port}"], 64 << 20, 4 << 20, data_plane=settings)
    try:
        await client.encode("ok", images(1), 0, 10)
        return (await client.receiver.plane(f"127.0.0.1:{port}", None)).name
    finally:
        await client.close()


async def test_each_image_is_copied_into_the_callers_memory_and_released(device_peer, shm_dir, cpu_ipc):
    server, sender = device_peer
    before = metrics.TRANSFER_BYTES.labels("device_ipc", "receiver")._value.get()
    client = VisionClient([f"127.0.0.1:{server.port}"], 64 << 20, 4 << 20,
                          data_plane=ReceiverSettings("device_ipc", shm_dir, device="cpu"))
    try:
        results = await client.encode("ok", images(3), 0, 10)
        for n, result in enumerate(results):
            assert torch.equal(result.embeddings.view(torch.int16), embeddings_of(n).view(torch.int16))
        exported = {storage.data_ptr() for storage in cpu_ipc.exported.values()}
        assert len(exported) == 3 and not exported & {r.embeddings.data_ptr() for r in results}  # copies
        await wait_until(lambda: sender.device_exports.held == 0)  # released once copied, not at the lease's end
    finally:
        await client.close()
    assert metrics.TRANSFER_BYTES.labels("device_ipc", "receiver")._value.get() - before == 3 * embeddings_of(0).nbytes


async def wait_until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_auto_takes_device_ipc_only_when_both_sides_hold_that_device(device_peer, shm_dir, tmp_path):
    server, _ = device_peer
    port = server.port
    assert await plane_of(port, ReceiverSettings("auto", shm_dir, device="cpu")) == "device_ipc"
    assert await plane_of(port, ReceiverSettings("auto", shm_dir)) == "shm"  # the caller names no device
    # Another shared memory: the probe fails, so neither same-host transport is taken.
    assert await plane_of(port, ReceiverSettings("auto", str(tmp_path), device="cpu")) == "socket"


async def test_embeddings_the_server_holds_on_its_cpu_come_in_the_shared_memory_offered_beside(shm_dir,
                                                                                                monkeypatch):
    ipc = InProcessIpc()  # of the meta device: the peer's embeddings (on the CPU) have no IPC
    monkeypatch.setitem(device_ipc.BACKENDS, "meta",
                        device_ipc.DeviceBackend("meta", lambda: True, ipc.share, ipc.open, lambda device: None))
    server, sender = await serve(shm_dir, None, transports=WITH_DEVICE_IPC)
    before = metrics.TRANSFER_BYTES.labels("shm", "receiver")._value.get()
    client = VisionClient([f"127.0.0.1:{server.port}"], 64 << 20, 4 << 20,
                          data_plane=ReceiverSettings("auto", shm_dir, device="meta"))
    try:
        results = await client.encode("ok", images(2), 0, 10)
        plane = await client.receiver.plane(f"127.0.0.1:{server.port}", None)
        assert (plane.name, plane.shm_beside) == ("device_ipc", True)
        for n, result in enumerate(results):
            assert torch.equal(result.embeddings.view(torch.int16), embeddings_of(n).view(torch.int16))
        assert metrics.TRANSFER_BYTES.labels("shm", "receiver")._value.get() - before == 2 * embeddings_of(0).nbytes
        assert not ipc.exported
    finally:
        await client.close()
        await sender.stop()
        await server.drain()


async def test_a_server_without_device_ipc_gets_shared_memory_and_a_forced_one_fails(shm_dir, cpu_ipc):
    server, sender = await serve(shm_dir, None)  # shm and socket only
    try:
        assert await plane_of(server.port, ReceiverSettings("auto", shm_dir, device="cpu")) == "shm"
        with pytest.raises(errors.Unavailable, match="device_ipc"):
            await plane_of(server.port, ReceiverSettings("device_ipc", shm_dir, device="cpu"))
    finally:
        await sender.stop()
        await server.drain()


def test_the_server_refuses_a_device_kind_it_cannot_export_and_a_caller_without_device_cannot_force_it(shm_dir):
    request = vision_pb2.NegotiateDataPlaneRequest(offered=[negotiation.DEVICE_IPC], device_kind="cuda")
    response = negotiation.answer(request, transports=WITH_DEVICE_IPC, shm_directory=shm_dir, socket_port=0,
                                  instance_id="0" * 16, device_kinds=("npu",))
    assert list(response.accepted) == [negotiation.INLINE] and "no cuda IPC" in response.refusals
    for settings in (("device_ipc", shm_dir), ("auto", shm_dir, 2 << 30, 5.0, None, "no-such-device:0")):
        with pytest.raises(ValueError, match="--embedding-device"):
            ReceiverSettings(*settings)
    assert ReceiverSettings("auto", shm_dir, device="cuda:0").device_kind == ("cuda" if torch.cuda.is_available()
                                                                             else "")


def test_an_export_is_held_until_released_or_its_lease_ends(cpu_ipc):
    exports = device_ipc.DeviceExports()
    now = time.monotonic()
    released = exports.export(torch.arange(6, dtype=torch.bfloat16), now + 60)
    expired = exports.export(torch.arange(8, dtype=torch.bfloat16).reshape(2, 4)[:, 1:], now + 1)  # exported contiguous
    assert exports.held == 2 and expired.tensor_offset == 0
    assert exports.release([released.lease_id, "not-a-lease"]) == 1
    assert exports.drop_expired(now + 0.5) == 0 and exports.held == 1
    assert exports.drop_expired(now + 1) == 1 and exports.held == 0
    assert exports.release([expired.lease_id]) == 0


def test_a_cpu_tensor_has_no_device_ipc_and_a_handle_past_its_export_is_refused(cpu_ipc):
    with pytest.raises(TransferError, match="no IPC here"):
        device_ipc.DeviceExports().export(torch.zeros(4, device="meta"), time.monotonic() + 1)
    handle = device_ipc.DeviceExports().export(torch.zeros(4, dtype=torch.bfloat16), time.monotonic() + 1)
    with pytest.raises(TransferError, match="past an export"):
        device_ipc.open_copy(handle, "cpu", torch.bfloat16, (8,), 16, torch.device("cpu"))


def export_in_another_process(conn) -> None:
    """Process body: exports a CUDA tensor, sends its handle, and holds it until told the copy is done."""
    exports = device_ipc.DeviceExports()
    tensor = torch.arange(3328 * 16, dtype=torch.float32, device="cuda").to(torch.bfloat16).reshape(3328, 16)
    conn.send(exports.export(tensor, time.monotonic() + 60).SerializeToString())
    conn.recv()
    conn.send(exports.release(conn.recv()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cuda_tensor_of_another_process_is_copied_exactly_into_this_ones():
    context = multiprocessing.get_context("spawn")
    conn, child = context.Pipe()
    process = context.Process(target=export_in_another_process, args=(child,))
    process.start()
    try:
        handle = vision_pb2.DeviceMemoryHandle.FromString(conn.recv())
        copy = device_ipc.open_copy(handle, "cuda", torch.bfloat16, (3328, 16), 3328 * 16 * 2, torch.device("cuda"))
        expected = torch.arange(3328 * 16, dtype=torch.float32).to(torch.bfloat16).reshape(3328, 16)
        assert torch.equal(copy.cpu().view(torch.int16), expected.view(torch.int16))
        conn.send("copied")
        conn.send([handle.lease_id])
        assert conn.recv() == 1
    finally:
        process.join(30)
