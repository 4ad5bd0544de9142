"""The gateway's happy paths through the official `openai` client, against a fake llm_svc on a real gRPC server."""

import base64
import json

import httpx
import openai
import pytest

from protos import llm_pb2


@pytest.fixture
def client(gateway_url):
    return openai.AsyncOpenAI(base_url=f"{gateway_url}/v1", api_key="unused", max_retries=0)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def parts(chat: llm_pb2.Chat) -> list[tuple[int, str, str | bytes]]:
    """(role, kind, value) of every content part, in order."""
    return [(m.role, p.WhichOneof("part"), p.text if p.HasField("text") else p.image.data)
            for m in chat.messages for p in m.content]


async def test_chat_with_data_url_image_forwards_bytes_and_returns_openai_response(client, fake, png):
    image = png()
    response = await client.chat.completions.create(
        model=fake.MODEL, max_tokens=32, temperature=0, seed=7, stop=["END"],
        messages=[{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                               image_part(data_url(image))]}],
        extra_body={"top_k": 5, "repetition_penalty": 1.1})

    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.model == fake.MODEL
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == "".join(fake.REPLY)
    assert response.choices[0].finish_reason == "stop" and response.choices[0].index == 0
    assert response.usage.prompt_tokens == 11 and response.usage.completion_tokens == len(fake.REPLY)
    assert response.usage.total_tokens == 11 + len(fake.REPLY)
    assert response.usage.prompt_tokens_details.cached_tokens == 4

    [sent] = fake.requests
    assert response.id == f"chatcmpl-{sent.request_id}"
    assert parts(sent.chat) == [(llm_pb2.ROLE_SYSTEM, "text", "Be brief."),
                                (llm_pb2.ROLE_USER, "text", "What is this?"), (llm_pb2.ROLE_USER, "image", image)]
    s = sent.sampling
    assert (s.max_tokens, s.temperature, s.seed, list(s.stop), s.top_k) == (32, 0.0, 7, ["END"], 5)
    assert s.repetition_penalty == pytest.approx(1.1)
    assert not s.HasField("top_p") and not s.HasField("logprobs")


async def test_chat_with_two_http_images_keeps_message_order(client, fake, image_server):
    base, images = image_server
    await client.chat.completions.create(model=fake.MODEL, messages=[{"role": "user", "content": [
        image_part(f"{base}/blue.png"), {"type": "text", "text": "and"},
        image_part(f"{base}/redirect/2/red.png")]}])
    [sent] = fake.requests
    assert [v for _, kind, v in parts(sent.chat) if kind == "image"] == [images["/blue.png"], images["/red.png"]]


