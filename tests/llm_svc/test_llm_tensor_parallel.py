"""The language stage over two CPU ranks: llm_svc at `--tensor-parallel-size 2` on the tiny MoE checkpoint gives
the greedy tokens of one rank, and of vLLM's own OpenAI server at tensor parallel size 2 fed the raw image.
Expert parallelism, which vLLM's CPU MoE kernel cannot run, is refused at start."""

import base64
import os
import subprocess
import sys

import httpx
import pytest

from deploy.local import Stage, free_port
from protos import llm_pb2
from tests.llm_svc.llm_helpers import LlmClient, chat, greedy, image, png_bytes
from tests.stack import start_llm, start_vision, stop_all

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two ranks need two CPUs")

MAX_TOKENS = 6
SERVED = "tiny-internvl-moe"
PICTURE = image(900, 500, seed=1)
CASES = {
    "text": [("user", ["Tell me a story."])],
    "image": [("user", [PICTURE, "Describe the image."])],
}


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint(layout="original", llm="moe")


@pytest.fixture(scope="module")
def stages(model, pipelines, tmp_path_factory):
    """(llm_svc at one rank, llm_svc at two, vLLM's own server at two). Starting is the slow part: the two-rank ones
    start at once (llm_svc waits for vision_svc by itself), and the one-rank llm_svc is the package's pipeline on
    this checkpoint, which test_llm_parity leaves running."""
    logs = tmp_path_factory.mktemp("logs")
    vision = start_vision(model, logs)
    started = [vision]
    try:
        port = free_port()
        theirs = Stage("vllm-openai-server", [
            "vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port), "--host", "127.0.0.1",
            "--served-model-name", SERVED, "--trust-remote-code", "--enforce-eager", "--dtype", "float32",
            "--max-model-len", "8192", "--kv-cache-memory-bytes", str(256 << 20), "--limit-mm-per-prompt",
            '{"image": 1}', "--tensor-parallel-size", "2"], port, logs / "vllm.log",
            env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"}, http_health=True)
        started.append(theirs)
        two = start_llm(model, [vision], logs, "--tensor-parallel-size", "2")
        started.append(two)
        one = pipelines("original", "moe").llm
        for stage in started:
            stage.wait_ready()
        yield one, two, theirs
    finally:
        stop_all(list(reversed(started)))


def ours(stage: Stage, messages) -> tuple[list[int], int]:
    """(greedy token ids, prompt tokens)."""
    client = LlmClient(stage.address)
    try:
        responses = client.generate(llm_pb2.GenerateRequest(chat=chat(*messages), sampling=greedy(MAX_TOKENS)))
    finally:
        client.close()
    return [t for r in responses for t in r.token_ids], responses[-1].usage.prompt_tokens


def vllms(stage: Stage, messages) -> tuple[list[int], int]:
    """The same from vLLM's own chat API, images as data: URLs."""
    def part(p) -> dict:
        if isinstance(p, str):
            return {"type": "text", "text": p}
        url = "data:image/png;base64," + base64.b64encode(png_bytes(p)).decode()
        return {"type": "image_url", "image_url": {"url": url}}

    body = {"model": SERVED, "temperature": 0, "max_tokens": MAX_TOKENS, "return_token_ids": True,
            "messages": [{"role": role, "content": [part(p) for p in parts]} for role, parts in messages]}
    response = httpx.post(f"http://{stage.address}/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
    answer = response.json()
    return answer["choices"][0]["token_ids"], answer["usage"]["prompt_tokens"]


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_give_the_tokens_of_one_and_of_vllm_own_server(stages, case):
    one, two, theirs = stages
    messages = CASES[case]
    tokens, prompt_tokens = ours(two, messages)
    assert len(tokens) == MAX_TOKENS
    assert (tokens, prompt_tokens) == ours(one, messages)
    assert (tokens, prompt_tokens) == vllms(theirs, messages)


def test_two_ranks_bind_their_threads_to_a_cpu_each(stages):
    _, two, _ = stages
    assert "OpenMP threads of 2 ranks bound to CPUs 0|1" in two.log_path.read_text()


def test_expert_parallel_is_refused_at_start(model):
    """vLLM's CPU MoE kernel would kill a worker on the first token (SIGSEGV); llm_svc exits before starting it.
    The other refused layouts: test_llm_cpu_defaults."""
    result = subprocess.run([sys.executable, "-m", "llm_svc", "--model", str(model), "--vision", "127.0.0.1:1",
                             "--tensor-parallel-size", "2", "--enable-expert-parallel"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "llm_svc: cannot start: --enable-expert-parallel over 2 ranks does not run on a CPU" in result.stderr
    assert "Traceback" not in result.stderr
