"""vision_svc for tests: a real server on a loopback port, and a client whose Encode reassembles the stream."""

import contextlib
import pathlib

import grpc
import torch

from protos import tensors, vision_pb2, vision_pb2_grpc
from vision_svc.config import VisionConfig
from vision_svc.server import VisionServer


@contextlib.asynccontextmanager
async def running_vision(model: pathlib.Path, **config):
    """`async with running_vision(model, max_batch_tiles=4) as (stub, server)`: started, warm, on port 0."""
    server = VisionServer(VisionConfig(model=model, host="127.0.0.1", port=0,
                                       **{"grace_s": 0, "preprocess_workers": 0, **config}))
    port = await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield vision_pb2_grpc.VisionEncoderStub(channel), server
    finally:
        await server.stop()


async def encode(stub, images: list[vision_pb2.ImageInput], max_tiles: int = 0,
                 ) -> dict[int, tuple[vision_pb2.ImageHeader, torch.Tensor]]:
    """{index: (header, embeddings)}, checking that each image's chunks arrive contiguous."""
    out, current, assembler, header = {}, None, None, None
    request = vision_pb2.EncodeRequest(request_id="test", images=images,
                                       options=vision_pb2.PreprocessOptions(max_tiles=max_tiles))
    async for message in stub.Encode(request):
        if message.HasField("header"):
            assert current is None, "chunks of two images interleaved"
            current, header = message.image_index, message.header
            assembler = tensors.TensorAssembler(header.tensor, max_bytes=1 << 30)
        assert message.image_index == current
        assembler.add(message.data)
        if message.last:
            out[current] = (header, assembler.finish())
            current = None
    return out
