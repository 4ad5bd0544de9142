"""Several prompts in one completions request: the merge of their calls (choice numbering, summed usage, echo per
prompt), and the fan-out through the gateway against the fake llm_svc (one call per prompt, a failing prompt fails the
request, a client gone cancels every call). Parity with vLLM's own server is test_gateway_prompts_e2e's."""

import asyncio
import contextlib
import json

import httpx
import pytest

from gateway import translate
from gateway.fanout import MergedTokenStream
from gateway.responses import completion_renderer
from gateway.schemas import MAX_PROMPTS, CompletionRequest
from protos import llm_pb2

META = translate.ResponseMeta("cmpl-1", 0, "m")
STOP = llm_pb2.FINISH_REASON_STOP


class ScriptedStream:
    """A TokenStream's surface: its messages, each after `delay_s`."""

    def __init__(self, messages: list[llm_pb2.GenerateResponse], delay_s: float = 0.0):
        self.messages = messages
        self.delay_s = delay_s
        self.closed = False

    async def __aiter__(self):
        for message in self.messages:
            await asyncio.sleep(self.delay_s)
            yield message

    async def close(self):
        self.closed = True


def prompt_call(prompt: str, n: int, prompt_tokens: int) -> list[llm_pb2.GenerateResponse]:
    """One prompt's call with `n` choices: a token each, then each choice's end; the last message has the usage."""
    messages = [llm_pb2.GenerateResponse(index=j, text=f"{prompt}{j}") for j in range(n)]
    messages[0].prompt_text = prompt
    messages += [llm_pb2.GenerateResponse(index=j, text="!", finish_reason=STOP) for j in range(n)]
    messages[-1].usage.CopyFrom(llm_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=2 * n, cached_tokens=1))
    return messages


async def merged(n: int, echo: bool = False) -> tuple[list[llm_pb2.GenerateResponse], list[ScriptedStream]]:
    # The second prompt's call is the faster: its messages come first, and the first's usage comes last.
    streams = [ScriptedStream(prompt_call("a", n, 3), 0.02), ScriptedStream(prompt_call("b", n, 5))]
    return [message async for message in MergedTokenStream(streams, n)], streams


@pytest.mark.parametrize("n", [1, 2])
async def test_choices_are_numbered_as_vllm_numbers_them_and_usage_is_summed(n):
    messages, streams = await merged(n)
    body = translate.completion(messages, META, with_logprobs=False, echo=True, n=n)
    assert [(c["index"], c["text"]) for c in body["choices"]] == (
        [(j, f"aa{j}!") for j in range(n)] + [(n + j, f"bb{j}!") for j in range(n)])
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 4 * n, "total_tokens": 8 + 4 * n,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    assert messages[0].index >= n  # the faster prompt's messages came first, under its own numbers
    assert all(s.closed for s in streams)


async def test_a_merged_stream_renders_each_prompt_s_echo_on_its_own_choices():
    messages, _ = await merged(2)
    render = completion_renderer(META, None, echo=True, n=2)
    texts: dict[int, str] = {}
    for message in messages:
        if (chunk := render(message)) is not None:
            choice = chunk["choices"][0]
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "aa0!", 1: "aa1!", 2: "bb0!", 3: "bb1!"}


async def test_leaving_a_merged_stream_early_closes_every_call():
    streams = [ScriptedStream(prompt_call("a", 1, 3), 0.5), ScriptedStream(prompt_call("b", 1, 3))]
    async with contextlib.aclosing(aiter(MergedTokenStream(streams, 1))) as messages:
        async for _ in messages:
            break
    assert all(s.closed for s in streams)


def test_several_prompts_are_several_calls_named_as_vllm_names_them():
    request = CompletionRequest.model_validate({"prompt": [[5, 6], [7]], "n": 2, "echo": True, "logprobs": 1})
    calls = translate.completion_generate_requests(request, "r", 100)
    assert [(c.request_id, list(c.prompt_tokens.token_ids), c.sampling.n) for c in calls] == [
        ("r-0", [5, 6], 2), ("r-1", [7], 2)]
    one = translate.completion_generate_requests(CompletionRequest.model_validate({"prompt": ["x"]}), "r", 100)
    assert [(c.request_id, c.prompt) for c in one] == [("r", "x")]


# ---- through the gateway, against the fake llm_svc ----------------------------------------------------------

async def post(url: str, body: dict, **kwargs) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as http:
        return await http.post(f"{url}/v1/completions", json={"model": "tiny-internvl", **body}, **kwargs)


async def test_each_prompt_is_its_own_call_and_its_own_choice(gateway_url, fake):
    response = await post(gateway_url, {"prompt": ["one", "two", "three"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert sorted(r.prompt for r in fake.requests) == ["one", "three", "two"]
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(i, "Hello from the fake.") for i in range(3)]
    assert body["usage"]["prompt_tokens"] == 33 and body["usage"]["completion_tokens"] == 15


async def test_a_stream_interleaves_the_prompts_and_ends_with_their_summed_usage(gateway_url, fake):
    response = await post(gateway_url, {"prompt": ["one", "two"], "stream": True,
                                        "stream_options": {"include_usage": True}})
    events = [e.removeprefix("data: ") for e in response.text.split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "Hello from the fake.", 1: "Hello from the fake."}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 22, "completion_tokens": 10,
                                                                   "total_tokens": 32}


@pytest.mark.parametrize("stream", [False, True])
async def test_one_failing_prompt_fails_the_request_with_its_error(gateway_url, fake, stream):
    response = await post(gateway_url, {"prompt": ["slow", "error:INVALID_ARGUMENT", "slow"], "stream": stream})
    assert response.status_code == 400
    assert response.json()["error"]["message"].endswith("scripted INVALID_ARGUMENT")


async def test_more_prompts_than_the_limit_is_a_400_naming_it(gateway_url, fake):
    response = await post(gateway_url, {"prompt": ["x"] * (MAX_PROMPTS + 1)})
    assert response.status_code == 400
    assert f"({MAX_PROMPTS})" in response.json()["error"]["message"] and not fake.requests


async def wait_for_cancellations(fake, count: int) -> None:
    async with asyncio.timeout(5):
        while fake.cancellations < count:
            await asyncio.sleep(0.02)


async def test_a_client_gone_mid_stream_cancels_every_prompt_s_call(gateway_url, fake):
    async with httpx.AsyncClient(timeout=30) as http:
        async with http.stream("POST", f"{gateway_url}/v1/completions",
                               json={"model": "tiny-internvl", "prompt": ["slow", "slow"], "stream": True}) as response:
            lines = response.aiter_lines()
            for _ in range(4):
                await anext(lines)
    await wait_for_cancellations(fake, 2)


async def test_a_client_gone_before_a_whole_answer_cancels_every_prompt_s_call(gateway_url, fake):
    with pytest.raises(httpx.ReadTimeout):
        await post(gateway_url, {"prompt": ["slow", "slow"]}, timeout=0.5)
    await wait_for_cancellations(fake, 2)
