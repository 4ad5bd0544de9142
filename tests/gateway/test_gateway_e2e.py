"""The whole pipeline through the gateway, with the official openai client, against the real stages; and
parity with vLLM's own (monolithic) OpenAI server on the same checkpoint."""

import base64
import concurrent.futures
import time

import httpx
import openai
import pytest
from PIL import Image

from bench.front_cost import context_switches
from bench.slow_reader import stalled_read
from deploy.local import Stage, free_port
from tests.gateway.conftest import API_KEY, MODEL
from tests.llm_svc.llm_helpers import image, metric, png_bytes
from tests.stack import start_gateway

GREEDY = {"temperature": 0, "max_tokens": 10}


def data_url(picture: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(picture)).decode()


def user(*parts) -> dict:
    """Parts that are URLs (data:, http:) become image parts; the others text."""
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": p}}
                                        if p.startswith(("data:", "http:")) else {"type": "text", "text": p}
                                        for p in parts]}


RED, BLUE = image(900, 500, seed=1), image(500, 700, seed=2)
CONVERSATIONS = {
    "one_image": [user(data_url(RED), "Describe the image.")],
    "two_images": [user(data_url(RED), data_url(BLUE), "Compare them.")],
    "multi_turn": [user(data_url(RED), "What is this?"), {"role": "assistant", "content": "A field of colour."},
                   user(data_url(BLUE), "And this one?")],
    "text_only": [{"role": "user", "content": "Tell me a story."}],
}


@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_greedy_text_equals_vllm_own_openai_server(client, vllm_server, conversation):
    messages = CONVERSATIONS[conversation]
    ours = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    theirs = vllm_server.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    assert ours.choices[0].message.content == theirs.choices[0].message.content
    assert ours.usage.prompt_tokens == theirs.usage.prompt_tokens
    assert ours.usage.completion_tokens == 10 and ours.choices[0].finish_reason == "length"


def test_completions_equal_vllm_own_openai_server(client, vllm_server):
    ours = client.completions.create(model=MODEL, prompt="Once upon a time", **GREEDY)
    theirs = vllm_server.completions.create(model=MODEL, prompt="Once upon a time", **GREEDY)
    assert ours.choices[0].text == theirs.choices[0].text and len(ours.choices[0].text) > 0


def test_streaming_with_usage_equals_the_plain_answer(client):
    messages = CONVERSATIONS["one_image"]
    plain = client.chat.completions.create(model=MODEL, messages=messages, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens


def test_image_fetched_over_http_gives_the_same_answer_as_a_data_url(client, image_server):
    base, images = image_server
    images["/e2e-red.png"] = png_bytes(RED)
    by_url = client.chat.completions.create(model=MODEL, messages=[user(f"{base}/e2e-red.png", "Describe the image.")],
                                            **GREEDY)
    by_data = client.chat.completions.create(model=MODEL, messages=CONVERSATIONS["one_image"], **GREEDY)
    assert by_url.choices[0].message.content == by_data.choices[0].message.content


def test_concurrent_images_of_different_sizes_each_get_their_own_answer(client):
    # 1, 3 and 7 tiles, each image new to the engine: their embeddings differ in length, and concurrent
    # requests share the engine's steps (which once stopped the engine).
    pictures = [image(*size, seed=seed) for seed in range(10, 13) for size in [(448, 448), (896, 448), (1344, 896)]]
    requests = [[user(data_url(picture), "Describe the image.")] for picture in pictures]
    # Together first: the engine batches only embeddings it has not cached yet.
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(lambda m: client.chat.completions.create(model=MODEL, messages=m, **GREEDY),
                                 requests))
    alone = [client.chat.completions.create(model=MODEL, messages=m, **GREEDY) for m in requests]
    assert [r.choices[0].message.content for r in together] == [r.choices[0].message.content for r in alone]


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


@pytest.mark.parametrize("call,status", [
    (lambda c: c.chat.completions.create(model=MODEL, messages=[user("data:image/png;base64,iVBORw0KGgoAAAA", "hi")],
                                         **GREEDY), 400),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[user("hi")], temperature=0, max_tokens=100000), 400),
    (lambda c: c.chat.completions.create(model="no-such-model", messages=[user("hi")], **GREEDY), 404),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[user("hi")], temperature=9), 400),
])
def test_errors_from_the_real_backend_have_their_http_status(client, call, status):
    with pytest.raises(openai.APIStatusError) as error:
        call(client)
    assert error.value.status_code == status
    assert error.value.body["message"]


