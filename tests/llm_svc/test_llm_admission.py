"""Refuse before encoding: the prompt length counted before the vision stage runs equals vLLM's own count
(every tile grid, both layouts), its refusals are the engine's own messages, and a refused request costs
the vision stage nothing while a request exactly at the context is served."""

import dataclasses
import hashlib
import itertools
import math
import random
import re

import grpc
import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMClientError

from llm_svc.admission import AdmissionCheck, with_embeddings
from llm_svc.image_tokens import ImageTokenCounter, TilingPolicy
from llm_svc.prompts import ImageRef, Message, PromptRenderer, PromptTruncation
from llm_svc.vision_client import ImageBlob
from protos import llm_pb2, vision_pb2
from protos.errors import InvalidInput
from vision_svc.model_spec import VisionSpec

from tests.llm_svc.llm_helpers import chat, greedy, image, metric, png_bytes

LAYOUTS = ("original", "hf")
# Every pair of these sides: multiples of 448 and a pixel either side, both sides of the area at which a tie
# of ratios goes to the larger grid (a square takes 2x2 above 633.6 px, 3x3 above 950.4), slivers, sizes far
# beyond 12 tiles; and log-uniform random sizes.
SIDES = (1, 28, 200, 447, 448, 449, 500, 633, 634, 672, 895, 896, 897, 950, 951, 1200, 1344, 1345, 1792, 3000, 8000)
_random = random.Random(0)
SIZES = [*itertools.product(SIDES, SIDES),
         *((round(math.exp(_random.uniform(0, 8.5))), round(math.exp(_random.uniform(0, 8.5)))) for _ in range(500))]
MAX_TILES = (1, 2, 3, 6, 8, 12)
TOO_LONG = "The decoder prompt \\(length (\\d+)\\) is longer than the maximum model length of 8192\\."
NO_ROOM = ("The decoder prompt (length 8192) plus the number of requested output tokens (at least 1) is longer "
           "than the maximum model length of 8192.")


def policy_of(checkpoint) -> TilingPolicy:
    """What the checkpoint's vision_svc reports in GetInfo (vision_svc/server.py builds the same fields)."""
    spec = VisionSpec.from_model_dir(checkpoint)
    return TilingPolicy.from_info(vision_pb2.GetInfoResponse(
        tokens_per_tile=spec.tokens_per_tile, image_size=spec.image_size, max_tiles=spec.max_dynamic_patch,
        min_tiles=spec.min_dynamic_patch, use_thumbnail=spec.use_thumbnail, max_image_bytes=20 << 20,
        max_image_pixels=40_000_000))


def tile_kwargs(layout: str, max_tiles: int) -> dict:
    """vLLM's own processor option for the tile limit of a raw image (what `max_tiles` is to vision_svc)."""
    return {"max_dynamic_patch": max_tiles} if layout == "original" else {"max_patches": max_tiles}


def vllm_image_tokens(processing_info, layout: str, width: int, height: int, max_tiles: int) -> int:
    """vLLM's own count for a raw image: the `<IMG_CONTEXT>` tokens its placeholder expands to."""
    kwargs = tile_kwargs(layout, max_tiles)
    extra = {} if layout == "original" else {"mm_kwargs": kwargs}
    return processing_info.get_num_image_tokens(image_width=width, image_height=height,
                                                processor=processing_info.get_hf_processor(**kwargs), **extra)


def admission_check(llm_engine, policy: TilingPolicy) -> AdmissionCheck:
    return AdmissionCheck(llm_engine.renderer, llm_engine.input_processor, llm_engine.get_supported_tasks(),
                          ImageTokenCounter(policy), llm_engine.model_config.hf_text_config.hidden_size)


@pytest.fixture(scope="module", params=LAYOUTS)
def engine(request, vllm_engine, tiny_checkpoint):
    """vLLM on the tiny checkpoint (the parity tests' engine, so that it starts once per layout), with what
    llm_svc builds on it: its renderer and an admission check on vision_svc's tiling."""
    layout = request.param
    policy = policy_of(tiny_checkpoint(layout=layout, llm="dense"))
    llm_engine = vllm_engine(layout, "dense", limit_mm_per_prompt={"image": 2}).llm_engine
    return layout, llm_engine, policy, admission_check(llm_engine, policy), PromptRenderer(llm_engine.renderer)


