"""The embedding transfer alone: one 13-tile image of a 38B model (3328 x 5120 bf16, 34 MB) over loopback.

    python -m bench.embedding_transfer [--repeats 10]

gRPC: a server in its own process (the real bootstrap, `protos.server.GrpcServer`) streams a fixed tensor
exactly as vision_svc does (`vision_svc.servicer.image_to_pb`, 1 MiB chunks), and llm_svc's real client
(`llm_svc.vision_client.VisionClient`) reassembles it. Raw TCP: the same bytes from an asyncio stream
server in its own process, read with `readexactly`. Each side reuses one connection, as llm_svc does.
"""

import argparse
import asyncio
import hashlib
import multiprocessing
import time

import torch

from bench.common import markdown_table, median, ratio

SHAPE = (13 * 256, 5120)  # [tiles * tokens_per_tile, llm_hidden] of InternVL3.5-38B
MiB = 1 << 20


def fixed_embeddings() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(SHAPE).to(torch.bfloat16)  # [3328, 5120], 34 MB


def _serve_grpc(conn, chunk_bytes: int) -> None:
    from protos import vision_pb2, vision_pb2_grpc
    from protos.server import GrpcServer
    from vision_svc.service import EncodedImage
    from vision_svc.servicer import image_to_pb

    image = EncodedImage(0, "0" * 64, 13, fixed_embeddings(), cache_hit=False)

    class FixedTensorServicer(vision_pb2_grpc.VisionEncoderServicer):
        async def Encode(self, request, context):
            for message in image_to_pb(image, chunk_bytes):
                yield message

    async def serve():
        server = GrpcServer("127.0.0.1", 0, 64 * MiB, grace_s=0, announce_s=0)
        server.add_service(vision_pb2_grpc.add_VisionEncoderServicer_to_server, FixedTensorServicer(),
                           vision_pb2.DESCRIPTOR.services_by_name["VisionEncoder"].full_name)
        conn.send(await server.start())
        await server.set_serving()
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        await server.drain()
    asyncio.run(serve())


def _serve_tcp(conn) -> None:
    payload = fixed_embeddings().view(torch.uint8).reshape(-1).numpy().tobytes()

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        while await reader.read(1):  # one byte asks for one tensor
            writer.write(payload)
            await writer.drain()
        writer.close()

    async def serve():
        server = await asyncio.start_server(send, "127.0.0.1", 0)
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


async def time_grpc(port: int, repeats: int) -> list[float]:
    from llm_svc.vision_client import ImageBlob, VisionClient
    client = VisionClient([f"127.0.0.1:{port}"], 64 * MiB, 512 * MiB)
    seconds = []
    try:
        for n in range(repeats + 1):  # the first call opens the channel: not timed
            blob = ImageBlob(hashlib.sha256(str(n).encode()).hexdigest(), data=b"image")
            started = time.perf_counter()
            [result] = await client.encode(f"transfer-{n}", [blob], max_tiles=0, timeout_s=60)
            elapsed = time.perf_counter() - started
            assert result.embeddings.shape == SHAPE and result.embeddings.dtype == torch.bfloat16
            seconds += [elapsed] if n else []
    finally:
        await client.close()
    return seconds


async def time_tcp(port: int, repeats: int) -> list[float]:
    nbytes = SHAPE[0] * SHAPE[1] * 2
    # A stream limit of the whole tensor: with the 64 KiB default the reader pauses and resumes the socket
    # every 128 KiB, which measures asyncio's flow control rather than the transport.
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=nbytes)
    seconds = []
    try:
        for n in range(repeats + 1):
            started = time.perf_counter()
            writer.write(b"g")
            data = await reader.readexactly(nbytes)
            # The same end state as the gRPC client: a bf16 tensor of the right shape.
            received = torch.frombuffer(bytearray(data), dtype=torch.bfloat16).reshape(SHAPE)
            elapsed = time.perf_counter() - started
            assert received.shape == SHAPE
            seconds += [elapsed] if n else []
    finally:
        writer.close()
    return seconds


def run(repeats: int, chunk_bytes: int = MiB) -> str:
    """Markdown table of both transports, measured now."""
    nbytes = SHAPE[0] * SHAPE[1] * 2
    with ServerProcess(_serve_grpc, chunk_bytes) as port:
        grpc_s = median(asyncio.run(time_grpc(port, repeats)))
    with ServerProcess(_serve_tcp) as port:
        tcp_s = median(asyncio.run(time_tcp(port, repeats)))
    rows = [[f"gRPC stream ({chunk_bytes // 1024} KiB chunks)", grpc_s * 1e3, nbytes / 1e6 / grpc_s],
            ["raw TCP (asyncio streams)", tcp_s * 1e3, nbytes / 1e6 / tcp_s],
            ["gRPC / TCP", ratio(grpc_s, tcp_s), ratio(tcp_s, grpc_s)]]
    return (f"{nbytes / 1e6:.1f} MB ({SHAPE[0]} x {SHAPE[1]} bf16), median of {repeats}\n\n"
            + markdown_table(["transport", "ms", "MB/s"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed transfers per transport")
    parser.add_argument("--chunk-bytes", type=int, default=MiB, help="bytes per gRPC message (vision_svc's default)")
    args = parser.parse_args()
    print(run(args.repeats, args.chunk_bytes))


if __name__ == "__main__":
    main()