async def test_multi_turn_conversation_is_sent_whole(client, fake, png):
    image = png()
    await client.chat.completions.create(model=fake.MODEL, messages=[
        {"role": "user", "content": [image_part(data_url(image)), {"type": "text", "text": "Describe it."}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And its size?"}])
    [sent] = fake.requests
    assert parts(sent.chat) == [(llm_pb2.ROLE_USER, "image", image), (llm_pb2.ROLE_USER, "text", "Describe it."),
                                (llm_pb2.ROLE_ASSISTANT, "text", "A red square."),
                                (llm_pb2.ROLE_USER, "text", "And its size?")]


async def test_chat_stream_sends_role_then_deltas_then_finish_then_usage(client, fake):
    stream = await client.chat.completions.create(model=fake.MODEL, stream=True, messages=[
        {"role": "user", "content": "hi"}], stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]

    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    content = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert content == fake.REPLY
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * len(fake.REPLY) + ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(fake.REPLY)
    # As vLLM's server: a stream's usage leaves the cached tokens out.
    assert chunks[-1].usage.prompt_tokens_details is None
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_continuous_usage_puts_each_choice_s_usage_so_far_on_every_chunk(gateway_url, fake, path):
    body = {"model": fake.MODEL, "stream": True, "stream_options": {"include_usage": True,
                                                                    "continuous_usage_stats": True},
            **({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})}
    async with httpx.AsyncClient() as http:
        response = await http.post(gateway_url + path, json=body)
    chunks = [json.loads(line.removeprefix("data: ")) for line in response.text.split("\n\n")
              if line.startswith("data: {")]
    chat = "chat" in path
    counts = [0] * chat + list(range(1, len(fake.REPLY) + 1))  # a chat's role chunk comes before any token
    assert [c["usage"]["completion_tokens"] for c in chunks[:-1]] == counts
    assert all(c["usage"]["prompt_tokens"] == 11 and c["usage"]["total_tokens"] == 11 + n
               for c, n in zip(chunks, counts))
    # vLLM's shapes: a chat chunk's completion_tokens_details is null without a reasoning parser.
    assert all(("completion_tokens_details" in c["usage"]) == chat for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(fake.REPLY)
    assert fake.requests[-1].continuous_usage


async def test_chat_stream_without_usage_ends_with_done(gateway_url, fake):
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{gateway_url}/v1/chat/completions", json={
            "model": fake.MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    events = [line for line in response.text.split("\n\n") if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert events[-1] == "data: [DONE]" and '"usage"' not in response.text


async def test_chat_logprobs_follow_openai_shape(client, fake):
    response = await client.chat.completions.create(model=fake.MODEL, logprobs=True, top_logprobs=2,
                                                    messages=[{"role": "user", "content": "hi"}])
    assert fake.requests[0].sampling.logprobs == 2
    content = response.choices[0].logprobs.content
    assert [e.token for e in content] == fake.REPLY
    assert content[0].logprob == -0.5 and content[0].bytes == list(b"Hello")
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("Hello", -0.5), ("?", -2.0)]


async def test_completions_plain_and_streamed(client, fake):
    response = await client.completions.create(model=fake.MODEL, prompt="Once upon", max_tokens=5, logprobs=1)
    assert response.object == "text_completion" and response.id.startswith("cmpl-")
    assert response.choices[0].text == "".join(fake.REPLY) and response.choices[0].finish_reason == "stop"
    assert response.choices[0].logprobs.tokens == fake.REPLY
    assert response.choices[0].logprobs.text_offset == [0, 5, 10, 14, 19]
    assert response.usage.total_tokens == 11 + len(fake.REPLY)
    assert fake.requests[0].prompt == "Once upon" and fake.requests[0].sampling.max_tokens == 5

    stream = await client.completions.create(model=fake.MODEL, prompt="Once upon", stream=True,
                                             stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks[:-1]) == "".join(fake.REPLY)
    assert chunks[-2].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == len(fake.REPLY)


async def test_models_lists_the_backend_model(client, fake):
    models = (await client.models.list()).data
    assert [m.id for m in models] == [fake.MODEL]


async def test_request_id_header_is_used_end_to_end(gateway_url, fake):
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{gateway_url}/v1/chat/completions", headers={"x-request-id": "req-42"},
                                   json={"messages": [{"role": "user", "content": "hi"}]})
        again = await http.post(f"{gateway_url}/v1/chat/completions", headers={"x-request-id": "req-42"},
                                json={"messages": [{"role": "user", "content": "hi"}]})
        generated = await http.get(f"{gateway_url}/v1/models")
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-42"
    assert response.json()["id"] == "chatcmpl-req-42" and again.status_code == 200
    # llm_svc runs each under a unique id that starts with the client's, so repeated client ids never collide.
    backend_ids = [r.request_id for r in fake.requests[-2:]]
    assert all(i.startswith("req-42-") for i in backend_ids) and backend_ids[0] != backend_ids[1]
    assert len(generated.headers["x-request-id"]) == 32


async def test_health_and_metrics(gateway_url, client, fake):
    await client.chat.completions.create(model=fake.MODEL, messages=[{"role": "user", "content": "hi"}])
    async with httpx.AsyncClient() as http:
        health = await http.get(f"{gateway_url}/health")
        metrics = (await http.get(f"{gateway_url}/metrics")).text
    assert health.status_code == 200
    assert 'gateway_requests_total{endpoint="/v1/chat/completions",status="200"}' in metrics
    assert "gateway_time_to_first_token_seconds_count" in metrics
    assert "gateway_completion_tokens_total" in metrics and "gateway_requests_in_flight" in metrics


async def test_no_such_path_or_method_is_answered_as_vllm_s_server_does(gateway_url):
    async with httpx.AsyncClient() as http:
        missing = await http.get(f"{gateway_url}/v1/embeddings")
        wrong_method = await http.get(f"{gateway_url}/v1/chat/completions")
    assert missing.status_code == 404 and missing.json() == {"detail": "Not Found"}
    assert wrong_method.status_code == 405 and wrong_method.json() == {"detail": "Method Not Allowed"}
    assert wrong_method.headers["allow"] == "POST" and "x-request-id" in wrong_method.headers
