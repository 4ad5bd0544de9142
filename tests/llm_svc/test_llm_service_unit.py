"""LanguageService and the servicer's conversions with the engine and the vision stage replaced by fakes:
what must never reach the engine, and the tables of proto <-> domain conversions."""

import asyncio
import contextlib
import hashlib
import threading
import types

import pytest
import torch
from vllm import SamplingParams
from vllm.multimodal.inputs import (MultiModalBatchedField, MultiModalFieldElem, MultiModalKwargsItem,
                                    MultiModalKwargsItems)
from vllm.outputs import CompletionOutput

from llm_svc.limits import ModelDimensions, RequestLimits
from llm_svc.prompts import ImageRef, Message, to_openai_messages
from llm_svc.service import GenerateInput, LanguageService
from llm_svc.servicer import PARSE_IN_PLACE_BYTES, LanguageModelServicer, chat_from_pb, input_from_pb
from llm_svc.vision_client import ImageBlob, ImageEmbedding
from protos import llm_pb2
from protos.errors import InternalError, InvalidInput

DIMS = ModelDimensions(hidden_size=16, tokens_per_tile=4, max_model_len=128)
LIMITS = RequestLimits(max_images_per_request=2, max_request_bytes=2000, max_image_bytes_per_request=1000,
                       max_embedding_bytes=1000, vision_timeout_s=5, max_requests_in_flight=4, max_bytes_in_flight=4000)


class FakeVision:
    def __init__(self, embeddings: torch.Tensor, num_tiles: int):
        self.result = ImageEmbedding("h" * 64, num_tiles, embeddings, False)
        self.calls = 0

    async def encode(self, request_id, images, max_tiles, timeout_s, hold_bytes):
        self.calls += 1
        return [self.result for _ in images]


class Admission:
    """Admits every request, or refuses every one as the engine's admission check would."""

    def __init__(self, refusal: str | None = None):
        self.refusal = refusal

    async def check(self, request_id, text, images, max_tiles, sampling, tok_params=None):
        if self.refusal:
            raise InvalidInput(self.refusal)
        return {"type": "token"}  # holds no stand-ins to swap: the prompt is rendered after the vision call


class RecordingEngine:
    def __init__(self):
        self.prompts = []

    async def generate(self, prompt, sampling, request_id):
        self.prompts.append(prompt)
        return
        yield


class FixedRenderer:
    def render(self, messages, options=None):
        return "<image>\nhi"

    async def engine_input(self, prompt, tok_params=None):
        return prompt

    def decode(self, token_ids):
        return "x" * len(token_ids)


def request(images: int) -> GenerateInput:
    blobs = [ImageBlob("a" * 64, b"png") for _ in range(images)]
    messages = [Message("user", (*[ImageRef(b.content_hash) for b in blobs], "hi"))]
    return GenerateInput("r1", messages, None, blobs, sampling=SamplingParams(max_tokens=1), max_tiles=0)


@pytest.mark.parametrize("embeddings,num_tiles", [
    (torch.zeros(8, 15), 2),  # wrong width
    (torch.zeros(7, 16), 2),  # rows do not match the tiles
    (torch.zeros(8), 2),  # not 2-D
    (torch.zeros(0, 16), 0),  # no tiles
])
async def test_embeddings_of_the_wrong_shape_never_reach_the_engine(embeddings, num_tiles):
    engine = RecordingEngine()
    service = LanguageService(engine, FakeVision(embeddings, num_tiles), FixedRenderer(), Admission(), DIMS, LIMITS)
    with pytest.raises(InternalError, match="the language model needs"):
        [d async for d in service.generate(request(images=1), service.admit(0))]
    assert engine.prompts == []


async def test_embeddings_of_the_right_shape_reach_the_engine_with_their_hashes():
    engine = RecordingEngine()
    service = LanguageService(engine, FakeVision(torch.zeros(8, 16), 2), FixedRenderer(), Admission(), DIMS, LIMITS)
    [d async for d in service.generate(request(images=1), service.admit(0))]
    assert engine.prompts[0]["multi_modal_uuids"] == {"image": ["a" * 64]}
    assert engine.prompts[0]["multi_modal_data"]["image"][0].shape == (8, 16)


class StandInAdmission(Admission):
    """Passes every request with the engine's input as vLLM's renderer makes it: a stand-in per image."""

    async def check(self, request_id, text, images, max_tiles, sampling, tok_params=None):
        stand_in = MultiModalFieldElem(data=torch.zeros(1, 1).expand(8, 16), field=MultiModalBatchedField())
        return {"type": "multimodal", "prompt_token_ids": [1] * 9, "prompt": text,
                "mm_kwargs": MultiModalKwargsItems({"image": [MultiModalKwargsItem({"image_embeds": stand_in})]}),
                "mm_hashes": {"image": [f"{request_id}-admission-0"]}, "mm_placeholders": {"image": []}}


class UnusedRenderer(FixedRenderer):
    async def engine_input(self, prompt, tok_params=None):
        raise AssertionError("the prompt was rendered again")


