"""The sampling and chat-template controls end to end: the same request to the real stack and to vLLM's own OpenAI
server (same tiny checkpoint, same flags) gets the same greedy answer, text and token counts; and a control that
works shows in the answer (it differs from the answer without it).

The stack and vLLM's server are the package's (tests/gateway/conftest.py), shared with test_gateway_e2e.
"""

import base64
import json
import re

import httpx
import pytest

from tests.gateway.conftest import MODEL
from tests.llm_svc.llm_helpers import image, png_bytes

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
GREEDY = {"model": MODEL, "temperature": 0, "max_tokens": 8}
STORY = [{"role": "user", "content": "Tell me a story."}]
# Tokens of the tiny tokenizer that are whole pieces of words ("pell", "ven", "ool"), so that they show in the text.
WORDS = (500, 501, 502)


def special_token_id(checkpoint, text: str) -> int:
    added = json.loads((checkpoint / "tokenizer.json").read_text())["added_tokens"]
    return next(token["id"] for token in added if token["content"] == text)


@pytest.fixture(scope="module")
def img_token(tiny_checkpoint) -> int:
    return special_token_id(tiny_checkpoint(layout="original", llm="dense"), "<img>")


def answer(client: httpx.Client, path: str, body: dict) -> dict:
    """What a user compares: the text, why it ended, and the token counts."""
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    choice = data["choices"][0]
    text = choice["message"]["content"] if path == CHAT else choice["text"]
    return {"text": text, "finish_reason": choice["finish_reason"],
            "prompt_tokens": data["usage"]["prompt_tokens"], "completion_tokens": data["usage"]["completion_tokens"]}


def same_answer(servers, path: str, body: dict) -> dict:
    ours, theirs = servers
    mine = answer(ours, path, body)
    assert mine == answer(theirs, path, body)
    return mine


def chat(messages=STORY, **fields) -> dict:
    return {**GREEDY, "messages": messages, **fields}


def test_min_tokens_holds_back_a_stop_token(servers):
    # The bias makes one token the first choice at every step, and it is a stop token: without min_tokens the
    # answer is that one token; with it, the stop token waits for the sixth.
    stop_at_once = dict(logit_bias={str(WORDS[0]): 100}, stop_token_ids=[WORDS[0]])
    stopped = same_answer(servers, CHAT, chat(**stop_at_once))
    held = same_answer(servers, CHAT, chat(**stop_at_once, min_tokens=5))
    assert (stopped["completion_tokens"], held["completion_tokens"]) == (1, 6)
    assert held["finish_reason"] == "stop"


def test_allowed_token_ids_and_logit_bias(servers):
    plain = same_answer(servers, CHAT, chat())
    allowed = same_answer(servers, CHAT, chat(allowed_token_ids=list(WORDS)))
    assert re.fullmatch("(pell|ven|ool)+", allowed["text"]) and allowed["text"] != plain["text"]
    for word, text in zip(WORDS, ("pell", "ven", "ool")):
        assert same_answer(servers, CHAT, chat(logit_bias={str(word): 100}))["text"] == text * 8


def test_bad_words(servers):
    story = {**GREEDY, "prompt": "Once upon a time"}
    plain = same_answer(servers, COMPLETIONS, story)
    ours, _ = servers
    first = ours.post(COMPLETIONS, json={**story, "logprobs": 0}).json()["choices"][0]["logprobs"]["tokens"][0]
    banned = same_answer(servers, COMPLETIONS, {**story, "bad_words": [first.strip()]})  # the answer's first token
    assert banned["text"] != plain["text"]


def test_include_stop_str_in_output(servers):
    plain = same_answer(servers, COMPLETIONS, {**GREEDY, "prompt": "Once upon a time"})
    stop = plain["text"][2:4]
    without = same_answer(servers, COMPLETIONS, {**GREEDY, "prompt": "Once upon a time", "stop": [stop]})
    with_it = same_answer(servers, COMPLETIONS, {**GREEDY, "prompt": "Once upon a time", "stop": [stop],
                                                 "include_stop_str_in_output": True})
    assert with_it["text"] == without["text"] + stop


@pytest.mark.parametrize("fields", [{}, {"skip_special_tokens": False},
                                    {"skip_special_tokens": False, "spaces_between_special_tokens": False}])
def test_special_tokens_in_the_text(servers, img_token, fields):
    # A bias that makes the model write <img> tokens, which the text leaves out unless asked to keep them.
    shown = same_answer(servers, CHAT, chat(logit_bias={str(img_token): 100}, **fields))
    assert ("<img>" in shown["text"]) == ("skip_special_tokens" in fields)


def test_completions_default_to_16_tokens(servers):
    body = {"model": MODEL, "temperature": 0, "prompt": "Once upon a time", "ignore_eos": True}
    assert same_answer(servers, COMPLETIONS, body)["completion_tokens"] == 16


def test_add_generation_prompt_false(servers):
    with_prompt = same_answer(servers, CHAT, chat())
    without = same_answer(servers, CHAT, chat(add_generation_prompt=False))
    assert without["prompt_tokens"] < with_prompt["prompt_tokens"]


def test_continue_final_message_prefills_the_answer(servers):
    messages = [*STORY, {"role": "assistant", "content": "Once upon a time"}]
    continued = same_answer(servers, CHAT, chat(messages, add_generation_prompt=False, continue_final_message=True))
    assert continued["text"]


def test_chat_template_kwargs_reach_the_template(servers):
    same_answer(servers, CHAT, chat(chat_template_kwargs={"enable_thinking": False}))


def test_an_image_chat_with_the_template_controls(servers):
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image(300, 200, seed=3))).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe it."}]},
                {"role": "assistant", "content": "It shows"}]
    same_answer(servers, CHAT, chat(messages, add_generation_prompt=False, continue_final_message=True,
                                    min_tokens=2, logit_bias={str(WORDS[2]): 5}))


@pytest.mark.parametrize("fields", [{"allowed_token_ids": [1 << 20]}, {"logit_bias": {str(1 << 20): 1}},
                                    {"continue_final_message": True}])
def test_what_vllm_refuses_is_a_400_here_too(servers, fields):
    ours, theirs = servers
    assert ours.post(CHAT, json=chat(**fields)).status_code == theirs.post(CHAT, json=chat(**fields)).status_code \
        == 400


@pytest.mark.parametrize("path,fields", [(CHAT, {"stream_options": {"include_usage": True}}),
                                         (COMPLETIONS, {"stream_options": {"include_usage": True}}),
                                         (CHAT, {"top_logprobs": 2})])
def test_what_vllm_refuses_as_sent_is_a_400_with_its_message(servers, path, fields):
    ours, theirs = servers
    body = chat(**fields) if path == CHAT else {**GREEDY, "prompt": "Once upon a time", **fields}
    mine, vllms = ours.post(path, json=body), theirs.post(path, json=body)
    assert mine.status_code == vllms.status_code == 400, (mine.text, vllms.text)
    assert mine.json()["error"]["message"] == vllms.json()["error"]["message"]


def test_streamed_text_with_the_controls_equals_the_plain_answer(servers):
    ours, _ = servers
    body = chat(min_tokens=4, logit_bias={str(WORDS[2]): 3}, include_stop_str_in_output=True)
    plain = answer(ours, CHAT, body)
    with ours.stream("POST", CHAT, json={**body, "stream": True}) as response:
        events = [json.loads(line.removeprefix("data: ")) for line in response.iter_lines()
                  if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == plain["text"]
