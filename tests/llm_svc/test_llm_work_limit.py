"""llm_svc's bounded work in flight, with the engine and the vision stage replaced by fakes: what a request holds
(its message, then each embedding), the refusals past the limits, and that everything returns however a request
ends (finished, refused, failed in the vision stage, cancelled mid-stream)."""

import asyncio
import dataclasses
import types

import grpc
import pytest
import torch
from vllm.outputs import CompletionOutput

from llm_svc.config import LlmConfig
from llm_svc.limits import ModelDimensions, RequestLimits, WorkLimitTooSmall, check_work_limit, largest_request_bytes
from llm_svc.service import LanguageService
from llm_svc.servicer import LanguageModelServicer
from llm_svc.vision_client import ImageEmbedding
from protos import errors, llm_pb2, vision_pb2
from protos.errors import RETRY_AFTER_KEY
from tests.llm_svc.test_llm_service_unit import FixedRenderer

DIMS = ModelDimensions(hidden_size=16, tokens_per_tile=4, max_model_len=128)
EMBEDDING = torch.zeros(8, 16)  # 2 tiles: 512 bytes
LIMITS = RequestLimits(max_images_per_request=4, max_request_bytes=100_000, max_image_bytes_per_request=100_000,
                       max_embedding_bytes=1 << 20, vision_timeout_s=5, max_requests_in_flight=2,
                       max_bytes_in_flight=10_000)


class Vision:
    """Holds each image's embedding bytes as the real client does when a header arrives; or fails like a vision
    stage that went down."""

    def __init__(self, failure: errors.ServingError | None = None):
        self.failure = failure

    async def encode(self, request_id, images, max_tiles, timeout_s, hold_bytes):
        if self.failure:
            raise self.failure
        for _ in images:
            hold_bytes(EMBEDDING.nbytes)
        return [ImageEmbedding("h" * 64, 2, EMBEDDING, False) for _ in images]


class Admission:
    async def check(self, request_id, text, images, max_tiles, sampling, tok_params=None):
        return {"type": "token"}  # holds no stand-ins to swap: the prompt is rendered after the vision call


class Engine:
    """Streams one token every 10 ms, `tokens` of them (forever when None); records what the request held."""

    def __init__(self, service_of, tokens: int | None = 3):
        self.tokens = tokens
        self.service_of = service_of
        self.held: list[tuple[int, int]] = []

    async def abort(self, request_id):
        pass

    async def generate(self, prompt, sampling, request_id):
        limit = self.service_of().work_limit
        self.held.append((limit.requests, limit.bytes))
        n = 0
        while self.tokens is None or n < self.tokens:
            n += 1
            finished = n == self.tokens
            completion = CompletionOutput(index=0, text="x", token_ids=[1], cumulative_logprob=None, logprobs=None,
                                          finish_reason="length" if finished else None, stop_reason=None)
            yield types.SimpleNamespace(outputs=[completion], finished=finished, prompt_token_ids=[1],
                                        prompt_logprobs=None, num_cached_tokens=0, metrics=None)
            await asyncio.sleep(0.01)


def servicer(vision: Vision, tokens: int | None = 3, limits: RequestLimits = LIMITS):
    holder = {}
    engine = Engine(lambda: holder["service"], tokens)
    service = LanguageService(engine, vision, FixedRenderer(), Admission(), DIMS, limits)
    holder["service"] = service
    info = llm_pb2.GetModelInfoResponse(max_model_len=DIMS.max_model_len)
    return LanguageModelServicer(service, info), service, engine


def image_request(request_id: str, images: int = 2, image_bytes: int = 1000) -> llm_pb2.GenerateRequest:
    parts = [llm_pb2.ContentPart(image=llm_pb2.ImagePart(data=bytes([n]) * image_bytes)) for n in range(images)]
    message = llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=[*parts, llm_pb2.ContentPart(text="hi")])
    return llm_pb2.GenerateRequest(request_id=request_id, sampling=llm_pb2.SamplingParams(max_tokens=3),
                                   chat=llm_pb2.Chat(messages=[message]))


async def collect(servicer: LanguageModelServicer, request: llm_pb2.GenerateRequest) -> list:
    return [r async for r in servicer.Generate(request, None)]


def assert_nothing_held(service: LanguageService) -> None:
    assert (service.work_limit.requests, service.work_limit.bytes) == (0, 0)