async def test_the_checked_input_reaches_the_engine_with_the_embeddings_in_place_of_its_stand_ins():
    engine, embeddings = RecordingEngine(), torch.ones(8, 16)
    service = LanguageService(engine, FakeVision(embeddings, 2), UnusedRenderer(), StandInAdmission(), DIMS, LIMITS)
    [d async for d in service.generate(request(images=1), service.admit(0))]
    [item] = engine.prompts[0]["mm_kwargs"]["image"]
    assert item["image_embeds"].data is embeddings and engine.prompts[0]["mm_hashes"] == {"image": ["a" * 64]}


class SlowVision(FakeVision):
    async def encode(self, request_id, images, max_tiles, timeout_s, hold_bytes):
        await asyncio.sleep(0.3)
        return await super().encode(request_id, images, max_tiles, timeout_s, hold_bytes)


async def test_abort_while_images_are_encoded_ends_the_request_before_the_engine():
    engine = RecordingEngine()
    engine.abort = lambda request_id: asyncio.sleep(0)
    service = LanguageService(engine, SlowVision(torch.zeros(8, 16), 2), FixedRenderer(), Admission(), DIMS, LIMITS)
    stream = service.generate(request(images=1), service.admit(0))
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.1)
    assert await service.abort("r1")
    assert (await first).finish_reason == "abort"
    assert engine.prompts == []


class SlowRenderer(FixedRenderer):
    async def engine_input(self, prompt, tok_params=None):
        await asyncio.sleep(0.3)
        return prompt


class LateKnowingEngine(RecordingEngine):
    """Learns of a request only when its first output is ready; an abort before that finds nothing to abort,
    as vLLM's does while it admits the request. Streams until an abort it knows of."""

    def __init__(self):
        super().__init__()
        self.known, self.aborted = False, False

    async def abort(self, request_id):
        self.aborted = self.known

    async def generate(self, prompt, sampling, request_id):
        self.prompts.append(prompt)
        await asyncio.sleep(0.3)
        self.known = True
        for _ in range(1000):
            finished = self.aborted
            completion = CompletionOutput(index=0, text="x", token_ids=[1], cumulative_logprob=None, logprobs=None,
                                          finish_reason="abort" if finished else None, stop_reason=None)
            yield types.SimpleNamespace(outputs=[completion], finished=finished, prompt_token_ids=[1],
                                        prompt_logprobs=None, num_cached_tokens=0, metrics=None)
            if finished:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the abort was lost: the request ran to its end")


@pytest.mark.parametrize("renderer, reaches_engine", [(SlowRenderer(), False), (FixedRenderer(), True)],
                         ids=["while rendering", "while the engine admits it"])
async def test_abort_between_the_vision_phase_and_the_engine_is_honoured(renderer, reaches_engine):
    engine = LateKnowingEngine()
    service = LanguageService(engine, FakeVision(torch.zeros(8, 16), 2), renderer, Admission(), DIMS, LIMITS)
    stream = service.generate(request(images=1), service.admit(0))
    collected = asyncio.ensure_future(asyncio.wait_for(_all(stream), 10))
    await asyncio.sleep(0.1)
    assert await service.abort("r1")
    deltas = await collected
    assert deltas[-1].finish_reason == "abort"
    assert bool(engine.prompts) == reaches_engine


async def _all(stream) -> list:
    return [d async for d in stream]


async def test_a_request_the_engine_would_refuse_never_reaches_the_vision_stage():
    engine, vision = RecordingEngine(), FakeVision(torch.zeros(8, 16), 2)
    service = LanguageService(engine, vision, FixedRenderer(), Admission("The decoder prompt (length 200) is longer"),
                              DIMS, LIMITS)
    with pytest.raises(InvalidInput, match="length 200"):
        [d async for d in service.generate(request(images=1), service.admit(0))]
    assert vision.calls == 0 and engine.prompts == []


async def test_images_over_the_vision_stages_message_limit_are_refused_before_any_work():
    engine, vision = RecordingEngine(), FakeVision(torch.zeros(8, 16), 2)
    service = LanguageService(engine, vision, FixedRenderer(), Admission(), DIMS, LIMITS)
    big = request(images=2)
    big.images[:] = [ImageBlob("a" * 64, bytes(600)), ImageBlob("b" * 64, bytes(600))]
    with pytest.raises(InvalidInput, match="1200 bytes together; the vision stage takes at most 1000"):
        [d async for d in service.generate(big, service.admit(0))]
    assert vision.calls == 0 and engine.prompts == []


async def test_too_many_images_are_refused_before_any_work():
    engine = RecordingEngine()
    service = LanguageService(engine, FakeVision(torch.zeros(8, 16), 2), FixedRenderer(), Admission(), DIMS, LIMITS)
    with pytest.raises(InvalidInput, match="3 images in one request; the limit is 2"):
        [d async for d in service.generate(request(images=3), service.admit(0))]