def test_wrong_api_key_is_401(stack):
    wrong = openai.OpenAI(base_url=f"http://{stack['gateway'].address}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_backend_down_is_503(tmp_path):
    port = free_port()
    dead = f"127.0.0.1:{free_port()}"
    gateway = Stage("gateway", ["gateway", "--llm", dead, "--host", "127.0.0.1", "--port", str(port)], port,
                    tmp_path / "gateway.log", http_health=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.post(f"http://{gateway.address}/v1/chat/completions", timeout=30, json={
                    "model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
                break
            except httpx.ConnectError:
                assert time.monotonic() < deadline, gateway.logs()
                time.sleep(0.2)
        assert response.status_code == 503
        assert response.json()["error"]["message"]
    finally:
        gateway.stop()


def test_client_disconnect_mid_stream_leaves_no_request_in_the_engine(stack):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "story"}], "stream": True,
            "max_tokens": 3000, "ignore_eos": True}
    with httpx.stream("POST", f"http://{stack['gateway'].address}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = response.iter_lines()
        for _ in range(5):
            next(lines)
        assert metric(stack["llm_metrics"], "vllm:num_requests_running") == 1
    deadline = time.monotonic() + 10
    while metric(stack["llm_metrics"], "vllm:num_requests_running") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(stack["llm_metrics"], "vllm:num_requests_running") == 0


def test_a_reader_that_stalls_gets_the_tokens_made_meanwhile_merged_and_loses_none(stack):
    # Once the ~3 MB of socket buffers are full, the gateway pauses the call on its GenerateStream and the engine
    # merges its tokens, as vLLM's server does: the rest comes in a few large events, not one queued per token.
    # (~2 KB events with 20 top logprobs fill the buffers in ~1600 tokens.)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "story"}], "stream": True, "max_tokens": 2500,
            "ignore_eos": True, "temperature": 0, "logprobs": True, "top_logprobs": 20,
            "stream_options": {"include_usage": True}}

    def until_the_engine_is_done() -> None:
        deadline = time.monotonic() + 120
        while metric(stack["llm_metrics"], "vllm:num_requests_running") and time.monotonic() < deadline:
            time.sleep(0.2)

    answer = stalled_read(stack["gateway"].address, body, until_the_engine_is_done,
                          {"Authorization": f"Bearer {API_KEY}"})
    assert answer.completion_tokens == len(answer.token_bytes) == 2500  # every token's delta came
    assert answer.events < 0.8 * 2500  # 0.99 with one event per token


def test_request_id_appears_in_every_stage_log(client, stack):
    client.chat.completions.create(model=MODEL, messages=[user(data_url(image(321, 123, seed=9)), "Hi")],
                                   extra_headers={"x-request-id": "trace-me-4242"}, **GREEDY)
    time.sleep(0.5)
    for name in ("gateway", "llm", "vision"):
        assert "trace-me-4242" in stack[name].log_path.read_text(errors="replace"), f"{name} log lacks the id"


def test_every_stage_froze_its_startup_heap(stack):
    # Else a collection of its oldest generation walks the whole of vLLM, torch or Starlette and stalls every stream.
    for name in ("gateway", "llm", "vision"):
        log = stack[name].log_path.read_text(errors="replace")
        assert "start-up heap frozen" in log, f"{name} did not freeze its start-up heap"


def test_the_gateway_reads_streamed_tokens_without_a_thread_hop_per_message(client, stack):
    # grpc's EventEngine client would wake its threads 3-4 times for each message from llm_svc (gateway/__main__.py).
    # Those threads also wake on grpc's timers, idle or not (~30 times a second here): the same time spent idle
    # right after the stream is taken off.
    pid = stack["gateway"].proc.pid
    before, started = context_switches(pid, "event_engine"), time.monotonic()
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "story"}], stream=True,
                                            max_tokens=100, extra_body={"ignore_eos": True}, temperature=0)
    chunks = sum(1 for _ in stream)
    streamed = context_switches(pid, "event_engine")
    time.sleep(time.monotonic() - started)
    streaming, idle = streamed - before, context_switches(pid, "event_engine") - streamed
    assert chunks >= 50  # fewer than the tokens where a busy machine had vLLM merge a few of them
    assert streaming - idle < chunks, f"{streaming} switches while streaming {chunks} chunks, {idle} idle"


def test_a_flood_of_image_requests_gets_answers_or_429s_never_an_error(stack, tmp_path):
    picture = data_url(image(1600, 1200, seed=5))
    # The byte budget fits about one such request at a time while its image is on its way to llm_svc.
    one_request = 2 * len(picture) + len(picture)
    gateway = start_gateway([stack["llm"]], tmp_path, "--max-request-bytes", str(2 * len(picture)),
                            "--max-image-bytes", str(len(picture)), "--max-images-per-request", "1",
                            "--max-video-bytes", "1", "--max-videos-per-request", "1",
                            "--max-bytes-in-flight", str(one_request + len(picture))).wait_ready()
    body = {"model": MODEL, "messages": [user(picture, "Describe the image.")], **GREEDY}
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(lambda _: httpx.post(f"http://{gateway.address}/v1/chat/completions",
                                                           json=body, timeout=120), range(8)))
        statuses = [r.status_code for r in responses]
        assert set(statuses) <= {200, 429} and 200 in statuses, statuses
        assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 429)
        assert httpx.post(f"http://{gateway.address}/v1/chat/completions", json=body, timeout=120).status_code == 200
    finally:
        gateway.stop()
