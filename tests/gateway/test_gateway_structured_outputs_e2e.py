"""Structured output end to end: with random weights, constrained decoding is the proof that the constraint is
applied. Each constrained answer satisfies its constraint (it parses, matches, is one of the choices) and equals
vLLM's own OpenAI server's answer to the same greedy request, streamed and not; a bad schema, regex or grammar is
a 400 with vLLM's message, from both.

The stack and vLLM's server are the package's (tests/gateway/conftest.py), shared with the other e2e modules.
"""

import base64
import json
import re

import httpx
import pytest

from tests.gateway.conftest import API_KEY, MODEL
from tests.llm_svc.llm_helpers import image, png_bytes
from tests.readme_examples import run_against_gateway

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
STORY = [{"role": "user", "content": "Tell me a story."}]
# Enums and booleans only: a random model would write an integer or a string until max_tokens.
SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]},
                                           "ok": {"type": "boolean"}},
          "required": ["answer", "ok"], "additionalProperties": False}
REGEX = "[a-z]{3,6}-[0-9]{2}"
CHOICES = ["red", "green", "blue"]
STRUCTURAL_TAG = {"type": "structural_tag", "format": {"type": "const_string", "value": "Hello there"}}


def satisfies_schema(text: str) -> bool:
    value = json.loads(text)
    return set(value) == {"answer", "ok"} and value["answer"] in ("yes", "no") and isinstance(value["ok"], bool)


# name -> (the request's constraint fields, what its answer must satisfy)
CONSTRAINTS = {
    "response_format json_schema": ({"response_format": {"type": "json_schema",
                                                         "json_schema": {"name": "verdict", "schema": SCHEMA}}},
                                    satisfies_schema),
    "structured_outputs json": ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
                                satisfies_schema),
    "regex": ({"structured_outputs": {"regex": REGEX}}, lambda text: re.fullmatch(REGEX, text)),
    "choice": ({"structured_outputs": {"choice": CHOICES}}, lambda text: text in CHOICES),
    "grammar": ({"structured_outputs": {"grammar": 'root ::= "yes" | "no"'}}, lambda text: text in ("yes", "no")),
    "structural_tag": ({"structured_outputs": {"structural_tag": json.dumps(STRUCTURAL_TAG)}},
                       lambda text: text == "Hello there"),
    "response_format structural_tag": ({"response_format": STRUCTURAL_TAG}, lambda text: text == "Hello there"),
    # Any JSON object: a random model's object does not close within max_tokens, so only its start is checked.
    "json_object": ({"response_format": {"type": "json_object"}}, lambda text: text.startswith("{")),
}


def chat(**fields) -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": 48, "messages": STORY, **fields}


def answer(client: httpx.Client, path: str, body: dict) -> dict:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    choice = data["choices"][0]
    text = choice["message"]["content"] if path == CHAT else choice["text"]
    return {"text": text, "finish_reason": choice["finish_reason"],
            "completion_tokens": data["usage"]["completion_tokens"]}


def streamed_text(client: httpx.Client, path: str, body: dict) -> str:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    choices = [c for e in events[:-1] for c in json.loads(e)["choices"]]
    return "".join((c["delta"].get("content") or "") if path == CHAT else c["text"] for c in choices)


@pytest.mark.parametrize("name", CONSTRAINTS)
def test_the_constrained_answer_satisfies_the_constraint_and_equals_vllm_s(servers, name):
    fields, satisfied = CONSTRAINTS[name]
    ours, theirs = servers
    mine = answer(ours, CHAT, chat(**fields))
    assert mine == answer(theirs, CHAT, chat(**fields))
    assert satisfied(mine["text"]), mine
    if name != "json_object":
        assert mine["finish_reason"] == "stop"


@pytest.mark.parametrize("name", ["response_format json_schema", "regex", "choice"])
def test_the_streamed_constrained_answer_equals_vllm_s(servers, name):
    fields, satisfied = CONSTRAINTS[name]
    ours, theirs = servers
    mine = streamed_text(ours, CHAT, chat(**fields))
    assert mine == streamed_text(theirs, CHAT, chat(**fields)) == answer(ours, CHAT, chat(**fields))["text"]
    assert satisfied(mine)


