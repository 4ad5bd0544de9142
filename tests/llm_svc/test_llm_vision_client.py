"""VisionClient against scripted vision replicas on real loopback gRPC servers: retries, hash-first, resend."""

import asyncio
import hashlib
import time

import grpc
import pytest
import torch

from llm_svc.video_client import VideoBlob, VideoOptions
from llm_svc.vision_client import ImageBlob, VisionClient
from protos import errors, vision_pb2, vision_pb2_grpc
from protos.endpoints import Address, Endpoint, rendezvous_order
from protos.server import GrpcServer
from vision_svc.service import MISSING_IMAGES_KEY, EncodedImage
from vision_svc.servicer import image_to_pb

SERVICE = "internvl.vision.v1.VisionEncoder"
ROWS, WIDTH = 256, 8


class ScriptedReplica(vision_pb2_grpc.VisionEncoderServicer):
    """Encodes every image to a constant tensor; `full` refuses all work; it remembers the hashes it encoded."""

    def __init__(self, full: bool = False):
        self.full = full
        self.down = False
        self.known: set[str] = set()
        self.requests: list[vision_pb2.EncodeRequest] = []

    async def GetInfo(self, request, context):
        return vision_pb2.GetInfoResponse(llm_hidden=WIDTH, tokens_per_tile=256)

    async def Encode(self, request, context):
        self.requests.append(request)
        if self.full:
            raise errors.Overloaded("vision queue full")
        if self.down:
            raise errors.Unavailable("vision_svc is draining")
        if request.videos:
            for n, video in enumerate(request.videos):
                encoded = EncodedImage(n, hashlib.sha256(video.data).hexdigest(), 2, torch.full((ROWS, WIDTH), 1.0),
                                       False)
                for message in image_to_pb(encoded, 1024):
                    message.video = True
                    yield message
            return
        hashes = [i.content_hash if i.WhichOneof("source") == "content_hash" else hashlib.sha256(i.data).hexdigest()
                  for i in request.images]
        missing = [n for n, (i, h) in enumerate(zip(request.images, hashes)) if not i.data and h not in self.known]
        if missing:
            raise errors.NotFound("not cached", metadata=((MISSING_IMAGES_KEY, ",".join(map(str, missing))),))
        for n, h in enumerate(hashes):
            self.known.add(h)
            for message in image_to_pb(EncodedImage(n, h, 1, torch.full((ROWS, WIDTH), float(n)), False), 1024):
                yield message


HOSTS = ("127.0.0.1", "127.0.0.2")  # two replicas at addresses of their own, as pods have


@pytest.fixture
async def replicas():
    servers, scripts = [], [ScriptedReplica(), ScriptedReplica()]
    for host, script in zip(HOSTS, scripts):
        server = GrpcServer(host, 0, 8 << 20, grace_s=0, announce_s=0)
        server.add_service(vision_pb2_grpc.add_VisionEncoderServicer_to_server, script, SERVICE)
        await server.start()
        await server.set_serving()
        servers.append(server)
    addresses = [Address(host, server.port, host) for host, server in zip(HOSTS, servers)]
    client = VisionClient([f"{a.host}:{a.port}" for a in addresses], 8 << 20, 1 << 30)
    routes.clear()
    routes.extend(addresses)
    yield client, scripts, servers
    await client.close()
    for server in servers:
        await server.drain()


# The replicas' addresses in the running test, for `home_of`.
routes: list[Address] = []


def blob(seed: int) -> ImageBlob:
    data = f"image-{seed}".encode()
    return ImageBlob(hashlib.sha256(data).hexdigest(), data)


def home_of(image: ImageBlob) -> int:
    """The replica whose cache an image's content hash picks (rendezvous hashing over both)."""
    first = rendezvous_order(image.content_hash, [Endpoint(a, None) for a in routes])[0]
    return routes.index(first.address)


def assert_each_went_home(images: list[ImageBlob], scripts: list[ScriptedReplica]) -> None:
    """Each image was sent once, to the replica its content hash picks."""
    assert sum(len(script.requests) for script in scripts) == len(images)
    for n, script in enumerate(scripts):
        assert {r.images[0].data for r in script.requests} == {i.data for i in images if home_of(i) == n}


def routed_to(replica: int) -> ImageBlob:
    """An image whose content hash routes it to `replica` first (of two)."""
    return next(b for b in map(blob, range(100)) if home_of(b) == replica)


async def test_a_full_replica_is_retried_on_the_other(replicas):
    client, scripts, _ = replicas
    scripts[0].full = True
    result = await client.encode("r", [routed_to(0)], max_tiles=0, timeout_s=5)
    assert result[0].embeddings.shape == (ROWS, WIDTH)
    assert len(scripts[0].requests) == 1 and len(scripts[1].requests) == 1


async def test_a_video_whose_replica_is_down_or_full_is_retried_on_the_other(replicas):
    client, scripts, _ = replicas
    video = VideoBlob(routed_to(0).content_hash, routed_to(0).data)
    for script in scripts:
        script.full = True
    with pytest.raises(errors.Overloaded):
        await client.encode_videos("v0", [video], VideoOptions(num_frames=2, fps=None), timeout_s=5)
    assert [len(s.requests) for s in scripts] == [1, 1]
    scripts[1].full = False
    result = await client.encode_videos("v1", [video], VideoOptions(num_frames=2, fps=None), timeout_s=5)
    assert result[0].embeddings.shape == (ROWS, WIDTH) and [len(s.requests) for s in scripts] == [2, 2]
    scripts[0].full, scripts[0].down = False, True
    await client.encode_videos("v2", [video], VideoOptions(num_frames=2, fps=None), timeout_s=5)
    assert [len(s.requests) for s in scripts] == [3, 3]


