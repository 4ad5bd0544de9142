"""Videos through a real vision_svc on a loopback port: embeddings of vLLM's frames, the cache, the limits, and
hostile files refused with INVALID_ARGUMENT while the server stays SERVING."""

import asyncio

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import tensors, vision_pb2
from tests.vision_svc.video_helpers import hostile_videos, make_video
from tests.vision_svc.vision_helpers import running_vision
from vision_svc.cache import content_hash
from vision_svc.encoder import load_encoder
from vision_svc.tiling import normalize_tiles
from vision_svc.video_decode import FrameSampling, VideoLimits, decode_video
from vision_svc.video_frames import frames_to_tile_pixels


@pytest.fixture(scope="module")
async def vision(tiny_checkpoint):
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    async with running_vision(model, max_batch_tiles=16, max_videos_per_request=2, max_video_frames=12,
                              max_video_bytes=1 << 20, chunk_bytes=64 << 10, grace_s=1) as (stub, server):
        yield stub, model


async def encode_videos(stub, videos: list[vision_pb2.VideoInput], **options):
    """{index: (header, embeddings)}, checking that every message is marked as a video's."""
    out, assembling = {}, {}
    request = vision_pb2.EncodeRequest(request_id="test", videos=videos,
                                       video_options=vision_pb2.VideoOptions(**options))
    async for message in stub.Encode(request):
        assert message.video
        if message.HasField("header"):
            assembling[message.image_index] = (message.header, tensors.TensorAssembler(message.header.tensor, 1 << 30))
        header, assembler = assembling[message.image_index]
        assembler.add(message.data)
        if message.last:
            out[message.image_index] = (header, assembler.finish())
    return out


def expected_embeddings(model, data: bytes, sampling: FrameSampling) -> torch.Tensor:
    encoder, spec = load_encoder(model, "cpu", torch.float32)
    tiles = normalize_tiles(frames_to_tile_pixels(decode_video(data, VideoLimits(), sampling), spec.image_size))
    with torch.inference_mode():
        return encoder(torch.from_numpy(tiles)).reshape(-1, spec.llm_hidden)


async def test_a_video_s_embeddings_are_its_sampled_frames_encoded_in_order_and_cached(vision):
    stub, model = vision
    clip = make_video(20)
    first = await encode_videos(stub, [vision_pb2.VideoInput(data=clip)], num_frames=6)
    header, embeddings = first[0]
    assert header.num_tiles == 6 and not header.cache_hit and header.content_hash == content_hash(clip)
    torch.testing.assert_close(embeddings, expected_embeddings(model, clip, FrameSampling(num_frames=6)),
                               rtol=1e-4, atol=1e-4)
    again = await encode_videos(stub, [vision_pb2.VideoInput(content_hash=content_hash(clip))], num_frames=6)
    assert again[0][0].cache_hit and torch.equal(again[0][1], embeddings)
    # Other options sample other frames: not the cached entry.
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await encode_videos(stub, [vision_pb2.VideoInput(content_hash=content_hash(clip))], num_frames=5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_the_default_is_vllm_s_32_frames_lowered_to_the_server_s_limit(vision):
    stub, _ = vision
    short = await encode_videos(stub, [vision_pb2.VideoInput(data=make_video(9))])
    assert short[0][0].num_tiles == 9  # fewer frames than the default: all of them
    long = await encode_videos(stub, [vision_pb2.VideoInput(data=make_video(40))])
    assert long[0][0].num_tiles == 12
    capped = await encode_videos(stub, [vision_pb2.VideoInput(data=make_video(9, fps=4.0))], fps=2.0)
    assert capped[0][0].num_tiles == 4  # 2.25 s at 2 frames per second


@pytest.mark.parametrize("videos,options,message", [
    ([make_video(40)], {"num_frames": -1}, "40 frames sampled, over the limit of 12"),
    ([make_video(4)], {"num_frames": 13}, "over this server's limit of 12"),
    ([make_video(4)] * 3, {}, "3 videos in one request; the limit is 2"),
    ([b"\0" * (1 << 20 + 1)], {}, "over the limit of 1048576"),
    *[([data], {}, "video 0") for data in hostile_videos().values()],
])
async def test_hostile_videos_are_invalid_argument_and_the_server_stays_serving(vision, videos, options, message):
    stub, _ = vision
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await encode_videos(stub, [vision_pb2.VideoInput(data=d) for d in videos], **options)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert (await encode_videos(stub, [vision_pb2.VideoInput(data=make_video(3))]))[0][0].num_tiles == 3


async def test_images_and_videos_in_one_request_are_refused(vision):
    stub, _ = vision
    request = vision_pb2.EncodeRequest(images=[vision_pb2.ImageInput(data=b"x")],
                                       videos=[vision_pb2.VideoInput(data=make_video(2))])
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for _ in stub.Encode(request):
            pass
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_get_info_tells_the_video_limits(vision):
    stub, _ = vision
    info = await stub.GetInfo(vision_pb2.GetInfoRequest())
    assert (info.max_videos_per_request, info.max_video_frames, info.max_video_bytes, info.default_video_frames) == (
        2, 12, 1 << 20, 12)


async def test_a_stuck_stage_sends_a_video_in_hand_back_and_refuses_new_ones_until_it_moves(tiny_checkpoint):
    model = tiny_checkpoint(layout="original", llm="dense", vision="300m")
    async with running_vision(model, max_batch_tiles=32, batch_wait_ms=1500, max_videos_per_request=1,
                              max_video_frames=12, max_video_bytes=1 << 20) as (stub, server):
        with server.runner.expecting():  # an image announced and never sent: each batch waits 1.5 s for it
            in_hand = asyncio.ensure_future(encode_videos(stub, [vision_pb2.VideoInput(data=make_video(8))],
                                                          num_frames=4))
            await asyncio.sleep(0.5)
            await server.stalled("no progress for 60 s in encoder")
            with pytest.raises(grpc.aio.AioRpcError) as sent_back:
                await asyncio.wait_for(in_hand, 1)
            assert sent_back.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "image work is stuck (no progress for 60 s in encoder)" in sent_back.value.details()
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await encode_videos(stub, [vision_pb2.VideoInput(data=make_video(8))], num_frames=4)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            await server.moving_again()
        assert len((await encode_videos(stub, [vision_pb2.VideoInput(data=make_video(8))], num_frames=4))[0][1]) > 0
