"""Streamed usage and prompt truncation end to end: the same request to the real stack and to vLLM's own OpenAI server
(same tiny checkpoint, same flags) gets the same usage on the same chunks, and the same truncated prompt's answer.

The stack and vLLM's server are the package's (tests/gateway/conftest.py).
"""

import json

import httpx
import pytest

from tests.gateway.conftest import MODEL

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 6, "ignore_eos": True}
STORY = [{"role": "user", "content": "Tell me a story about a dragon who lived in a cave by the sea."}]
PROMPT = "Once upon a time, in a land far away, there lived a dragon who"
CONTINUOUS = {"include_usage": True, "continuous_usage_stats": True}


def body_for(path: str, **fields) -> dict:
    return {**GREEDY, **({"messages": STORY} if path == CHAT else {"prompt": PROMPT}), **fields}


def stream_chunks(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def usage_view(chunks: list[dict]) -> dict:
    """What compares across the two servers, which group the same tokens into chunks differently: the usage on the
    chunks before any token, on each choice's last chunk, and the final usage chunk, each with its keys as sent."""
    choice_chunks = [c for c in chunks if c["choices"]]
    assert all("usage" in c for c in choice_chunks), "a chunk without usage"
    for index in {c["choices"][0]["index"] for c in choice_chunks}:
        counts = [c["usage"]["completion_tokens"] for c in choice_chunks if c["choices"][0]["index"] == index]
        assert counts == sorted(counts), "a choice's completion tokens went down"
    opening = [c["usage"] for c in choice_chunks if c["usage"]["completion_tokens"] == 0]
    finishing = {c["choices"][0]["index"]: c["usage"] for c in choice_chunks if c["choices"][0]["finish_reason"]}
    return {"opening": opening, "finishing": finishing, "final": chunks[-1]["usage"],
            "final_choices": chunks[-1]["choices"]}


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("n", [1, 2])
def test_continuous_usage_equals_vllm_s(servers, path, n):
    ours, theirs = servers
    body = body_for(path, n=n, seed=3, stream_options=CONTINUOUS, **({"temperature": 1} if n > 1 else {}))
    mine = usage_view(stream_chunks(ours, path, body))
    assert mine == usage_view(stream_chunks(theirs, path, body))
    assert len(mine["finishing"]) == n and all(u["completion_tokens"] == 6 for u in mine["finishing"].values())


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_a_stream_s_usage_chunk_equals_vllm_s(servers, path):
    ours, theirs = servers
    body = body_for(path, stream_options={"include_usage": True})
    mine, vllms = stream_chunks(ours, path, body), stream_chunks(theirs, path, body)
    assert mine[-1]["usage"] == vllms[-1]["usage"]
    assert "prompt_tokens_details" not in mine[-1]["usage"]
    # Without continuous_usage_stats no other chunk carries usage, on either server.
    assert not any("usage" in c for c in mine[:-1] + vllms[:-1])


def answer(client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    choice = data["choices"][0]
    return {"text": choice["message"]["content"] if path == CHAT else choice["text"],
            "prompt_tokens": data["usage"]["prompt_tokens"], "completion_tokens": data["usage"]["completion_tokens"]}


def streamed_answer(client: httpx.Client, path: str, body: dict) -> dict:
    chunks = stream_chunks(client, path, {**body, "stream_options": {"include_usage": True}})
    pieces = [c["choices"][0]["delta"].get("content") or "" if path == CHAT else c["choices"][0]["text"]
              for c in chunks if c["choices"]]
    usage = chunks[-1]["usage"]
    return {"text": "".join(pieces), "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]}


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("fields", [{"truncate_prompt_tokens": 5}, {"truncate_prompt_tokens": 5,
                                                                     "truncation_side": "right"},
                                    {"truncate_prompt_tokens": -1}])
def test_truncated_prompts_get_vllm_s_answer(servers, path, fields):
    ours, theirs = servers
    body = body_for(path, **fields)
    mine = answer(ours, path, body)
    assert mine == answer(theirs, path, body) == streamed_answer(ours, path, body) == streamed_answer(theirs, path,
                                                                                                      body)
    full = answer(ours, path, body_for(path))
    if fields["truncate_prompt_tokens"] > 0:
        assert mine["prompt_tokens"] == 5 < full["prompt_tokens"]
    else:
        assert mine == full


def test_truncating_from_either_side_keeps_different_tokens(servers):
    ours, _ = servers
    left = answer(ours, COMPLETIONS, body_for(COMPLETIONS, truncate_prompt_tokens=4))
    right = answer(ours, COMPLETIONS, body_for(COMPLETIONS, truncate_prompt_tokens=4, truncation_side="right"))
    assert left["text"] != right["text"]


def test_token_id_prompts_are_truncated_as_vllm_does(servers):
    ours, _ = servers
    body = body_for(COMPLETIONS, prompt=list(range(500, 520)), truncate_prompt_tokens=3)
    assert same_answer(servers, COMPLETIONS, body)["prompt_tokens"] == 3
    assert answer(ours, COMPLETIONS, body) == answer(ours, COMPLETIONS, body_for(COMPLETIONS, prompt=[517, 518, 519]))


def same_answer(servers, path: str, body: dict) -> dict:
    ours, theirs = servers
    mine = answer(ours, path, body)
    assert mine == answer(theirs, path, body)
    return mine


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("value", [8193, 1 << 40, -2])
def test_a_truncation_vllm_refuses_is_a_400_with_its_message(servers, path, value):
    ours, theirs = servers
    body = body_for(path, truncate_prompt_tokens=value)
    mine, vllms = ours.post(path, json=body), theirs.post(path, json=body)
    assert mine.status_code == vllms.status_code == 400, (mine.text, vllms.text)
    assert "truncate_prompt_tokens" in mine.json()["error"]["message"]
    if value > 0:
        assert mine.json()["error"]["message"] == vllms.json()["error"]["message"]
