"""vision_svc end to end: a real server on a loopback port, real encoder, real gRPC client."""

import asyncio
import contextlib
import dataclasses
import io
import pathlib
import threading

import grpc
import prometheus_client
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from prometheus_client import REGISTRY

from protos import vision_pb2
from protos.errors import RETRY_AFTER_KEY
from tests.vision_svc.vision_helpers import encode, running_vision
from vision_svc.cache import content_hash
from vision_svc.config import VisionConfig
from vision_svc.encoder import load_encoder
from vision_svc.server import resolve_threads
from vision_svc.tiling import TileOptions, image_to_tile_array


def png(width: int, height: int, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (height, width, 3), dtype=torch.uint8, generator=generator)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
async def vision(tiny_checkpoint):
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    async with running_vision(model, max_batch_tiles=16, batch_wait_ms=100, max_queue_tiles=64,
                              max_images_per_request=4, max_image_bytes=2 << 20, max_image_pixels=4_000_000,
                              chunk_bytes=64 << 10, grace_s=1) as (stub, server):
        yield stub, server


def expected_embeddings(model: pathlib.Path, data: bytes, max_tiles: int = 12) -> torch.Tensor:
    encoder, spec = load_encoder(model, "cpu", torch.float32)
    tiles = image_to_tile_array(Image.open(io.BytesIO(data)).convert("RGB"), TileOptions(max_tiles=max_tiles))
    with torch.inference_mode():
        return encoder(torch.from_numpy(tiles)).reshape(-1, spec.llm_hidden)