def part(**kwargs) -> llm_pb2.ContentPart:
    return llm_pb2.ContentPart(**kwargs)


def test_chat_conversion_keeps_image_order_and_hashes_bytes():
    chat = llm_pb2.Chat(messages=[
        llm_pb2.ChatMessage(role=llm_pb2.ROLE_SYSTEM, content=[part(text="be brief")]),
        llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=[
            part(image=llm_pb2.ImagePart(data=b"one")), part(text="and"),
            part(image=llm_pb2.ImagePart(content_hash="B" * 64))])])
    messages, images = chat_from_pb(chat)
    assert [m.role for m in messages] == ["system", "user"]
    assert images[0].data == b"one" and images[0].content_hash == hashlib.sha256(b"one").hexdigest()
    assert images[1] == ImageBlob("b" * 64, None)
    assert messages[1].parts == (ImageRef(images[0].content_hash), "and", ImageRef("b" * 64))


@pytest.mark.parametrize("proto,message", [
    (llm_pb2.GenerateRequest(), "neither chat messages nor a prompt"),
    (llm_pb2.GenerateRequest(prompt=""), "the prompt is empty"),
    (llm_pb2.GenerateRequest(chat=llm_pb2.Chat(messages=[llm_pb2.ChatMessage(content=[part(text="x")])])),
     "role must be"),
    (llm_pb2.GenerateRequest(chat=llm_pb2.Chat(messages=[llm_pb2.ChatMessage(
        role=llm_pb2.ROLE_USER, content=[part(image=llm_pb2.ImagePart())])])), "neither bytes nor a content hash"),
    (llm_pb2.GenerateRequest(chat=llm_pb2.Chat(messages=[llm_pb2.ChatMessage(
        role=llm_pb2.ROLE_USER, content=[part(image=llm_pb2.ImagePart(content_hash="zz" * 32))])])), "64 hex digits"),
    (llm_pb2.GenerateRequest(chat=llm_pb2.Chat(messages=[llm_pb2.ChatMessage(
        role=llm_pb2.ROLE_USER, content=[part(image=llm_pb2.ImagePart(content_hash=""))])])), "64 hex digits"),
    (llm_pb2.GenerateRequest(prompt="x", sampling=llm_pb2.SamplingParams(min_p=2)), "min_p=2 must be in [0, 1]"),
    (llm_pb2.GenerateRequest(prompt="x", sampling=llm_pb2.SamplingParams(presence_penalty=-3)), "[-2, 2]"),
    (llm_pb2.GenerateRequest(prompt="x", sampling=llm_pb2.SamplingParams(repetition_penalty=0)), "(0, 2]"),
    (llm_pb2.GenerateRequest(prompt="x", sampling=llm_pb2.SamplingParams(top_k=-5)), "top_k=-5"),
    (llm_pb2.GenerateRequest(prompt="x", sampling=llm_pb2.SamplingParams(stop=[""])), "must not be empty"),
])
def test_invalid_requests_name_the_problem(proto, message):
    with pytest.raises(InvalidInput) as error:
        input_from_pb(proto, max_model_len=128)
    assert message in str(error.value)


def test_sampling_defaults_and_request_id():
    converted = input_from_pb(llm_pb2.GenerateRequest(prompt="x", sampling=llm_pb2.SamplingParams(
        temperature=0, seed=7, stop=["\n"], logprobs=3)), max_model_len=128)
    assert converted.request_id.startswith("gen-")
    sampling = converted.sampling
    assert (sampling.temperature, sampling.seed, sampling.stop, sampling.logprobs) == (0, 7, ["\n"], 3)
    assert sampling.max_tokens is None  # the engine fills in what the context leaves


def test_images_only_in_user_messages():
    with pytest.raises(InvalidInput, match="user messages only"):
        to_openai_messages([Message("assistant", (ImageRef("a" * 64),))])


class EmptyService:
    sampling_defaults = None

    def admit(self, request_bytes):
        return contextlib.nullcontext()

    async def generate(self, request, work):
        return
        yield


async def test_requests_that_carry_bytes_to_hash_are_converted_off_the_event_loop_and_small_ones_in_place(
        monkeypatch):
    converted_on = []

    def recording_input_from_pb(request, max_model_len, sampling_defaults):
        converted_on.append(threading.current_thread())
        return input_from_pb(request, max_model_len, sampling_defaults)

    monkeypatch.setattr("llm_svc.servicer.input_from_pb", recording_input_from_pb)
    servicer = LanguageModelServicer(EmptyService(), llm_pb2.GetModelInfoResponse(max_model_len=128))
    for prompt in ("hi", "x" * PARSE_IN_PLACE_BYTES):
        request = llm_pb2.GenerateRequest(prompt=prompt, sampling=llm_pb2.SamplingParams(max_tokens=1))
        assert [r async for r in servicer.Generate(request, None)] == []
    assert converted_on[0] is threading.main_thread() and converted_on[1] is not threading.main_thread()
