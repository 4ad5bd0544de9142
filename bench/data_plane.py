"""The embedding data plane measured between two processes: vision_svc's real sender (`EmbeddingSender`) in
one, llm_svc's real client (`VisionClient` with its `EmbeddingReceiver`) in the other, per transport.

Used by `bench.embedding_transfer`. The sender process may run inside a network namespace joined by a veth
pair (`bench.netns`): its addresses are then another host's, while /dev/shm is still shared.
"""

import asyncio
import ctypes
import dataclasses
import hashlib
import multiprocessing
import os
import time

import torch

NETNS_DIR = "/var/run/netns"
_CLONE_NEWNET = 0x40000000
MiB = 1 << 20


def enter_namespace(name: str | None) -> None:
    """Moves this process into network namespace `name` (None: stays)."""
    if name is None:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into {name} failed")
    finally:
        os.close(fd)


def serve_data_plane(conn, host: str, shm_dir: str, namespace: str | None, make_tensor) -> None:
    """Process body: a VisionEncoder that answers every Encode with `make_tensor()` through the real sender."""
    enter_namespace(namespace)
    from protos import vision_pb2, vision_pb2_grpc
    from protos.server import GrpcServer
    from protos.transport import negotiation
    from vision_svc.service import EncodedImage
    from vision_svc.transport_sender import EmbeddingSender, SenderSettings

    image = EncodedImage(0, "0" * 64, 13, make_tensor(), cache_hit=False)
    # Device IPC exports the same embeddings held on a CUDA device, where there is one.
    on_device = dataclasses.replace(image, embeddings=image.embeddings.cuda()) if torch.cuda.is_available() else image
    # Mooncake is dropped by the sender where its package does not import.
    device_ipc = (negotiation.DEVICE_IPC,) if torch.cuda.is_available() else ()
    sender = EmbeddingSender(SenderSettings((negotiation.SHM, negotiation.SOCKET, negotiation.MOONCAKE, *device_ipc),
                                            shm_dir, host, 0), MiB)

    class FixedTensorServicer(vision_pb2_grpc.VisionEncoderServicer):
        async def NegotiateDataPlane(self, request, context):
            return sender.negotiate(request)

        async def ReleaseDeviceMemory(self, request, context):
            return sender.release_device_memory(request)

        async def Encode(self, request, context):
            device = request.data_plane.transport == negotiation.DEVICE_IPC
            with sender.open(request) as sending:
                for message in await sending.messages(on_device if device else image):
                    yield message

    async def serve():
        server = GrpcServer(host, 0, 64 * MiB, grace_s=0, announce_s=0)
        server.add_service(vision_pb2_grpc.add_VisionEncoderServicer_to_server, FixedTensorServicer(),
                           vision_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name)
        port = await server.start()
        await sender.start()
        await server.set_serving()
        conn.send(port)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        await sender.stop()
        await server.drain()
    asyncio.run(serve())


def serve_tcp(conn, host: str, namespace: str | None, make_tensor) -> None:
    """Process body: a plain asyncio TCP server that sends the tensor's bytes for each byte it reads."""
    enter_namespace(namespace)
    payload = make_tensor().view(torch.uint8).reshape(-1).numpy().tobytes()

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        while await reader.read(1):  # one byte asks for one tensor
            writer.write(payload)
            await writer.drain()
        writer.close()

    async def serve():
        server = await asyncio.start_server(send, host, 0)
        conn.send(server.sockets[0].getsockname()[1])
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)
        server.close()
    asyncio.run(serve())


class ServerProcess:
    """A server in a fresh process (spawned, so it shares nothing with this one); yields its port."""

    def __init__(self, target, *args):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=target, args=(child, *args), daemon=True)

    def __enter__(self) -> int:
        self._process.start()
        return self._conn.recv()

    def __exit__(self, *_):
        self._conn.send("stop")
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


class DataPlaneTimer:
    """llm_svc's client forced onto one transport; `once()` times one transfer into a tensor of this process and
    compares it with `expected` bit for bit (outside the timing)."""

    def __init__(self, host: str, port: int, transport: str, shm_dir: str, expected: torch.Tensor):
        from llm_svc.embedding_receiver import ReceiverSettings
        from llm_svc.vision_client import VisionClient
        self.transport = transport
        self._expected = expected
        self._client = VisionClient([f"{host}:{port}"], 64 * MiB, 512 * MiB, data_plane=ReceiverSettings(
            transport, shm_dir, device="cuda" if transport == "device_ipc" else ""))
        # Slots the size of the largest embedding, as llm_svc sets them from the vision stage's GetInfo.
        self._client.receiver.set_slot_bytes(expected.nbytes)
        self._calls = 0

    async def once(self) -> float:
        from llm_svc.vision_client import ImageBlob
        from protos.transport import metrics

        self._calls += 1
        blob = ImageBlob(hashlib.sha256(str(self._calls).encode()).hexdigest(), data=b"image")
        before = metrics.TRANSFER_BYTES.labels(self.transport, "receiver")._value.get()
        started = time.perf_counter()
        [result] = await self._client.encode(f"transfer-{self._calls}", [blob], max_tiles=0, timeout_s=60)
        elapsed = time.perf_counter() - started
        if not torch.equal(result.embeddings.cpu().view(torch.int16), self._expected.view(torch.int16)):
            raise AssertionError(f"{self.transport}: the received embeddings differ from those sent")
        if self.transport != "grpc" and metrics.TRANSFER_BYTES.labels(self.transport, "receiver")._value.get() \
                == before:
            raise AssertionError(f"{self.transport}: the image came inline, not on {self.transport}")
        return elapsed

    async def close(self) -> None:
        await self._client.close()


async def time_tcp(host: str, port: int, nbytes: int, shape: tuple[int, int], repeats: int) -> list[float]:
    # A stream limit of the whole tensor: with the 64 KiB default the reader pauses and resumes the socket
    # every 128 KiB, which measures asyncio's flow control rather than the transport.
    reader, writer = await asyncio.open_connection(host, port, limit=nbytes)
    seconds = []
    try:
        for n in range(repeats + 1):
            started = time.perf_counter()
            writer.write(b"g")
            data = await reader.readexactly(nbytes)
            # The same end state as the gRPC client: a bf16 tensor of the right shape.
            received = torch.frombuffer(bytearray(data), dtype=torch.bfloat16).reshape(shape)
            elapsed = time.perf_counter() - started
            assert received.shape == shape
            seconds += [elapsed] if n else []
    finally:
        writer.close()
    return seconds


def time_tcp_blocking(host: str, port: int, nbytes: int, shape: tuple[int, int], repeats: int) -> list[float]:
    """A plain socket at its best: blocking `recv_into` straight into a new tensor, no event loop."""
    import socket
    seconds = []
    with socket.create_connection((host, port)) as conn:
        for n in range(repeats + 1):
            started = time.perf_counter()
            conn.sendall(b"g")
            received = torch.empty(nbytes, dtype=torch.uint8)
            view, got = memoryview(received.numpy()), 0
            while got < nbytes:
                got += conn.recv_into(view[got:], nbytes - got)
            tensor = received.view(torch.bfloat16).reshape(shape)
            elapsed = time.perf_counter() - started
            assert tensor.shape == shape
            seconds += [elapsed] if n else []
    return seconds
