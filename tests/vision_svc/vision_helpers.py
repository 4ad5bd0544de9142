"""A test client of vision_svc: one Encode call, the stream reassembled per image."""

import torch

from protos import tensors, vision_pb2


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
