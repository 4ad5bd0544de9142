"""VisionClient against scripted vision replicas on real loopback gRPC servers: retries, hash-first, resend."""

import hashlib

import pytest
import torch

from llm_svc.vision_client import ImageBlob, VisionClient
from protos import errors, vision_pb2, vision_pb2_grpc
from protos.server import GrpcServer
from vision_svc.service import MISSING_IMAGES_KEY, EncodedImage
from vision_svc.servicer import image_to_pb

SERVICE = "internvl.vision.v1.VisionEncoder"
ROWS, WIDTH = 256, 8


class ScriptedReplica(vision_pb2_grpc.VisionEncoderServicer):
    """Encodes every image to a constant tensor; `full` refuses all work; it remembers the hashes it encoded."""

    def __init__(self, full: bool = False):
        self.full = full
        self.known: set[str] = set()
        self.requests: list[vision_pb2.EncodeRequest] = []

    async def GetInfo(self, request, context):
        return vision_pb2.GetInfoResponse(llm_hidden=WIDTH, tokens_per_tile=256)

    async def Encode(self, request, context):
        self.requests.append(request)
        if self.full:
            raise errors.Overloaded("vision queue full")
        hashes = [i.content_hash if i.WhichOneof("source") == "content_hash" else hashlib.sha256(i.data).hexdigest()
                  for i in request.images]
        missing = [n for n, (i, h) in enumerate(zip(request.images, hashes)) if not i.data and h not in self.known]
        if missing:
            raise errors.NotFound("not cached", metadata=((MISSING_IMAGES_KEY, ",".join(map(str, missing))),))
        for n, h in enumerate(hashes):
            self.known.add(h)
            for message in image_to_pb(EncodedImage(n, h, 1, torch.full((ROWS, WIDTH), float(n)), False), 1024):
                yield message


@pytest.fixture
async def replicas():
    servers, scripts = [], [ScriptedReplica(), ScriptedReplica()]
    for script in scripts:
        server = GrpcServer("127.0.0.1", 0, 8 << 20, grace_s=0, announce_s=0)
        server.add_service(vision_pb2_grpc.add_VisionEncoderServicer_to_server, script, SERVICE)
        await server.start()
        servers.append(server)
    client = VisionClient([f"127.0.0.1:{s.port}" for s in servers], 8 << 20, 1 << 30)
    yield client, scripts
    await client.close()
    for server in servers:
        await server.drain()


def blob(seed: int) -> ImageBlob:
    data = f"image-{seed}".encode()
    return ImageBlob(hashlib.sha256(data).hexdigest(), data)


def routed_to(replica: int) -> ImageBlob:
    """An image whose content hash routes it to `replica` first (of two)."""
    return next(b for b in map(blob, range(100)) if int(b.content_hash[:8], 16) % 2 == replica)


async def test_a_full_replica_is_retried_on_the_other(replicas):
    client, scripts = replicas
    scripts[0].full = True
    result = await client.encode("r", [routed_to(0)], max_tiles=0, timeout_s=5)
    assert result[0].embeddings.shape == (ROWS, WIDTH)
    assert len(scripts[0].requests) == 1 and len(scripts[1].requests) == 1


async def test_recent_images_travel_as_hashes_and_are_resent_when_forgotten(replicas):
    client, scripts = replicas
    image = routed_to(1)
    await client.encode("r1", [image], max_tiles=0, timeout_s=5)
    await client.encode("r2", [image], max_tiles=0, timeout_s=5)
    assert scripts[1].requests[1].images[0].WhichOneof("source") == "content_hash"
    scripts[1].known.clear()  # evicted on the replica
    result = await client.encode("r3", [image], max_tiles=0, timeout_s=5)
    assert [r.images[0].WhichOneof("source") for r in scripts[1].requests[2:]] == ["content_hash", "data"]
    assert result[0].content_hash == image.content_hash


async def test_an_image_named_only_by_an_unknown_hash_is_invalid_input(replicas):
    client, _ = replicas
    with pytest.raises(errors.InvalidInput, match="send their bytes"):
        await client.encode("r", [ImageBlob("ab" * 32, None)], max_tiles=0, timeout_s=5)
