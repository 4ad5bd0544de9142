"""Every client input gets a 4xx, never a 5xx: integers bounded by the proto fields that carry them, URLs their
parsers refuse, and generated bodies inside and outside the schema (`bench.fuzz`'s strategies, in a bounded and
reproducible run; `python -m bench.fuzz` runs them for minutes against the real stack)."""

import httpx
import pytest
from hypothesis import given

from bench import fuzz
from gateway.schemas import ChatCompletionRequest, CompletionRequest, proto_range
from protos import llm_pb2
from tests.gateway.conftest import gateway_config, running_gateway

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# Every integer field of the HTTP schema -> the proto field that carries it to llm_svc.
CARRIED_BY = {"top_k": (llm_pb2.SamplingParams, "top_k"), "max_tokens": (llm_pb2.SamplingParams, "max_tokens"),
              "max_completion_tokens": (llm_pb2.SamplingParams, "max_tokens"),
              "stop_token_ids": (llm_pb2.SamplingParams, "stop_token_ids"), "seed": (llm_pb2.SamplingParams, "seed"),
              "n": (llm_pb2.SamplingParams, "n"), "top_logprobs": (llm_pb2.SamplingParams, "logprobs"),
              "logprobs": (llm_pb2.SamplingParams, "logprobs"), "min_tokens": (llm_pb2.SamplingParams, "min_tokens"),
              "allowed_token_ids": (llm_pb2.SamplingParams, "allowed_token_ids"),
              "max_dynamic_patch": (llm_pb2.GenerateRequest, "max_tiles"),
              "prompt_logprobs": (llm_pb2.SamplingParams, "prompt_logprobs"),
              "prompt": (llm_pb2.PromptTokens, "token_ids"),
              "truncate_prompt_tokens": (llm_pb2.GenerateRequest, "truncate_prompt_tokens"),
              "num_frames": (llm_pb2.VideoOptions, "num_frames")}


def integer_fields(schema: dict) -> dict[str, tuple[int | None, int | None]]:
    """name -> (minimum, maximum) of every integer property, those of nested models and array items included."""
    found = {}

    def walk(node: dict, name: str | None) -> None:
        if node.get("type") == "integer":
            found[name] = (node.get("minimum"), node.get("maximum"))
        for key, sub in node.get("properties", {}).items():
            walk(sub, key)
        for sub in node.get("anyOf", []) + node.get("oneOf", []):
            walk(sub, name)
        if "items" in node:
            walk(node["items"], name)
    for node in (schema, *schema.get("$defs", {}).values()):
        walk(node, None)
    return found


def body_with(path: str, field: str, value: int) -> dict:
    body = {"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "hi"}
    if field in ("stop_token_ids", "allowed_token_ids", "prompt"):
        return {**body, field: [value]}
    if field == "max_dynamic_patch":
        return {**body, "mm_processor_kwargs": {field: value}}
    if field == "num_frames":
        return {**body, "media_io_kwargs": {"video": {field: value}}}
    return {**body, field: value}


def with_image(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


@pytest.fixture(scope="module")
async def fuzz_gateway(backend, tmp_path_factory):
    """A gateway in front of the fake llm_svc, with local files allowed (so file:// URLs are parsed too)."""
    config = gateway_config(backend.target, allowed_local_media_path=tmp_path_factory.mktemp("media"),
                            image_fetch_timeout_s=1.0)
    async with running_gateway(config) as url, httpx.AsyncClient(base_url=url, timeout=60) as http:
        yield http


@pytest.mark.parametrize("path,model", [(CHAT, ChatCompletionRequest), (COMPLETIONS, CompletionRequest)])
async def test_every_integer_field_is_bounded_by_its_proto_field(fuzz_gateway, path, model):
    fields = integer_fields(model.model_json_schema())
    assert not set(fields) - set(CARRIED_BY), "an integer field the CARRIED_BY table does not know"
    for field, (low, high) in fields.items():
        wire = proto_range(*CARRIED_BY[field])
        assert low is not None and high is not None and wire["ge"] <= low <= high <= wire["le"], (field, low, high)
        for edge in (low, high):
            response = await fuzz_gateway.post(path, json=body_with(path, field, edge))
            assert response.status_code < 500, (field, edge, response.text)
        for beyond in (low - 1, high + 1):
            response = await fuzz_gateway.post(path, json=body_with(path, field, beyond))
            assert response.status_code == 400 and field in response.json()["error"]["message"], (field, response.text)


# Requests that got a 500 before: integers JSON allows but the proto's integer types cannot hold, and URLs
# that their parsers refuse (the URL is echoed into no message; the image's index is).
ONCE_500 = {
    "top_k 2**40": (body_with(CHAT, "top_k", 1 << 40), "top_k"),
    "stop_token_ids [2**40]": (body_with(CHAT, "stop_token_ids", 1 << 40), "stop_token_ids"),
    "max_dynamic_patch 2**40": (body_with(CHAT, "max_dynamic_patch", 1 << 40), "max_dynamic_patch"),
    "octal IPv4 host": (with_image("http://0177.0.0.1/x.png"), "image 0"),
    "unclosed IPv6 host": (with_image("http://[::1/x.png"), "image 0"),
    "host label over 63 characters": (with_image(f"http://{'a' * 64}.example/x.png"), "image 0"),
    "non-ASCII base64": (with_image("data:image/png;base64,\u00e9\u00e9"), "image 0"),
    "file:// with an unclosed IPv6 host": (with_image("file://[::1/x.png"), "image 0"),
    "file:// with a NUL": (with_image("file:///tmp/a%00b.png"), "image 0"),
}


@pytest.mark.parametrize("case", ONCE_500)
async def test_requests_that_once_got_a_500_get_a_400_naming_the_problem(fuzz_gateway, fake, case):
    body, words = ONCE_500[case]
    response = await fuzz_gateway.post(CHAT, json=body)
    assert response.status_code == 400, response.text
    assert words in response.json()["error"]["message"]
    assert fake.requests == []


@fuzz.bounded_run(max_examples=150)
@given(case=fuzz.http_cases(in_schema=True))
async def test_generated_bodies_inside_the_schema_get_no_5xx(fuzz_gateway, case):
    response = await fuzz_gateway.post(case.path, content=case.body)
    assert fuzz.http_status(response) < 500, f"{case!r} -> {response.status_code} {response.text[:500]}"


@fuzz.bounded_run(max_examples=250)
@given(case=fuzz.http_cases(in_schema=False))
async def test_generated_bodies_outside_the_schema_get_no_5xx(fuzz_gateway, case):
    response = await fuzz_gateway.post(case.path, content=case.body)
    assert fuzz.http_status(response) < 500, f"{case!r} -> {response.status_code} {response.text[:500]}"


async def test_the_gateway_is_healthy_after_the_fuzz(fuzz_gateway):
    assert (await fuzz_gateway.get("/health")).status_code == 200
    response = await fuzz_gateway.post(CHAT, json=body_with(CHAT, "max_tokens", 5))
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"]
