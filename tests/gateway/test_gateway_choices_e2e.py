"""Several choices, echo, prompt log-probabilities and token-id prompts end to end: the same request to the real
stack and to vLLM's own OpenAI server (same tiny checkpoint, same flags) gets the same answer: each choice's text,
finish reason and index, the token counts, the logprobs and the prompt's log-probabilities, streamed and not.

The stack and vLLM's server are the package's (tests/gateway/conftest.py), shared with the other e2e modules.
"""

import json

import httpx
import pytest

from tests.gateway.conftest import MODEL

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
# Sampled, not greedy: with a seed, choice i samples with seed + i in both servers, so the choices differ.
SEEDED = {"model": MODEL, "temperature": 1.0, "seed": 7, "max_tokens": 6}
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 5}
PROMPT = "Once upon a time"
LOGPROB_TOLERANCE = 1e-4


def post(client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def choices(data: dict, path: str) -> list[tuple]:
    text = (lambda c: c["message"]["content"]) if path == CHAT else (lambda c: c["text"])
    return [(c["index"], text(c), c["finish_reason"]) for c in data["choices"]]


def usage(data: dict) -> tuple[int, int]:
    return data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"]


def streamed(client: httpx.Client, path: str, body: dict) -> tuple[list[tuple], tuple[int, int]]:
    """Each choice's joined text and finish reason, and the usage chunk's counts."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    texts, reasons, counts = {}, {}, None
    with client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line.removeprefix("data: "))
            counts = usage(event) if event.get("usage") else counts
            for choice in event["choices"]:
                piece = choice["delta"].get("content") if path == CHAT else choice["text"]
                texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
                reasons[choice["index"]] = choice["finish_reason"] or reasons.get(choice["index"])
    return [(i, texts[i], reasons[i]) for i in sorted(texts)], counts


def close(mine, theirs) -> bool:
    """Equal, floats within LOGPROB_TOLERANCE (each server ran its own forward pass)."""
    if isinstance(mine, dict):
        return isinstance(theirs, dict) and set(mine) == set(theirs) and all(close(mine[k], theirs[k]) for k in mine)
    if isinstance(mine, list):
        return isinstance(theirs, list) and len(mine) == len(theirs) and all(map(close, mine, theirs))
    if isinstance(mine, float) and isinstance(theirs, float):
        return abs(mine - theirs) <= LOGPROB_TOLERANCE
    return mine == theirs


@pytest.mark.parametrize("path,body", [
    (CHAT, {"messages": [{"role": "user", "content": "Tell me a story."}]}),
    (COMPLETIONS, {"prompt": PROMPT}),
])
def test_several_seeded_choices_equal_vllm_s_streamed_and_not(servers, path, body):
    ours, theirs = servers
    request = {**SEEDED, **body, "n": 3}
    mine = post(ours, path, request)
    assert choices(mine, path) == choices(post(theirs, path, request), path)
    assert usage(mine) == usage(post(theirs, path, request))
    assert len({text for _, text, _ in choices(mine, path)}) > 1  # the seeds differ per choice
    assert [i for i, _, _ in choices(mine, path)] == [0, 1, 2]
    assert streamed(ours, path, request) == streamed(theirs, path, request) == (choices(mine, path), usage(mine))


def test_echo_with_logprobs_equals_vllm_s(servers):
    ours, theirs = servers
    request = {**SEEDED, "prompt": PROMPT, "echo": True, "logprobs": 2, "n": 2}
    mine, vllm = post(ours, COMPLETIONS, request), post(theirs, COMPLETIONS, request)
    assert mine["choices"][0]["text"].startswith(PROMPT)
    assert choices(mine, COMPLETIONS) == choices(vllm, COMPLETIONS) and usage(mine) == usage(vllm)
    for my_choice, their_choice in zip(mine["choices"], vllm["choices"]):
        assert close(my_choice["logprobs"], their_choice["logprobs"]), (my_choice["logprobs"], their_choice["logprobs"])
        # Each token's alternatives in vLLM's order: the token itself first.
        assert [list(top or ()) for top in my_choice["logprobs"]["top_logprobs"]] == \
            [list(top or ()) for top in their_choice["logprobs"]["top_logprobs"]]
        assert close(my_choice["prompt_logprobs"], their_choice["prompt_logprobs"])
    # vLLM's own stream of this request (echo, logprobs, n > 1) ends in an error event: held to its whole answer.
    assert streamed(ours, COMPLETIONS, request) == (choices(vllm, COMPLETIONS), usage(vllm))


@pytest.mark.parametrize("path,body", [
    (CHAT, {"messages": [{"role": "user", "content": "Tell me a story."}]}),
    (COMPLETIONS, {"prompt": PROMPT}),
])
def test_prompt_logprobs_equal_vllm_s(servers, path, body):
    ours, theirs = servers
    request = {**GREEDY, **body, "prompt_logprobs": 2}
    mine, vllm = post(ours, path, request), post(theirs, path, request)
    def where(data):
        return data["prompt_logprobs"] if path == CHAT else data["choices"][0]["prompt_logprobs"]
    assert where(mine)[0] is None and len(where(mine)) == usage(mine)[0]
    assert close(where(mine), where(vllm)), (where(mine), where(vllm))
    assert choices(mine, path) == choices(vllm, path)


def test_a_token_id_prompt_is_answered_as_its_text_is(servers):
    ours, theirs = servers
    token_ids = post(theirs, "/tokenize", {"model": MODEL, "prompt": PROMPT})["tokens"]
    for prompt in (token_ids, [token_ids]):
        request = {**GREEDY, "prompt": prompt, "echo": True}
        mine = post(ours, COMPLETIONS, request)
        assert choices(mine, COMPLETIONS) == choices(post(theirs, COMPLETIONS, request), COMPLETIONS)
        assert usage(mine) == usage(post(theirs, COMPLETIONS, request))
    assert streamed(ours, COMPLETIONS, request) == streamed(theirs, COMPLETIONS, request)


def test_chat_echo_repeats_the_last_message_of_the_answer_s_role(servers):
    ours, theirs = servers
    messages = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once"}]
    request = {**GREEDY, "messages": messages, "echo": True, "add_generation_prompt": False,
               "continue_final_message": True}
    mine = post(ours, CHAT, request)
    assert mine["choices"][0]["message"]["content"].startswith("Once")
    assert choices(mine, CHAT) == choices(post(theirs, CHAT, request), CHAT)
    assert streamed(ours, CHAT, request) == streamed(theirs, CHAT, request)


@pytest.mark.parametrize("path,body", [
    (COMPLETIONS, {"prompt": PROMPT, "prompt_logprobs": 1, "stream": True}),
    (CHAT, {"messages": [{"role": "user", "content": "hi"}], "prompt_logprobs": -2}),
    (COMPLETIONS, {"prompt": [1 << 20]}),
])
def test_what_is_not_answered_is_a_400(servers, path, body):
    ours, _ = servers
    response = ours.post(path, json={**GREEDY, **body})
    assert response.status_code == 400, response.text


def test_several_greedy_choices_are_refused_with_vllm_s_message(servers):
    ours, theirs = servers
    request = {**GREEDY, "prompt": PROMPT, "n": 2}
    mine, vllm = ours.post(COMPLETIONS, json=request), theirs.post(COMPLETIONS, json=request)
    assert mine.status_code == vllm.status_code == 400
    assert mine.json()["error"]["message"] == vllm.json()["error"]["message"]