def test_an_image_chat_takes_the_constraint_too(servers):
    # An image request is checked against the engine before its image is encoded: the constraint goes through
    # vLLM's checks twice, and must come out the same.
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image(300, 200, seed=3))).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe it."}]}]
    body = {**chat(structured_outputs={"regex": REGEX}), "messages": messages}
    ours, theirs = servers
    mine = answer(ours, CHAT, body)
    assert mine == answer(theirs, CHAT, body)
    assert re.fullmatch(REGEX, mine["text"])
    bad = {**body, "structured_outputs": {"regex": "(("}}
    assert ours.post(CHAT, json=bad).json()["error"]["message"] == theirs.post(CHAT, json=bad).json()["error"]["message"]


def test_completions_take_the_constraint_too(servers):
    body = {"model": MODEL, "temperature": 0, "max_tokens": 96, "prompt": "Once upon a time",
            "response_format": {"type": "json_schema", "json_schema": {"name": "verdict", "schema": SCHEMA}}}
    ours, theirs = servers
    mine = answer(ours, COMPLETIONS, body)
    assert mine == answer(theirs, COMPLETIONS, body)
    assert satisfies_schema(mine["text"])
    assert streamed_text(ours, COMPLETIONS, body) == streamed_text(theirs, COMPLETIONS, body) == mine["text"]


@pytest.mark.parametrize("fields", [
    {"structured_outputs": {"json": {"type": "nope"}}},
    {"structured_outputs": {"regex": "(("}},
    {"structured_outputs": {"grammar": "root ::= (("}},
    {"structured_outputs": {"choice": []}},
    {"structured_outputs": {}},
    {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
    {"structured_outputs": {"regex": "a", "choice": ["a"]}},
    {"structured_outputs": {"structural_tag": "{}"}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "empty"}}},
], ids=["bad schema", "bad regex", "bad grammar", "empty choice", "no constraint", "two constraints",
        "json, regex and choice", "bad structural tag", "json_schema without a schema"])
def test_a_bad_constraint_is_a_400_with_vllm_s_message(servers, fields):
    ours, theirs = servers
    mine, vllms = ours.post(CHAT, json=chat(**fields)), theirs.post(CHAT, json=chat(**fields))
    assert (mine.status_code, vllms.status_code) == (400, 400), mine.text
    # The same text; where the gateway refuses the body itself, after the name of the field it is about.
    assert mine.json()["error"]["message"].endswith(vllms.json()["error"]["message"])
    streamed = ours.post(CHAT, json=chat(**fields, stream=True))
    assert streamed.status_code == 400 and streamed.json()["error"] == mine.json()["error"]


def test_the_readme_example_answers_in_its_schema(stack, tmp_path):
    result = run_against_gateway("structured-output", stack["gateway"].address, tmp_path, api_key=API_KEY)
    assert result.returncode == 0, result.stderr
    printed = result.stdout.strip()
    assert printed.startswith("{'answer': ") and printed.endswith("}"), printed


def test_logprobs_of_tokens_the_constraint_masks_are_vllm_s_floor(servers):
    """The constraint masks the logits before the log-probabilities are taken: the alternatives it rules out are
    -inf, which JSON cannot carry, and come back as vLLM's -9999.0, streamed and not."""
    body = chat(structured_outputs={"choice": CHOICES}, logprobs=True, top_logprobs=5)
    ours, theirs = servers
    mine, vllms = (client.post(CHAT, json=body) for client in (ours, theirs))
    assert mine.status_code == 200, mine.text
    logprobs = mine.json()["choices"][0]["logprobs"]["content"]
    assert logprobs == vllms.json()["choices"][0]["logprobs"]["content"]
    assert any(top["logprob"] == -9999.0 for token in logprobs for top in token["top_logprobs"])
    with ours.stream("POST", CHAT, json={**body, "stream": True}) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    choices = [c for e in events[:-1] for c in json.loads(e)["choices"]]
    assert [t for c in choices for t in (c["logprobs"] or {}).get("content", [])] == logprobs