def test_image_tokens_equal_vllms_count_for_every_tile_grid(engine):
    layout, llm_engine, policy, _, _ = engine
    info = llm_engine.renderer.get_mm_processor().info
    differ = [(w, h, n) for n in MAX_TILES for w, h in SIZES
              if policy.image_tokens(w, h, policy.options(n)) != vllm_image_tokens(info, layout, w, h, n)]
    assert differ == []


CHATS = [  # (image sizes, max_tiles, text)
    ([(1200, 900)], 0, "What is in this image?"),
    ([(1200, 900), (500, 700)], 0, "Compare the two images."),
    ([(60, 2000), (3000, 1000)], 6, "Which is taller?"),
    ([(448, 448), (897, 448)], 2, ""),
    ([(1, 1)], 1, "A dot."),
]


@pytest.mark.parametrize("sizes,max_tiles,text", CHATS)
async def test_counted_prompt_length_equals_vllms_with_the_raw_images(engine, sizes, max_tiles, text):
    layout, llm_engine, _, admission, renderer = engine
    pictures = [image(w, h, seed=n) for n, (w, h) in enumerate(sizes)]
    blobs = [ImageBlob(hashlib.sha256(data).hexdigest(), data) for data in map(png_bytes, pictures)]
    prompt = renderer.render([Message("user", (*(ImageRef(b.content_hash) for b in blobs), *([text] if text else [])))])
    checked = await admission.check("r", prompt, blobs, max_tiles, SamplingParams(max_tokens=1))

    raw = {"prompt": prompt, "multi_modal_data": {"image": pictures}}
    if max_tiles:
        raw["mm_processor_kwargs"] = tile_kwargs(layout, max_tiles)
    (monolithic,) = await llm_engine.renderer.render_cmpl_async([raw])
    assert len(checked["prompt_token_ids"]) == len(monolithic["prompt_token_ids"])


@pytest.mark.parametrize("sizes,max_tiles,truncate", [([(1200, 900)], 0, None), ([(448, 448), (60, 2000)], 6, None),
                                                    ([(897, 448)], 2, 1000)])
async def test_the_checked_input_with_the_embeddings_swapped_in_equals_a_fresh_render(engine, sizes, max_tiles,
                                                                                      truncate):
    _, llm_engine, policy, admission, renderer = engine
    blobs = [ImageBlob(hashlib.sha256(d).hexdigest(), d) for d in
             (png_bytes(image(w, h, seed=n)) for n, (w, h) in enumerate(sizes))]
    text = renderer.render([Message("user", (*(ImageRef(b.content_hash) for b in blobs), "Describe" + " a" * 500))])
    tok_params = renderer.tok_params(PromptTruncation(truncate, "right", 16)) if truncate else None
    checked = await admission.check("r", text, blobs, max_tiles, SamplingParams(max_tokens=16), tok_params)
    hidden = llm_engine.model_config.hf_text_config.hidden_size
    embeddings = [torch.randn(c.tokens, hidden).to(torch.bfloat16) for c in admission.count(blobs, max_tiles)]
    uuids = [b.content_hash for b in blobs]

    swapped = with_embeddings(checked, embeddings, uuids)
    (fresh,) = await llm_engine.renderer.render_cmpl_async(
        [{"prompt": text, "multi_modal_data": {"image": embeddings}, "multi_modal_uuids": {"image": uuids}}],
        tok_params)
    assert swapped.keys() == fresh.keys()
    assert {k: v for k, v in swapped.items() if k != "arrival_time"} == \
        {k: v for k, v in fresh.items() if k != "arrival_time"}
    # A shape that differs from its stand-in's (an image counted at a lower bound): rendered afresh instead.
    assert with_embeddings(checked, [e[:-1] for e in embeddings], uuids) is None