async def test_a_request_holds_its_message_and_its_embeddings_until_it_finishes():
    grpc_servicer, service, engine = servicer(Vision())
    request = image_request("r1")
    responses = await collect(grpc_servicer, request)
    assert responses[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert engine.held == [(1, request.ByteSize() + 2 * EMBEDDING.nbytes)]
    assert_nothing_held(service)


async def test_an_error_from_the_vision_stage_releases_everything():
    grpc_servicer, service, _ = servicer(Vision(errors.Unavailable("vision_svc: down", peer="vision_svc 1.2.3.4:1")))
    with pytest.raises(errors.Unavailable):
        await collect(grpc_servicer, image_request("r1"))
    assert_nothing_held(service)


async def test_a_stream_cancelled_mid_generation_releases_everything():
    grpc_servicer, service, engine = servicer(Vision(), tokens=None)
    stream = grpc_servicer.Generate(image_request("r1"), None)
    reading = asyncio.ensure_future(asyncio.wait_for(collect_from(stream), 10))
    await asyncio.sleep(0.1)
    assert engine.held and service.work_limit.requests == 1
    reading.cancel()  # what grpc does when the client goes away
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert_nothing_held(service)


async def collect_from(stream) -> list:
    return [r async for r in stream]


async def test_past_the_request_limit_a_request_is_overloaded_with_a_retry_hint_and_holds_nothing():
    grpc_servicer, service, _ = servicer(Vision(), tokens=None)
    running = [asyncio.ensure_future(collect(grpc_servicer, image_request(f"r{n}"))) for n in range(2)]
    await asyncio.sleep(0.1)
    held = service.work_limit.bytes
    with pytest.raises(errors.Overloaded) as refusal:
        await collect(grpc_servicer, image_request("r3"))
    assert refusal.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (RETRY_AFTER_KEY, "1") in refusal.value.metadata
    assert (service.work_limit.requests, service.work_limit.bytes) == (2, held)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    assert_nothing_held(service)


async def test_past_the_byte_limit_the_message_is_refused_before_any_work():
    vision = Vision()
    grpc_servicer, service, engine = servicer(vision, limits=dataclasses.replace(LIMITS, max_bytes_in_flight=3000))
    with pytest.raises(errors.Overloaded, match="3000"):
        await collect(grpc_servicer, image_request("r1", images=2, image_bytes=2000))
    assert engine.held == []
    assert_nothing_held(service)


async def test_an_embedding_past_the_byte_limit_ends_the_request_and_releases_what_it_held():
    request = image_request("r1", images=2, image_bytes=1000)
    # Room for the message and one embedding, not two.
    limits = dataclasses.replace(LIMITS, max_bytes_in_flight=request.ByteSize() + EMBEDDING.nbytes + 10)
    grpc_servicer, service, engine = servicer(Vision(), limits=limits)
    with pytest.raises(errors.Overloaded) as refusal:
        await collect(grpc_servicer, request)
    assert (RETRY_AFTER_KEY, "1") in refusal.value.metadata
    assert engine.held == []
    assert_nothing_held(service)


async def test_a_message_is_admitted_only_while_it_leaves_room_for_its_embeddings():
    # Room for two messages but for the embeddings of one: the second message waits its turn with a 429 rather than
    # leaving the first without room for its embeddings.
    first, second = (image_request(f"r{i}", images=2, image_bytes=1000) for i in (1, 2))
    room = 2 * EMBEDDING.nbytes
    limits = dataclasses.replace(LIMITS, embedding_room_bytes=room,
                                 max_bytes_in_flight=first.ByteSize() + second.ByteSize() + room - 1)
    grpc_servicer, service, engine = servicer(Vision(), limits=limits)
    held = service.admit(first.ByteSize())
    with pytest.raises(errors.Overloaded, match=f"room for {room} more"):
        await collect(grpc_servicer, second)
    assert (service.work_limit.requests, service.work_limit.bytes) == (1, first.ByteSize())  # the refused held nothing
    held.release()
    await collect(grpc_servicer, first)
    assert engine.held == [(1, first.ByteSize() + room)]
    assert_nothing_held(service)


async def test_text_requests_hold_only_their_message():
    grpc_servicer, service, engine = servicer(Vision())
    request = llm_pb2.GenerateRequest(prompt="hello", sampling=llm_pb2.SamplingParams(max_tokens=3))
    await collect(grpc_servicer, request)
    assert engine.held == [(1, request.ByteSize())]
    assert_nothing_held(service)


def test_config_refuses_a_byte_budget_below_one_largest_request():
    with pytest.raises(ValueError, match="--max-bytes-in-flight"):
        LlmConfig(vision=("x:1",), max_message_bytes=64 << 20, max_embedding_bytes=512 << 20,
                  max_bytes_in_flight=500 << 20)
    assert LlmConfig(vision=("x:1",)).max_bytes_in_flight == 2 << 30


VISION_INFO = vision_pb2.GetInfoResponse(dtype=vision_pb2.DTYPE_BFLOAT16, max_tiles=12, use_thumbnail=True,
                                         max_images_per_request=16, tokens_per_tile=256)


def test_the_largest_request_counts_each_image_at_its_most_tiles_within_the_context():
    config = LlmConfig(vision=("x:1",), max_message_bytes=64 << 20, max_images_per_request=16)
    one_image = 13 * 256 * 5120 * 2  # InternVL3.5-38B: 12 tiles and a thumbnail, bf16
    wide_context = ModelDimensions(hidden_size=5120, tokens_per_tile=256, max_model_len=1 << 20)
    assert largest_request_bytes(config, VISION_INFO, wide_context) == (64 << 20) + 16 * one_image
    short_context = dataclasses.replace(wide_context, max_model_len=4096)
    assert largest_request_bytes(config, VISION_INFO, short_context) == (64 << 20) + 4096 * 5120 * 2


def test_start_is_refused_when_the_largest_request_could_never_be_admitted():
    dims = ModelDimensions(hidden_size=5120, tokens_per_tile=256, max_model_len=1 << 20)
    config = LlmConfig(vision=("x:1",), max_embedding_bytes=64 << 20, max_bytes_in_flight=256 << 20)
    with pytest.raises(WorkLimitTooSmall, match="--max-bytes-in-flight 268435456 is below"):
        check_work_limit(config, VISION_INFO, dims)
    check_work_limit(dataclasses.replace(config, max_bytes_in_flight=2 << 30), VISION_INFO, dims)
