"""Thinking end to end: llm_svc and vLLM's own OpenAI server both started with --reasoning-parser qwen3 (InternVL3.5
is Qwen3-based) give the same split of the same greedy answer into `reasoning` and `content`, whole and as a streaming
client assembles it, with the same reasoning token count. A random model never closes its thinking: its whole answer
is reasoning, and a structured-output constraint, which vLLM applies to the answer after the thinking, leaves that
reasoning as it is.

These servers are this module's own (a reasoning parser changes every chat answer); the vision stage is the package's.
"""

import httpx
import pytest

import tests.stack as real_stages
from tests.gateway.conftest import MODEL, assembled, streamed_chat, vllm_server_stage
from tests.readme_examples import run_against_gateway

CHAT = "/v1/chat/completions"
REASONING_FLAGS = ["--reasoning-parser", "qwen3"]
ASK = [{"role": "user", "content": "Is 91 a prime number?"}]


@pytest.fixture(scope="module")
def thinking_servers(stack, tiny_checkpoint, tmp_path_factory):
    """(ours, vLLM's) HTTP clients, both servers with the reasoning parser; and our gateway's address."""
    model = tiny_checkpoint(layout="original", llm="dense")
    logs = tmp_path_factory.mktemp("thinking")
    # Both engines start together: starting is the slow part.
    llm = real_stages.start_llm(model, [stack["vision"]], logs, "--served-model-name", MODEL, *REASONING_FLAGS)
    vllm = vllm_server_stage(model, logs, *REASONING_FLAGS)
    llm.wait_ready()
    gateway = real_stages.start_gateway([llm], logs).wait_ready()
    vllm.wait_ready()
    with httpx.Client(base_url=f"http://{gateway.address}", timeout=120) as ours, \
            httpx.Client(base_url=f"http://{vllm.address}", timeout=120) as theirs:
        yield ours, theirs, gateway.address
    real_stages.stop_all([vllm, gateway, llm])


def chat(**fields) -> dict:
    return {"model": MODEL, "temperature": 0, "max_tokens": 24, "messages": ASK, **fields}


def answer(client: httpx.Client, body: dict) -> dict:
    response = client.post(CHAT, json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    choice = data["choices"][0]
    usage = data["usage"]
    return {"content": choice["message"]["content"], "reasoning": choice["message"]["reasoning"],
            "finish_reason": choice["finish_reason"], "completion_tokens": usage["completion_tokens"],
            "reasoning_tokens": usage["completion_tokens_details"]["reasoning_tokens"]}


CASES = {
    "thinking": {},
    "enable_thinking false": {"chat_template_kwargs": {"enable_thinking": False}},
    "thinking, constrained": {"structured_outputs": {"choice": ["yes", "no"]}},
}


@pytest.mark.parametrize("name", CASES)
def test_the_reasoning_split_equals_vllm_s(thinking_servers, name):
    ours, theirs, _ = thinking_servers
    mine = answer(ours, chat(**CASES[name]))
    assert mine == answer(theirs, chat(**CASES[name]))
    if name == "thinking":
        assert mine["reasoning"] and mine["content"] is None and mine["reasoning_tokens"] == mine["completion_tokens"]
    if name == "thinking, constrained":  # the constraint waits for the thinking's end, which never comes
        assert mine["content"] is None and mine["reasoning"] == answer(ours, chat())["reasoning"]


@pytest.mark.parametrize("name", CASES)
def test_the_streamed_split_equals_vllm_s(thinking_servers, name):
    ours, theirs, _ = thinking_servers
    mine = assembled(*streamed_chat(ours, chat(**CASES[name])))
    assert mine == assembled(*streamed_chat(theirs, chat(**CASES[name])))
    if name == "thinking":
        assert mine["reasoning"] == answer(ours, chat())["reasoning"] and not mine["content"]
        assert mine["reasoning_tokens_reported"]
    if name == "thinking, constrained":
        assert not mine["content"] and mine["reasoning"] == answer(ours, chat())["reasoning"]


def test_the_readme_thinking_example_prints_the_reasoning(thinking_servers, tmp_path):
    result = run_against_gateway("thinking", thinking_servers[2], tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("reasoning: ") and len(result.stdout.split("reasoning: ", 1)[1]) > 20, result.stdout