@pytest.mark.parametrize("side", ["left", "right"])
async def test_a_truncation_that_cuts_out_an_image_placeholder_is_refused_naming_it(engine, side):
    """vLLM truncates the tokenized prompt before its image placeholders expand; where that drops a placeholder,
    its processor fails an assertion (a 500 from vLLM's own server): here it is the client's error."""
    _, _, _, admission, renderer = engine
    data = png_bytes(image(897, 448, seed=3))
    blob = ImageBlob(hashlib.sha256(data).hexdigest(), data)
    text = renderer.render([Message("user", (ImageRef(blob.content_hash), "Describe" + " a" * 50))])
    tok_params = renderer.tok_params(PromptTruncation(4, side, 16))
    with pytest.raises(InvalidInput, match=r"truncate_prompt_tokens=4 would .*image"):
        await admission.check("r", text, [blob], 2, SamplingParams(max_tokens=16), tok_params)


async def engine_refusal(llm_engine, prompt: str, images_rows: list[int], sampling) -> str:
    """The engine's own message for the real request: the prompt with embeddings of these row counts."""
    hidden = llm_engine.model_config.hf_text_config.hidden_size
    (engine_input,) = await llm_engine.renderer.render_cmpl_async([{
        "prompt": prompt, "multi_modal_data": {"image": [torch.zeros(rows, hidden) for rows in images_rows]},
        "multi_modal_uuids": {"image": [f"real-{i}" for i in range(len(images_rows))]}}])
    with pytest.raises(VLLMClientError) as refusal:
        llm_engine.input_processor.process_inputs("real", engine_input, sampling, llm_engine.get_supported_tasks())
    return str(refusal.value)


async def test_refusals_are_the_engines_own_messages_and_the_limit_itself_is_admitted(engine):
    _, llm_engine, policy, admission, renderer = engine
    blobs = [ImageBlob(hashlib.sha256(d).hexdigest(), d) for d in (png_bytes(image(1200, 900, seed=s)) for s in (1, 2))]
    rows = [policy.image_tokens(1200, 900, policy.options(0))] * 2

    def prompt(padding: int) -> str:
        return renderer.render([Message("user", (*(ImageRef(b.content_hash) for b in blobs), "Hi" + " a" * padding))])

    sampling = SamplingParams(max_tokens=16)

    async def length(padding: int) -> int:
        return len((await admission.check("r", prompt(padding), blobs, 0, sampling))["prompt_token_ids"])

    base = await length(0)
    assert await length(1) == base + 1
    fits = 8191 - base  # the prompt leaves room for one token: admitted
    assert await length(fits) == 8191
    for padding in (fits + 1, fits + 500):  # no room for any output, and far over
        with pytest.raises(InvalidInput) as ours:
            await admission.check("r", prompt(padding), blobs, 0, sampling)
        assert str(ours.value) == await engine_refusal(llm_engine, prompt(padding), rows, sampling)


async def test_an_image_over_the_engines_encoder_budget_is_refused_with_its_message(engine):
    _, llm_engine, policy, _, renderer = engine
    beyond_the_model = dataclasses.replace(policy, max_tiles=24)  # vision_svc --max-tiles 24; the model says 12
    data = png_bytes(image(2688, 1792, seed=3))  # a 6x4 grid: 25 tiles with the thumbnail
    blobs = [ImageBlob(hashlib.sha256(data).hexdigest(), data)]
    prompt = renderer.render([Message("user", (ImageRef(blobs[0].content_hash), "Hi"))])
    sampling = SamplingParams(max_tokens=16)
    with pytest.raises(InvalidInput) as ours:
        await admission_check(llm_engine, beyond_the_model).check("r", prompt, blobs, 24, sampling)
    assert "exceeds the pre-allocated encoder cache size" in str(ours.value)
    assert str(ours.value) == await engine_refusal(llm_engine, prompt, [25 * 256], sampling)


async def test_images_named_by_an_unknown_hash_are_counted_at_their_fewest_tokens(engine):
    _, _, _, admission, renderer = engine
    blobs = [ImageBlob("ab" * 32, None)]
    text = renderer.render([Message("user", (ImageRef("ab" * 32), "Hi" + " a" * 8000))])
    with pytest.raises(InvalidInput) as refusal:
        await admission.check("r", text, blobs, 0, SamplingParams(max_tokens=1))
    assert re.match(TOO_LONG, str(refusal.value))
    assert str(refusal.value).endswith("images [0] are named by content hash and their size is unknown here: each "
                                       "was counted at the fewest tokens an image can take, 256)")


