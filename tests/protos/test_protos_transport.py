"""The embedding data plane between llm_svc's client and vision_svc's real sender, on loopback in one process:
negotiation (probe, refusals, forcing), every transport bit-exact, the sender's fallbacks to inline, the
receiver's slot pool, and the limits on what a caller's offer may name."""

import hashlib
import os
import pathlib
import types

import grpc
import pytest
import torch

from llm_svc.embedding_receiver import ReceiverSettings
from llm_svc.vision_client import ImageBlob, VisionClient
from protos import errors, vision_pb2, vision_pb2_grpc
from protos.transport import metrics, mooncake_plane, negotiation, shared_memory

from tests.protos.transport_peer import embeddings_of, serve


@pytest.fixture
async def peer(shm_dir):
    server, sender = await serve(shm_dir, None)
    yield server, sender
    await sender.stop()
    await server.drain()


def images(count: int) -> list[ImageBlob]:
    return [ImageBlob(hashlib.sha256(bytes([n])).hexdigest(), bytes([n])) for n in range(count)]


def received(transport: str) -> float:
    return metrics.TRANSFER_BYTES.labels(transport, "receiver")._value.get()


async def encode_with(port: int, transport: str, shm_dir: str, count: int = 2, request_id: str = "ok"):
    client = VisionClient([f"127.0.0.1:{port}"], 64 << 20, 4 << 20, data_plane=ReceiverSettings(transport, shm_dir))
    try:
        return client, await client.encode(request_id, images(count), 0, 10)
    finally:
        await client.close()


@pytest.mark.parametrize("transport", ["shm", "socket", "grpc"])
async def test_each_transport_delivers_the_exact_bytes_and_is_counted_under_its_name(peer, shm_dir, transport):
    before = received(transport)
    _, results = await encode_with(peer[0].port, transport, shm_dir, count=3)
    for n, result in enumerate(results):
        assert torch.equal(result.embeddings.view(torch.int16), embeddings_of(n).view(torch.int16))
    if transport != "grpc":
        assert received(transport) - before == 3 * embeddings_of(0).nbytes


async def test_auto_takes_shared_memory_when_the_probe_proves_one_host(peer, shm_dir):
    client = VisionClient([f"127.0.0.1:{peer[0].port}"], 64 << 20, 4 << 20,
                          data_plane=ReceiverSettings("auto", shm_dir))
    try:
        await client.encode("ok", images(1), 0, 10)
        plane = await client.receiver.plane(f"127.0.0.1:{peer[0].port}", None)
        assert plane.name == "shm" and plane.peer_instance == peer[1].instance_id
    finally:
        await client.close()


async def test_a_server_that_cannot_read_the_probe_is_another_host_and_gets_the_socket(peer, tmp_path):
    # The caller's shared memory is a directory the server does not look in: as for a process on another host.
    client = VisionClient([f"127.0.0.1:{peer[0].port}"], 64 << 20, 4 << 20,
                          data_plane=ReceiverSettings("auto", str(tmp_path)))
    try:
        [result] = await client.encode("ok", images(1), 0, 10)
        plane = await client.receiver.plane(f"127.0.0.1:{peer[0].port}", None)
        assert plane.name == "socket" and "shared memory" in plane.refusals
        assert torch.equal(result.embeddings, embeddings_of(0))
    finally:
        await client.close()


async def test_a_forced_transport_the_server_refuses_fails_the_call_with_its_name(shm_dir):
    server, sender = await serve(shm_dir, None, transports=(negotiation.SOCKET,))
    try:
        with pytest.raises(errors.Unavailable, match="forced embedding transport shm"):
            await encode_with(server.port, "shm", shm_dir)
        _, [result, _] = await encode_with(server.port, "auto", shm_dir)  # auto settles for the socket
        assert torch.equal(result.embeddings, embeddings_of(0))
    finally:
        await sender.stop()
        await server.drain()