async def test_a_replica_that_answered_unavailable_is_skipped_until_it_cooled_down(replicas):
    client, scripts, _ = replicas
    scripts[0].down = True
    for seed in range(2):
        await client.encode(f"r{seed}", [routed_to(0)], max_tiles=0, timeout_s=5)
    assert len(scripts[0].requests) == 1 and len(scripts[1].requests) == 2  # the second went to replica 1 at once
    scripts[0].down = False
    for endpoint in client._endpoints.live():
        endpoint.down_until = min(endpoint.down_until, time.monotonic())  # the cooldown is over; its channel ready
    await client.encode("r2", [routed_to(0)], max_tiles=0, timeout_s=5)
    assert len(scripts[0].requests) == 2


async def test_a_replica_that_says_not_serving_gets_no_images_until_it_serves_again(replicas):
    """Its channel checks health: a stuck or draining replica is passed over without a call, and taken back once it
    says SERVING."""
    client, scripts, servers = replicas
    images = [b for b in map(blob, range(100)) if home_of(b) == 0][:4]
    await client.encode("r0", images[:1], max_tiles=0, timeout_s=5)
    channel = next(e.connection.channel for e in client._endpoints.live() if e.address.host == HOSTS[0])
    await servers[0].set_not_serving("stuck")
    await asyncio.wait_for(channel.wait_for_state_change(grpc.ChannelConnectivity.READY), 10)
    for n, image in enumerate(images[1:]):
        await client.encode(f"r{n + 1}", [image], max_tiles=0, timeout_s=5)
    assert len(scripts[0].requests) == 1 and len(scripts[1].requests) == 3
    await servers[0].set_serving()
    await asyncio.wait_for(channel.channel_ready(), 10)
    await client.encode("r4", images[:1], max_tiles=0, timeout_s=5)
    assert len(scripts[0].requests) == 2


async def test_get_info_reaches_a_replica_still_warming_up(replicas):
    """At start llm_svc asks for GetInfo while vision_svc may still be NOT_SERVING (warming up): its engine loads
    meanwhile."""
    client, _, servers = replicas
    for server in servers:
        await server.set_not_serving("warming up")
    assert (await client.get_info(timeout_s=10)).llm_hidden == WIDTH


async def test_recent_images_travel_as_hashes_and_are_resent_when_forgotten(replicas):
    client, scripts, _ = replicas
    image = routed_to(1)
    await client.encode("r1", [image], max_tiles=0, timeout_s=5)
    await client.encode("r2", [image], max_tiles=0, timeout_s=5)
    assert scripts[1].requests[1].images[0].WhichOneof("source") == "content_hash"
    scripts[1].known.clear()  # evicted on the replica
    result = await client.encode("r3", [image], max_tiles=0, timeout_s=5)
    assert [r.images[0].WhichOneof("source") for r in scripts[1].requests[2:]] == ["content_hash", "data"]
    assert result[0].content_hash == image.content_hash


async def test_an_image_named_only_by_an_unknown_hash_is_invalid_input(replicas):
    client, _, _ = replicas
    with pytest.raises(errors.InvalidInput, match="send their bytes"):
        await client.encode("r", [ImageBlob("ab" * 32, None)], max_tiles=0, timeout_s=5)


async def test_each_embedding_is_held_when_its_header_arrives(replicas):
    client, _, _ = replicas
    held = []
    await client.encode("r", [blob(1), blob(2)], max_tiles=0, timeout_s=5, hold_bytes=held.append)
    assert held == [ROWS * WIDTH * 4, ROWS * WIDTH * 4]  # float32 tensors, as announced


async def test_an_embedding_past_the_callers_budget_is_overloaded_and_not_retried_elsewhere(replicas):
    client, scripts, _ = replicas

    def full(nbytes: int) -> None:
        raise errors.Overloaded("llm_svc holds too much")

    with pytest.raises(errors.Overloaded, match="llm_svc holds too much"):
        await client.encode("r", [routed_to(0)], max_tiles=0, timeout_s=5, hold_bytes=full)
    assert len(scripts[0].requests) == 1 and scripts[1].requests == []


async def test_each_image_goes_to_the_replica_its_hash_picks_and_both_get_their_share(replicas):
    client, scripts, _ = replicas
    images = [blob(n) for n in range(20)]
    for image in images:
        await client.encode("r", [image], max_tiles=0, timeout_s=5)
    assert_each_went_home(images, scripts)
    assert all(script.requests for script in scripts)


async def test_an_address_list_target_is_one_replica_per_address(replicas):
    _, scripts, _ = replicas
    # Both homes appear whatever ports the replicas got: eight arbitrary images all land on one in 1 run of 128.
    images = [routed_to(0), routed_to(1), *map(blob, range(100, 106))]  # routed_to draws from 0-99
    client = VisionClient([f"ipv4:{routes[0].target},{routes[1].target}"], 8 << 20, 1 << 30)
    try:
        for image in images:
            await client.encode("r", [image], max_tiles=0, timeout_s=5)
    finally:
        await client.close()
    assert_each_went_home(images, scripts)
