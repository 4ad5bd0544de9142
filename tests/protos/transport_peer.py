"""A vision stage reduced to its data plane, for the transport tests: the real `EmbeddingSender` behind a
scripted VisionEncoder that encodes every image to a fixed tensor (`embeddings_of`).

    python tests/protos/transport_peer.py serve PORT_FILE SHM_DIR MARK_DIR [PORT [HOST]]

writes its port, serves until killed. request_id picks the behaviour: "stall" writes the image on the
negotiated transport, leaves MARK_DIR/written, then hangs before its gRPC message; "half" sends the image's
message, then half its socket frame, leaves the mark and hangs; anything else answers at once.

    python tests/protos/transport_peer.py receive PORT SHM_DIR TRANSPORT

is llm_svc's side: asks the server at PORT for one image with request_id "stall", over TRANSPORT.
"""

import asyncio
import pathlib
import sys

import torch

from protos import vision_pb2, vision_pb2_grpc
from protos.server import GrpcServer
from protos.transport import negotiation, socket_plane
from vision_svc.service import EncodedImage
from vision_svc.servicer import image_header_to_pb
from vision_svc.transport_sender import EmbeddingSender, SenderSettings

SERVICE = "internvl.vision.v1.VisionEncoder"
ROWS, WIDTH = 2 * 256, 1024  # two tiles of a 1024-wide model: 1 MiB of bf16


def embeddings_of(index: int) -> torch.Tensor:
    torch.manual_seed(index)
    return torch.randn(ROWS, WIDTH).to(torch.bfloat16)


class DataPlanePeer(vision_pb2_grpc.VisionEncoderServicer):
    def __init__(self, sender: EmbeddingSender, mark_dir: pathlib.Path | None):
        self.sender = sender
        self.mark_dir = mark_dir

    async def GetInfo(self, request, context):
        return vision_pb2.GetInfoResponse(llm_hidden=WIDTH, tokens_per_tile=256, max_tiles=1, use_thumbnail=True,
                                          dtype=vision_pb2.DTYPE_BFLOAT16)

    async def NegotiateDataPlane(self, request, context):
        return self.sender.negotiate(request)

    async def ReleaseDeviceMemory(self, request, context):
        return self.sender.release_device_memory(request)

    async def Encode(self, request, context):
        with self.sender.open(request) as sending:
            for index in range(len(request.images)):
                image = EncodedImage(index, f"{index:064x}", 2, embeddings_of(index), False)
                if request.request_id == "half":
                    yield vision_pb2.EncodeResponse(image_index=index, header=image_header_to_pb(image), last=True,
                                                    transport=vision_pb2.TRANSPORT_SOCKET)
                    await self._half_frame(request, image)
                messages = await sending.messages(image)
                if request.request_id == "stall":
                    self._mark()
                    await asyncio.sleep(3600)
                for message in messages:
                    yield message

    async def _half_frame(self, request, image: EncodedImage) -> None:
        conn = await self.sender._listener.claim(request.data_plane.socket_token, 10)
        data = memoryview(image.embeddings.view(torch.uint8).reshape(-1).numpy())
        header = socket_plane._FRAME.pack(socket_plane._MAGIC, image.index, len(data))
        await asyncio.to_thread(conn.sendall, header + bytes(data[:len(data) // 2]))
        self._mark()
        await asyncio.sleep(3600)

    def _mark(self) -> None:
        if self.mark_dir is not None:
            (self.mark_dir / "written").touch()


async def serve(shm_dir: str, mark_dir: pathlib.Path | None, port: int = 0,
                transports=(negotiation.SHM, negotiation.SOCKET), sweep_s: float = 0.5, host: str = "127.0.0.1"):
    """A started server and its sender (the caller drains and stops them)."""
    sender = EmbeddingSender(SenderSettings(tuple(transports), shm_dir, host, 0, sweep_s), 1 << 20)
    server = GrpcServer(host, port, 64 << 20, grace_s=0, announce_s=0)
    server.add_service(vision_pb2_grpc.add_VisionEncoderServicer_to_server, DataPlanePeer(sender, mark_dir), SERVICE)
    await server.start()
    await sender.start()
    await server.set_serving()
    return server, sender


async def main_serve(port_file: pathlib.Path, shm_dir: str, mark_dir: pathlib.Path, port: int, host: str) -> None:
    server, _ = await serve(shm_dir, mark_dir, port, host=host)
    port_file.write_text(str(server.port))
    await asyncio.Event().wait()


async def main_receive(port: int, shm_dir: str, transport: str) -> None:
    from llm_svc.embedding_receiver import ReceiverSettings
    from llm_svc.vision_client import ImageBlob, VisionClient
    client = VisionClient([f"127.0.0.1:{port}"], 64 << 20, 4 << 20, data_plane=ReceiverSettings(transport, shm_dir))
    await client.encode("stall", [ImageBlob("0" * 64, b"x")], 0, 3600)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(main_serve(pathlib.Path(sys.argv[2]), sys.argv[3], pathlib.Path(sys.argv[4]),
                               int(sys.argv[5]) if len(sys.argv) > 5 else 0,
                               sys.argv[6] if len(sys.argv) > 6 else "127.0.0.1"))
    else:
        asyncio.run(main_receive(int(sys.argv[2]), sys.argv[3], sys.argv[4]))