async def test_slots_are_reused_while_free_and_back_in_the_pool_when_their_tensors_are_freed(peer, shm_dir):
    client = VisionClient([f"127.0.0.1:{peer[0].port}"], 64 << 20, 4 << 20,
                          data_plane=ReceiverSettings("shm", shm_dir))
    try:
        for _ in range(3):
            results = await client.encode("ok", images(2), 0, 10)
            pool = client.receiver.pool
            assert (pool.live_slots, pool.free_slots) == (2, 0)  # both slots viewed by the results
            del results
            assert pool.free_slots == 2
        assert len(os.listdir(shm_dir)) == 2
        kept = await client.encode("ok", images(1), 0, 10)
    finally:
        await client.close()
    assert os.listdir(shm_dir) == []  # names go at close, even of slots still viewed
    assert torch.equal(kept[0].embeddings, embeddings_of(0))  # which stay readable until freed


async def test_a_pool_under_pressure_copies_out_and_a_call_that_finds_no_slot_goes_inline(peer, shm_dir):
    slot = embeddings_of(0).nbytes
    client = VisionClient([f"127.0.0.1:{peer[0].port}"], 64 << 20, slot,
                          data_plane=ReceiverSettings("shm", shm_dir, shm_max_bytes=2 * slot))
    try:
        [first] = await client.encode("ok", images(1), 0, 10)
        pool = client.receiver.pool
        assert (pool.live_slots, pool.free_slots) == (1, 0)  # viewed by `first`
        [second] = await client.encode("ok", images(1), 0, 10)
        assert (pool.live_slots, pool.free_slots) == (2, 1)  # the last slot was copied out and is free again
        held = pool.lease(1, 10)
        before = received("shm")
        [third] = await client.encode("ok", images(1), 0, 10)
        assert received("shm") == before  # no slot: inline
        held.close(writer_finished=True)
        for result in (first, second, third):
            assert torch.equal(result.embeddings, embeddings_of(0))
    finally:
        await client.close()


async def raw_encode(port: int, offer: vision_pb2.DataPlaneOffer) -> list[vision_pb2.EncodeResponse]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = vision_pb2_grpc.VisionEncoderStub(channel)
        request = vision_pb2.EncodeRequest(request_id="ok", images=[vision_pb2.ImageInput(data=b"x")],
                                           data_plane=offer)
        return [message async for message in stub.Encode(request, timeout=30)]


@pytest.mark.parametrize("slot", [
    vision_pb2.SharedMemorySlot(name="../../etc/passwd", size_bytes=1 << 30),  # not a slot name: no path
    vision_pb2.SharedMemorySlot(name="dvd-emb-0123456789abcdef-1", size_bytes=1 << 30),  # no such segment
    vision_pb2.SharedMemorySlot(name="dvd-emb-0123456789abcdef-2", size_bytes=16),  # too small for the image
], ids=["path", "missing", "small"])
async def test_an_offer_naming_an_unusable_slot_gets_the_image_inline(peer, shm_dir, slot):
    messages = await raw_encode(peer[0].port, vision_pb2.DataPlaneOffer(
        transport=vision_pb2.TRANSPORT_SHARED_MEMORY, slots=[slot], lease_ms=10_000))
    assert {m.transport for m in messages} == {vision_pb2.TRANSPORT_UNSPECIFIED}
    assert b"".join(m.data for m in messages) == embeddings_of(0).view(torch.uint8).numpy().tobytes()


async def test_an_offer_whose_lease_is_over_gets_the_image_inline(peer, shm_dir):
    pool = shared_memory.SlotPool(shm_dir, embeddings_of(0).nbytes, 1)
    lease = pool.lease(1, lease_s=0)
    try:
        messages = await raw_encode(peer[0].port, lease.offer())
        assert messages[0].transport == vision_pb2.TRANSPORT_UNSPECIFIED
        assert b"".join(m.data for m in messages) == embeddings_of(0).view(torch.uint8).numpy().tobytes()
    finally:
        lease.close(writer_finished=True)
        pool.close()


async def test_a_socket_offer_whose_connection_never_comes_gets_the_image_inline(peer):
    messages = await raw_encode(peer[0].port, vision_pb2.DataPlaneOffer(
        transport=vision_pb2.TRANSPORT_SOCKET, socket_token=os.urandom(16), lease_ms=10_000))
    assert messages[0].transport == vision_pb2.TRANSPORT_UNSPECIFIED
    assert b"".join(m.data for m in messages) == embeddings_of(0).view(torch.uint8).numpy().tobytes()
    assert peer[1]._listener.unclaimed == 0