# ---- against the real stages: what the vision stage is spared -----------------------------------------------

@pytest.fixture(scope="module")
def stack(pipelines):
    """vision_svc and llm_svc as `make serve` runs them (the context is 8192), vision metrics on a port: the
    package's pipeline, which test_llm_parity goes on with."""
    pipeline = pipelines("original", "dense")
    return pipeline.client, pipeline.vision_metrics


def vision_work(metrics_port: int) -> tuple[float, float]:
    """(Encode calls, tiles encoded) so far."""
    return metric(metrics_port, "vision_requests_total"), metric(metrics_port, "vision_tiles_encoded_total")


def test_a_request_over_the_context_is_refused_before_the_vision_stage_sees_it(stack):
    client, vision_metrics = stack
    before = vision_work(vision_metrics)
    # Four 1200x900 images are 4 x 13 tiles x 256 = 13312 image tokens.
    request = llm_pb2.GenerateRequest(chat=chat(("user", [*(image(1200, 900, seed=s) for s in range(4)),
                                                          "Compare these four pictures."])), sampling=greedy(16))
    with pytest.raises(grpc.RpcError) as error:
        client.generate(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.fullmatch(TOO_LONG + " Make sure that `max_model_len` is no smaller than the number of text tokens "
                        "plus multimodal tokens. For image inputs, the number of image tokens depends on the number "
                        "of images, and possibly their aspect ratios as well.", error.value.details())
    assert int(re.match(TOO_LONG, error.value.details()).group(1)) > 4 * 13 * 256
    assert vision_work(vision_metrics) == before


def test_a_request_exactly_at_the_context_is_served_and_one_token_more_is_refused_before_encoding(stack):
    client, vision_metrics = stack

    def request(seeds, padding: int) -> llm_pb2.GenerateRequest:
        return llm_pb2.GenerateRequest(chat=chat(("user", [*(image(1200, 900, seed=s) for s in seeds),
                                                           "Hi" + " a" * padding])), sampling=greedy(1))

    def prompt_tokens(padding: int) -> int:
        return client.generate(request((10, 11), padding))[-1].usage.prompt_tokens

    base = prompt_tokens(0)
    assert prompt_tokens(1) == base + 1
    at_limit = client.generate(request((10, 11), 8191 - base))[-1]  # 8191 prompt tokens + 1 generated
    assert (at_limit.usage.prompt_tokens, at_limit.usage.completion_tokens) == (8191, 1)
    assert at_limit.finish_reason == llm_pb2.FINISH_REASON_LENGTH

    before = vision_work(vision_metrics)
    with pytest.raises(grpc.RpcError) as error:  # new pictures of the same size: nothing cached to hide work
        client.generate(request((12, 13), 8192 - base))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.value.details().startswith(NO_ROOM)
    assert vision_work(vision_metrics) == before


@pytest.mark.parametrize("part,max_tiles,message", [
    (llm_pb2.ImagePart(data=b"%PDF-1.7 not a picture"), 0, "image 1: unsupported image format PDF"),
    (llm_pb2.ImagePart(data=png_bytes(image(300, 200, seed=5))), 13, "max_tiles 13 is over this server's limit of 12"),
])
def test_what_the_headers_show_is_refused_before_the_vision_stage_sees_it(stack, part, max_tiles, message):
    client, vision_metrics = stack
    before = vision_work(vision_metrics)
    content = [llm_pb2.ContentPart(image=llm_pb2.ImagePart(data=png_bytes(image(400, 300, seed=6)))),
               llm_pb2.ContentPart(image=part)]
    with pytest.raises(grpc.RpcError) as error:
        client.generate(llm_pb2.GenerateRequest(chat=llm_pb2.Chat(messages=[llm_pb2.ChatMessage(
            role=llm_pb2.ROLE_USER, content=content)]), sampling=greedy(3), max_tiles=max_tiles))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()
    assert vision_work(vision_metrics) == before