async def test_concurrent_clients_each_get_their_own_embeddings_batched(vision, tiny_checkpoint):
    stub, server = vision
    images = [png(300 + 97 * i, 200 + 61 * i, seed=i) for i in range(6)]
    passes_before = REGISTRY.get_sample_value("vision_batch_tiles_count") or 0
    results = await asyncio.gather(*(encode(stub, [vision_pb2.ImageInput(data=d)], max_tiles=2) for d in images))
    passes = REGISTRY.get_sample_value("vision_batch_tiles_count") - passes_before
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    total_tiles = 0
    for data, result in zip(images, results):
        header, embeddings = result[0]
        assert header.content_hash == content_hash(data)
        assert header.num_tiles * 256 == embeddings.shape[0]
        torch.testing.assert_close(embeddings, expected_embeddings(model, data, max_tiles=2), rtol=1e-5, atol=1e-5)
        total_tiles += header.num_tiles
    # Tiles of different requests shared forward passes (16 tiles a pass at most).
    assert passes < len(images) and passes >= -(-total_tiles // 16)


async def test_several_images_stream_each_complete_and_indexed(vision):
    stub, _ = vision
    images = [png(120, 90, seed=10), png(900, 500, seed=11), png(64, 640, seed=12)]
    result = await encode(stub, [vision_pb2.ImageInput(data=d) for d in images])
    assert sorted(result) == [0, 1, 2]
    assert [result[i][0].content_hash for i in range(3)] == [content_hash(d) for d in images]
    assert result[1][0].num_tiles == 3  # 2 tiles + thumbnail for a 900x500 image


async def test_repeated_image_is_served_from_cache_and_by_hash(vision):
    stub, _ = vision
    data = png(500, 400, seed=20)
    first = await encode(stub, [vision_pb2.ImageInput(data=data)])
    hits_before = REGISTRY.get_sample_value("vision_cache_hits_total")
    by_hash = await encode(stub, [vision_pb2.ImageInput(content_hash=content_hash(data))])
    assert by_hash[0][0].cache_hit and not first[0][0].cache_hit
    assert torch.equal(by_hash[0][1], first[0][1])
    assert REGISTRY.get_sample_value("vision_cache_hits_total") == hits_before + 1


async def test_unknown_hash_is_not_found_and_names_the_image(vision):
    stub, _ = vision
    known = png(100, 100, seed=30)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await encode(stub, [vision_pb2.ImageInput(data=known), vision_pb2.ImageInput(content_hash="ab" * 32)])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "resend" in error.value.details()
    assert ("missing-image-indices", "1") in tuple(error.value.trailing_metadata())


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header announcing a huge image, with almost no data."""
    import struct
    import zlib
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("images,max_tiles,code,message", [
    ([b"not an image at all"], 0, grpc.StatusCode.INVALID_ARGUMENT, "image 0"),
    ([png(10, 10, 1), b""], 0, grpc.StatusCode.INVALID_ARGUMENT, "image 1"),
    ([png(10, 10, 1), png(10, 10, 2)[:60]], 0, grpc.StatusCode.INVALID_ARGUMENT, "image 1"),
    ([bomb_png(40000, 40000)], 0, grpc.StatusCode.INVALID_ARGUMENT, "4000000"),
    ([b"\0" * (3 << 20)], 0, grpc.StatusCode.INVALID_ARGUMENT, "limit of 2097152"),
    ([png(10, 10, i) for i in range(5)], 0, grpc.StatusCode.INVALID_ARGUMENT, "the limit is 4"),
    ([png(10, 10, 1)], 13, grpc.StatusCode.INVALID_ARGUMENT, "limit of 12"),
    ([], 0, grpc.StatusCode.INVALID_ARGUMENT, "no images"),
])
async def test_hostile_requests_get_clear_errors_and_server_stays_healthy(vision, images, max_tiles, code, message):
    stub, _ = vision
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await encode(stub, [vision_pb2.ImageInput(data=d) for d in images], max_tiles=max_tiles)
    assert error.value.code() == code
    assert message in error.value.details()
    ok = await encode(stub, [vision_pb2.ImageInput(data=png(50, 50, seed=99))])
    assert ok[0][1].shape == (256, ok[0][1].shape[1])


async def test_unknown_thumbnail_option_is_invalid_argument(vision):
    stub, _ = vision
    request = vision_pb2.EncodeRequest(images=[vision_pb2.ImageInput(data=png(10, 10, 1))],
                                       options=vision_pb2.PreprocessOptions(thumbnail=7))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        [m async for m in stub.Encode(request)]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "thumbnail" in error.value.details()


async def test_full_queue_answers_resource_exhausted_and_an_empty_queue_takes_any_image(tiny_checkpoint):
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    # Work waits up to 1.5 s for a full batch while an image is on its way (one is announced and never comes), so
    # the first image is still queued when the second arrives.
    async with running_vision(model, max_batch_tiles=4, max_queue_tiles=4, batch_wait_ms=1500) as (stub, server):
        with awaited_image(server):
            first = asyncio.ensure_future(encode(stub, [vision_pb2.ImageInput(data=png(900, 500, seed=5))]))
            for _ in range(100):  # until its 3 tiles are queued (preprocessing takes longer on a busy machine)
                if prometheus_client.REGISTRY.get_sample_value("vision_queue_tiles") == 3:
                    break
                await asyncio.sleep(0.05)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await encode(stub, [vision_pb2.ImageInput(data=png(901, 500, seed=6))])
            assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "3 tiles queued, limit 4" in error.value.details()
            assert (await first)[0][0].num_tiles == 3
            # 8 tiles + thumbnail, more than the queue holds: taken when the queue is empty.
            assert (await encode(stub, [vision_pb2.ImageInput(data=png(1800, 900, seed=7))]))[0][0].num_tiles == 9


@contextlib.contextmanager
def awaited_image(server):
    """An image announced to the encoder and never sent: every batch waits the whole --batch-wait-ms for it."""
    with server.runner.expecting():
        yield


@pytest.fixture
async def slow_vision(tiny_checkpoint):
    """One image at a time, and work waits 1.5 s for a full batch: requests can be caught while pending."""
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    async with running_vision(model, max_batch_tiles=32, batch_wait_ms=1500, max_pending_images=1) as (stub, server):
        with awaited_image(server):
            yield stub


async def test_images_over_the_pending_limit_are_refused_before_any_work(slow_vision):
    first = asyncio.ensure_future(encode(slow_vision, [vision_pb2.ImageInput(data=png(300, 200, seed=40))]))
    await asyncio.sleep(0.3)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await encode(slow_vision, [vision_pb2.ImageInput(data=png(300, 200, seed=41))])
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "1 images are being encoded" in error.value.details()
    assert (await first)[0][0].num_tiles == 7  # 3:2 at this size: a 3x2 grid + thumbnail


async def test_work_of_a_cancelled_request_is_dropped(slow_vision):
    tiles_before = REGISTRY.get_sample_value("vision_tiles_encoded_total")
    call = slow_vision.Encode(vision_pb2.EncodeRequest(images=[vision_pb2.ImageInput(data=png(300, 200, seed=42))]))
    await asyncio.sleep(0.3)  # preprocessed, waiting in the encoder's queue
    assert REGISTRY.get_sample_value("vision_pending_images") == 1
    call.cancel()
    await asyncio.sleep(0.3)
    assert REGISTRY.get_sample_value("vision_pending_images") == 0
    await asyncio.sleep(1.5)  # past the batch wait: the dropped tiles never reach the encoder
    assert REGISTRY.get_sample_value("vision_tiles_encoded_total") == tiles_before


async def test_a_stuck_stage_sends_its_images_back_and_refuses_new_ones_until_it_moves(tiny_checkpoint):
    """What the stall watch does once the stage's work is stuck (tests/vision_svc/test_vision_stall.py has the watch
    find a stopped worker): the images in hand, shared ones too, fail UNAVAILABLE at once; cached ones are served."""
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    async with running_vision(model, max_batch_tiles=32, batch_wait_ms=1500) as (stub, server):
        cached = png(200, 100, seed=50)
        await encode(stub, [vision_pb2.ImageInput(data=cached)])
        with awaited_image(server):  # the next images wait 1.5 s in the encoder's queue
            in_hand = [asyncio.ensure_future(encode(stub, [vision_pb2.ImageInput(data=png(300, 200, seed=51))]))
                       for _ in range(2)]  # the second waits on the first's work
            await asyncio.sleep(0.3)
            await server.stalled("no progress for 60 s in encoder")
            for request in in_hand:
                with pytest.raises(grpc.aio.AioRpcError) as sent_back:
                    await asyncio.wait_for(request, 1)
                assert sent_back.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "image work is stuck (no progress for 60 s in encoder); retry on another replica" in \
                    sent_back.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await encode(stub, [vision_pb2.ImageInput(data=png(300, 200, seed=52))])
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert (await encode(stub, [vision_pb2.ImageInput(content_hash=content_hash(cached))]))[0][0].cache_hit
            assert REGISTRY.get_sample_value("vision_pending_images") == 0
            await server.moving_again()
        assert (await encode(stub, [vision_pb2.ImageInput(data=png(300, 200, seed=52))]))[0][0].num_tiles == 7


def test_config_refuses_bad_limits():
    with pytest.raises(ValueError, match="--max-batch-tiles must be positive"):
        VisionConfig(model=pathlib.Path("."), max_batch_tiles=0)
    with pytest.raises(ValueError, match="--max-bytes-in-flight .* below what one request may hold"):
        VisionConfig(model=pathlib.Path("."), max_message_bytes=64 << 20, max_bytes_in_flight=32 << 20)
    with pytest.raises(ValueError, match="--max-tiles"):
        dataclasses.replace(VisionConfig(model=pathlib.Path(".")), max_tiles=100)
    with pytest.raises(ValueError, match="--threads must be positive"):
        VisionConfig(model=pathlib.Path("."), threads=0)


def test_encoder_threads_leave_one_cpu_free(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert resolve_threads(None) == 7
    assert resolve_threads(8) == 8  # asked for: taken as is
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert resolve_threads(None) == 1


async def test_a_bf16_server_on_a_cpu_without_bf16_kernels_says_so_and_encodes_through_fp32(
        tiny_checkpoint, monkeypatch, caplog):
    # Whether this CPU has bf16 kernels varies by machine: the server is told it has none.
    monkeypatch.setattr("kernels.cpu.NATIVE_MATMUL_DTYPES", frozenset({torch.float32}))
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    data = png(500, 300, seed=5)
    with caplog.at_level("INFO", logger="vision_svc.server"):
        async with running_vision(model, dtype="bfloat16") as (stub, _):
            (header, embeddings), = (await encode(stub, [vision_pb2.ImageInput(data=data)], max_tiles=2)).values()
    assert "oneDNN has no torch.bfloat16 matmuls on this CPU" in caplog.text
    assert embeddings.dtype == torch.bfloat16
    expected = expected_embeddings(model, data, max_tiles=2)  # fp32
    assert ((embeddings.float() - expected).abs().max() / expected.abs().max()).item() < 2e-2

async def test_image_bytes_are_hashed_off_the_event_loop(vision, monkeypatch):
    stub, _ = vision
    hashed_on = []

    def recording_hash(data: bytes) -> str:
        hashed_on.append(threading.current_thread())
        return content_hash(data)

    monkeypatch.setattr("vision_svc.service.content_hash", recording_hash)
    await encode(stub, [vision_pb2.ImageInput(data=png(40, 30, seed=77))])
    assert hashed_on and threading.main_thread() not in hashed_on


async def outcome(stub, images: list[bytes]) -> tuple[grpc.StatusCode, tuple]:
    try:
        await encode(stub, [vision_pb2.ImageInput(data=d) for d in images], max_tiles=1)
    except grpc.aio.AioRpcError as error:
        return error.code(), tuple(error.trailing_metadata() or ())
    return grpc.StatusCode.OK, ()


async def test_a_flood_of_large_requests_gets_answers_or_retry_hints_and_everything_held_returns(tiny_checkpoint):
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    # Room for 3 requests, or for 2 of the 3 MB below; work waits 0.5 s for a batch, so the flood overlaps.
    async with running_vision(model, max_requests_in_flight=3, max_bytes_in_flight=7 << 20, max_message_bytes=4 << 20,
                              batch_wait_ms=500) as (stub, server):
        flood = [[png(600, 600, seed=1000 + 2 * n), png(600, 600, seed=1001 + 2 * n)] for n in range(16)]
        assert len(flood[0][0]) > 1 << 20
        outcomes = await asyncio.gather(*(outcome(stub, images) for images in flood))
        codes = [code for code, _ in outcomes]
        assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
        assert all((RETRY_AFTER_KEY, "1") in metadata for code, metadata in outcomes if code != grpc.StatusCode.OK)
        limit = server.service.work_limit
        assert (limit.requests, limit.bytes) == (0, 0)
        assert REGISTRY.get_sample_value("vision_admitted_requests") == 0
        assert REGISTRY.get_sample_value("vision_held_bytes") == 0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc.port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert (await encode(stub, [vision_pb2.ImageInput(data=flood[0][0])], max_tiles=1))[0][0].num_tiles == 1