async def test_an_unfinished_lease_retires_its_slots_instead_of_reusing_them(shm_dir):
    pool = shared_memory.SlotPool(shm_dir, 4096, 4)
    lease = pool.lease(2, lease_s=10)
    names = [slot.name for slot in lease.offer().slots]
    lease.close(writer_finished=False)  # a writer may still be filling them: never reused
    assert (pool.live_slots, pool.free_slots) == (0, 0)
    assert not set(names) & set(os.listdir(shm_dir))
    pool.close()


async def test_the_sweeper_leaves_live_segments_and_a_server_without_data_plane_gets_inline(shm_dir):
    pool = shared_memory.SlotPool(shm_dir, 4096, 1)
    lease = pool.lease(1, lease_s=10)
    os.utime(os.path.join(shm_dir, lease.offer().slots[0].name), (0, 0))
    assert shared_memory.sweep_orphans(shm_dir) == []  # its owner (this process) holds its flock
    lease.close(writer_finished=True)
    pool.close()

    class OldServer(vision_pb2_grpc.VisionEncoderServicer):  # predates NegotiateDataPlane
        pass
    server = grpc.aio.server()
    vision_pb2_grpc.add_VisionEncoderServicer_to_server(OldServer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            plane = await negotiation.negotiate(vision_pb2_grpc.VisionEncoderStub(channel), "0" * 16,
                                                negotiation.AUTO_ORDER, shm_dir, 5)
        assert plane.transport == negotiation.INLINE
        assert os.listdir(shm_dir) == []  # the probe is gone
    finally:
        await server.stop(0)


@pytest.mark.skipif(mooncake_plane.unavailable_reason() is not None,
                    reason=str(mooncake_plane.unavailable_reason()))
async def test_mooncake_over_tcp_delivers_the_exact_bytes_into_registered_memory(shm_dir):
    server, sender = await serve(shm_dir, None, transports=(negotiation.MOONCAKE,))
    try:
        before = received("mooncake")
        client, results = await encode_with(server.port, "mooncake", shm_dir, count=2)
        for n, result in enumerate(results):
            assert torch.equal(result.embeddings, embeddings_of(n))
        assert received("mooncake") - before == 2 * embeddings_of(0).nbytes
        plane = await client.receiver.plane(f"127.0.0.1:{server.port}", None)
        assert plane.name == "mooncake"
    finally:
        await sender.stop()
        await server.drain()


def test_flags_of_the_data_plane_are_checked_and_tls_turns_the_plaintext_socket_off(tmp_path):
    from protos.security import TlsFiles
    from vision_svc.config import VisionConfig
    from vision_svc.transport_sender import sender_settings

    with pytest.raises(ValueError, match="--embedding-transports"):
        VisionConfig(model=pathlib.Path("."), embedding_transports="shm,rdma")
    with pytest.raises(ValueError, match="--data-port"):
        VisionConfig(model=pathlib.Path("."), data_port=70000)
    with pytest.raises(ValueError, match="--embedding-transport must be one of"):
        ReceiverSettings(transport="carrier-pigeon")
    assert sender_settings(VisionConfig(model=pathlib.Path("."))).transports == (negotiation.SHM, negotiation.SOCKET)
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
    tls = types.SimpleNamespace(**{**vars(VisionConfig(model=pathlib.Path("."))), "tls": TlsFiles(ca=ca)})
    assert sender_settings(tls).transports == (negotiation.SHM,)
    assert ReceiverSettings("auto").offered == (negotiation.SHM, negotiation.SOCKET, negotiation.INLINE)


async def test_a_data_port_that_cannot_be_reached_sends_that_replica_inline(peer, shm_dir):
    server, sender = peer
    client = VisionClient([f"127.0.0.1:{server.port}"], 64 << 20, 4 << 20,
                          data_plane=ReceiverSettings("auto", "/nonexistent"))  # not one host: the socket
    target = f"127.0.0.1:{server.port}"
    try:
        await client.encode("ok", images(1), 0, 10)
        assert (await client.receiver.plane(target, None)).name == "socket"
        await sender._listener.close()  # as a firewall between the hosts would
        [result] = await client.encode("ok", images(1), 0, 10)  # inline, after the sender's wait
        assert torch.equal(result.embeddings, embeddings_of(0))
        plane = await client.receiver.plane(target, None)
        assert plane.name == "grpc" and "data port" in plane.refusals
    finally:
        await client.close()
