"""Tool calls end to end, against vLLM's own OpenAI server with the same flags (--enable-auto-tool-choice
--tool-call-parser hermes, on the package's stack and server): the same greedy answer, whole and as a streaming client
assembles it, tool calls, content, finish reason and token counts alike.

vLLM 0.32 forces tool_choice required and a named function with the hermes parser's structural tag: the
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` envelope always, the arguments' schema only for a tool marked
`strict` (else any JSON, which a random model fills with anything). So with random weights, the strict tools here are
the proof that the call is forced; an auto call is forced with a regex that writes the hermes block, which vLLM's hermes
parser then reads.
"""

import json
import re

import httpx
import pytest

from tests.gateway.conftest import API_KEY, MODEL, assembled, streamed_chat
from tests.readme_examples import run_against_gateway

CHAT = "/v1/chat/completions"
# Enums only: a random model would write a free string until max_tokens.
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]},
                                                    "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
STRICT = [{"type": "function", "function": {**tool["function"], "strict": True}} for tool in (WEATHER, TIME)]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def chat(**fields) -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": 120, "messages": ASK, "tools": [WEATHER, TIME], **fields}


def follows_its_schema(call: dict) -> bool:
    arguments = json.loads(call["function"]["arguments"])
    if call["function"]["name"] == "get_weather":
        return set(arguments) == {"city", "unit"} and arguments["city"] in ("Paris", "Tokyo") \
            and arguments["unit"] in ("C", "F")
    return call["function"]["name"] == "get_time" and arguments == {"zone": "UTC"}


def without_ids(value):
    """Tool call ids are random on both servers: each is replaced by a mark, so that only their places compare."""
    if isinstance(value, dict):
        return {k: "<tool call id>" if k == "id" and str(v).startswith("chatcmpl-tool-") else without_ids(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [without_ids(v) for v in value]
    return value


def answer(client: httpx.Client, body: dict) -> dict:
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    choice = data["choices"][0]
    message = choice["message"]
    return without_ids({"content": message["content"], "reasoning": message.get("reasoning"),
                        "tool_calls": message.get("tool_calls", []), "finish_reason": choice["finish_reason"],
                        "usage": {k: data["usage"][k] for k in ("prompt_tokens", "completion_tokens")}})


CASES = {
    # A random model keeps calling until max_tokens: this one ends just after its second call (found by trying).
    "required": {"tools": STRICT, "tool_choice": "required", "max_tokens": 165},
    "named": {"tools": STRICT, "tool_choice": NAMED},
    "required, one call": {"tools": STRICT, "tool_choice": "required", "parallel_tool_calls": False},
    # Not strict: the envelope is forced, the arguments are whatever JSON the model writes (the same on both).
    "named, arguments not strict": {"tool_choice": NAMED},
    "auto, the model answers in text": {"tool_choice": "auto", "max_tokens": 24},
    "auto, a hermes block": {"structured_outputs": {"regex": re.escape(HERMES_CALL)}},
}
# The cases whose answer is a call to a strict tool, arguments in their schema.
FORCED = ("required", "named", "required, one call")


@pytest.mark.parametrize("name", CASES)
def test_the_answer_equals_vllm_s(servers, name):
    ours, theirs = servers
    mine = answer(ours, chat(**CASES[name]))
    assert mine == answer(theirs, chat(**CASES[name]))
    if name in FORCED:
        assert mine["tool_calls"] and all(follows_its_schema(call) for call in mine["tool_calls"]), mine
        assert mine["content"] == ""
    if name.startswith("named"):
        assert [c["function"]["name"] for c in mine["tool_calls"]] == ["get_weather"]
        assert mine["finish_reason"] == "stop"
    if name == "required":
        assert len(mine["tool_calls"]) == 2 and mine["finish_reason"] == "length"
    if name == "required, one call":
        assert len(mine["tool_calls"]) == 1 and mine["finish_reason"] == "tool_calls"
    if name == "auto, the model answers in text":
        assert mine["content"] and not mine["tool_calls"] and mine["finish_reason"] == "length"
    if name == "auto, a hermes block":
        assert mine["tool_calls"] == [{"id": "<tool call id>", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]
        assert mine["finish_reason"] == "tool_calls" and not mine["content"]


@pytest.mark.parametrize("name", CASES)
def test_the_streamed_answer_equals_vllm_s(servers, name):
    ours, theirs = servers
    mine = assembled(*streamed_chat(ours, chat(**CASES[name])))
    assert mine == assembled(*streamed_chat(theirs, chat(**CASES[name])))
    # The same calls as the whole answer's (whose arguments vLLM's parser re-dumps: the same JSON, other whitespace).
    whole = answer(ours, chat(**CASES[name]))
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"]] \
        == [(c["name"], json.loads(c["arguments"])) for c in mine["tool_calls"]]
    assert all(call["ids"] == 1 for call in mine["tool_calls"])
    if mine["tool_calls"]:  # each call starts with a null content, as vLLM's parser sets it
        assert mine["call_starts"] and all(start == {"content": None} for start in mine["call_starts"]), mine


def test_a_history_with_tool_calls_and_results_renders_as_vllm_s(servers):
    history = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "call-1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
               {"role": "tool", "tool_call_id": "call-1", "content": "18 degrees and sunny"}]
    ours, theirs = servers
    body = chat(messages=history, max_tokens=24)
    assert answer(ours, body) == answer(theirs, body)
    tokenized = [client.post("/tokenize", json={"model": MODEL, "messages": history}).json()["tokens"]
                 for client in (ours, theirs)]
    assert tokenized[0] == tokenized[1]


@pytest.mark.parametrize("fields", [
    {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
    {"tools": None, "tool_choice": "required"},
    {"tools": []},
    {"tool_choice": "sometimes"},
    {"tool_choice": {"type": "function", "function": {}}},
    {"tool_choice": {"type": "function", "function": {"name": "get_weather"}},
     "structured_outputs": {"regex": "a+"}},
], ids=["unknown function", "no tools", "empty tools", "bad choice", "no function name", "tools and a constraint"])
def test_a_bad_tool_request_is_a_400_with_vllm_s_message(servers, fields):
    ours, theirs = servers
    body = {k: v for k, v in chat(**fields).items() if v is not None}
    mine, vllms = ours.post(CHAT, json=body), theirs.post(CHAT, json=body)
    assert (mine.status_code, vllms.status_code) == (400, 400), mine.text
    assert vllms.json()["error"]["message"].startswith(mine.json()["error"]["message"]) or \
        mine.json()["error"]["message"].endswith(vllms.json()["error"]["message"]), (mine.text, vllms.text)


def test_the_readme_tools_example_calls_the_function(stack, tmp_path):
    result = run_against_gateway("tools", stack["gateway"].address, tmp_path, api_key=API_KEY)
    assert result.returncode == 0, result.stderr
    # A strict function: the arguments are a JSON object in its schema, not whatever JSON the model writes.
    assert result.stdout.strip() in ('get_weather {"city": "Paris"}', 'get_weather {"city": "Tokyo"}'), result.stdout
