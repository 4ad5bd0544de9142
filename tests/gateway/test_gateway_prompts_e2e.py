"""Several prompts in one completions request end to end: the same request to the real stack and to vLLM's own OpenAI
server (same tiny checkpoint, same flags) gets the same choices (prompt p's choice j at index p * n + j), the same
summed usage, the same echo and logprobs, streamed and not; and a bad prompt among good ones fails the request with
vLLM's message.

The stack and vLLM's server are the package's (tests/gateway/conftest.py).
"""

import json

import pytest

from tests.gateway.conftest import MODEL
from tests.gateway.test_gateway_choices_e2e import choices, close, post, streamed, usage

COMPLETIONS = "/v1/completions"
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 5}
SEEDED = {"model": MODEL, "temperature": 1.0, "seed": 7, "max_tokens": 6}
TEXTS = ["Once upon a time", "The dragon said", "In the morning"]


def token_ids(client, text: str) -> list[int]:
    return post(client, "/tokenize", {"model": MODEL, "prompt": text})["tokens"]


def same_answer(servers, request: dict) -> dict:
    """Ours, after checking it equals vLLM's whole and streamed: choices by index, then the usage."""
    ours, theirs = servers
    mine, vllm = post(ours, COMPLETIONS, request), post(theirs, COMPLETIONS, request)
    assert choices(mine, COMPLETIONS) == choices(vllm, COMPLETIONS)
    assert usage(mine) == usage(vllm)
    assert streamed(ours, COMPLETIONS, request) == streamed(theirs, COMPLETIONS, request) == (
        choices(mine, COMPLETIONS), usage(mine))
    return mine


@pytest.mark.parametrize("n", [1, 2])
def test_text_prompts_equal_vllm_s(servers, n):
    request = {**(GREEDY if n == 1 else SEEDED), "prompt": TEXTS, "n": n}
    mine = same_answer(servers, request)
    assert [c["index"] for c in mine["choices"]] == list(range(len(TEXTS) * n))
    # Usage is summed over the prompts: each prompt alone adds up to it.
    alone = [usage(post(servers[0], COMPLETIONS, {**request, "prompt": text})) for text in TEXTS]
    assert usage(mine) == (sum(a[0] for a in alone), sum(a[1] for a in alone))


@pytest.mark.parametrize("n", [1, 2])
def test_token_id_prompts_equal_vllm_s(servers, n):
    prompts = [token_ids(servers[1], text) for text in TEXTS[:2]]
    mine = same_answer(servers, {**(GREEDY if n == 1 else SEEDED), "prompt": prompts, "n": n})
    assert len(mine["choices"]) == 2 * n


@pytest.mark.parametrize("n", [1, 2])
def test_echo_with_logprobs_equals_vllm_s(servers, n):
    ours, theirs = servers
    request = {**(GREEDY if n == 1 else SEEDED), "prompt": TEXTS[:2], "n": n, "echo": True, "logprobs": 2}
    mine, vllm = post(ours, COMPLETIONS, request), post(theirs, COMPLETIONS, request)
    assert choices(mine, COMPLETIONS) == choices(vllm, COMPLETIONS) and usage(mine) == usage(vllm)
    assert [c["text"].startswith(TEXTS[c["index"] // n]) for c in mine["choices"]] == [True] * 2 * n
    for my_choice, their_choice in zip(mine["choices"], vllm["choices"], strict=True):
        assert close(my_choice["logprobs"], their_choice["logprobs"]), (my_choice["logprobs"], their_choice["logprobs"])
        assert close(my_choice["prompt_logprobs"], their_choice["prompt_logprobs"])
    if n == 1:  # vLLM's own stream of echo with logprobs and n > 1 ends in an error event (test_gateway_choices_e2e)
        assert streamed(ours, COMPLETIONS, request) == streamed(theirs, COMPLETIONS, request)
    else:
        assert streamed(ours, COMPLETIONS, request) == (choices(vllm, COMPLETIONS), usage(vllm))


@pytest.mark.parametrize("stream", [False, True])
def test_a_bad_prompt_among_good_ones_is_a_400_as_vllm_s(servers, stream):
    ours, theirs = servers
    request = {**GREEDY, "prompt": [token_ids(theirs, TEXTS[0]), [1 << 20], token_ids(theirs, TEXTS[1])],
               "stream": stream}
    mine, vllm = ours.post(COMPLETIONS, json=request), theirs.post(COMPLETIONS, json=request)
    assert mine.status_code == 400, mine.text
    if stream:
        # vLLM's server checks the token ids once its stream has begun, and sends its error as an SSE event; the
        # gateway, which waits for every prompt's first message before it answers, as a 400.
        assert vllm.status_code == 200
        error = json.loads(vllm.text.split("\n\n")[0].removeprefix("data: "))
    else:
        assert vllm.status_code == 400
        error = vllm.json()
    assert mine.json()["error"]["message"] == error["error"]["message"] == "Token id 1048576 is out of vocabulary"
