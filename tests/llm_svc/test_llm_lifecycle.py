"""llm_svc's lifecycle and its answers to hostile input, against real stages (the destructive tests run last)."""

import concurrent.futures
import hashlib
import io
import os
import pathlib
import subprocess
import sys
import threading
import time

import grpc
import psutil
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from protos import llm_pb2
from protos.errors import RETRY_AFTER_KEY
from tests.llm_svc.llm_helpers import LlmClient, chat, greedy, image, metric, png_bytes
from tests.readme_examples import readme_example
from tests.stack import free_port, start_llm, start_vision, stop_all

ROOT = pathlib.Path(__file__).resolve().parents[2]

LONG = llm_pb2.SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
MiB = 1 << 20
# Room for 4 requests, or for 3 holding a 5 MiB image; at least what one request may hold (8 MiB of message, and
# embeddings of 3 images within the 4096-token context: 4 MiB in fp32).
SMALL_WORK_LIMIT = ["--max-message-bytes", str(8 * MiB), "--max-embedding-bytes", str(4 * MiB),
                    "--max-requests-in-flight", "4", "--max-bytes-in-flight", str(16 * MiB)]


@pytest.fixture(scope="module")
def doomed_stages(tiny_checkpoint, tmp_path_factory):
    """(vision_svc, llm_svc) of their own, for the test that kills the engine; started, not waited for. `stack` asks
    for them first, so that they start along with it: starting runs mostly on one CPU."""
    model = tiny_checkpoint(layout="original", llm="dense")
    logs = tmp_path_factory.mktemp("doomed")
    vision = start_vision(model, logs)
    llm = start_llm(model, [vision], logs)  # it waits for vision_svc by itself
    yield vision, llm
    stop_all([llm, vision])


@pytest.fixture(scope="module")
def stack(doomed_stages, tiny_checkpoint, tmp_path_factory):
    model = tiny_checkpoint(layout="original", llm="dense")
    logs = tmp_path_factory.mktemp("logs")
    # The first replica holds work for 1.5 s before encoding, so a test can kill it mid-request.
    visions = [start_vision(model, logs, "--batch-wait-ms", "1500"), start_vision(model, logs)]
    for v in visions:
        v.wait_ready()
    metrics_port = free_port()
    llm = start_llm(model, visions, logs, "--metrics-port", str(metrics_port), "--max-images-per-request", "3",
                    "--max-model-len", "4096", *SMALL_WORK_LIMIT).wait_ready()
    client = LlmClient(llm.address)
    yield llm, visions, client, metrics_port
    client.close()
    stop_all([llm, *visions])


def engine_requests(metrics_port: int) -> float:
    return (metric(metrics_port, "vllm:num_requests_running") + metric(metrics_port, "vllm:num_requests_waiting")
            + metric(metrics_port, "llm_svc_running_requests"))


def wait_until_idle(metrics_port: int, timeout_s: float = 10) -> float:
    deadline = time.monotonic() + timeout_s
    while (left := engine_requests(metrics_port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def assert_still_serving(llm, client):
    with grpc.insecure_channel(llm.address) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert len(client.tokens(llm_pb2.GenerateRequest(prompt="hello", sampling=greedy(3)))) == 3


def test_model_info(stack):
    _, _, client, _ = stack
    info = client.stub.GetModelInfo(llm_pb2.GetModelInfoRequest())
    assert info.max_model_len == 4096 and info.max_images_per_request == 3 and info.hidden_size > 0
    assert info.max_request_bytes == 8 * MiB  # the lower of llm_svc's limit and vision_svc's default (64 MiB)


def test_usage_and_timings_come_with_the_last_message(stack):
    _, _, client, _ = stack
    responses = client.generate(llm_pb2.GenerateRequest(chat=chat(("user", [image(300, 300, 5), "Hi"])),
                                                        sampling=greedy(5)))
    last = responses[-1]
    assert last.finish_reason == llm_pb2.FINISH_REASON_LENGTH and last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens > 256 and last.timings.vision_s > 0
    assert 0 < last.timings.first_token_s <= last.timings.total_s
    assert all(r.finish_reason == llm_pb2.FINISH_REASON_UNSPECIFIED for r in responses[:-1])


def test_cancel_mid_stream_aborts_the_engine_request(stack):
    _, _, client, metrics_port = stack
    call = client.stub.Generate(llm_pb2.GenerateRequest(request_id="to-cancel", prompt="story", sampling=LONG))
    for _ in range(3):
        next(call)
    assert engine_requests(metrics_port) > 0
    call.cancel()
    assert wait_until_idle(metrics_port) == 0


def test_deadline_aborts_the_engine_request(stack):
    _, _, client, metrics_port = stack
    with pytest.raises(grpc.RpcError) as error:
        client.generate(llm_pb2.GenerateRequest(prompt="story", sampling=LONG), timeout=1.0)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until_idle(metrics_port) == 0


def test_abort_rpc_ends_the_stream_with_abort(stack):
    _, _, client, metrics_port = stack
    call = client.stub.Generate(llm_pb2.GenerateRequest(request_id="to-abort", prompt="story", sampling=LONG))
    next(call)
    assert client.stub.Abort(llm_pb2.AbortRequest(request_id="to-abort")).aborted
    assert [r for r in call][-1].finish_reason == llm_pb2.FINISH_REASON_ABORT
    assert not client.stub.Abort(llm_pb2.AbortRequest(request_id="to-abort")).aborted
    assert wait_until_idle(metrics_port) == 0


def noise_png(side: int, seed: int) -> bytes:
    """Incompressible pixels: the PNG is about side^2 * 3 bytes."""
    pixels = torch.randint(0, 256, (side, side, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def answer(client: LlmClient, request: llm_pb2.GenerateRequest) -> tuple[grpc.StatusCode, tuple, int]:
    """Status code, trailing metadata and tokens of one call."""
    try:
        return grpc.StatusCode.OK, (), len(client.tokens(request))
    except grpc.RpcError as error:
        return error.code(), tuple(error.trailing_metadata() or ()), 0


def test_a_flood_of_large_requests_gets_answers_or_retry_hints_and_everything_held_returns(stack):
    llm, _, client, metrics_port = stack
    image_parts = [llm_pb2.ContentPart(image=llm_pb2.ImagePart(data=noise_png(1340, seed))) for seed in range(12)]
    assert all(len(part.image.data) > 5 * MiB for part in image_parts)
    large = [llm_pb2.GenerateRequest(max_tiles=1, sampling=greedy(3), chat=llm_pb2.Chat(messages=[llm_pb2.ChatMessage(
        role=llm_pb2.ROLE_USER, content=[part, llm_pb2.ContentPart(text="What is it?")])])) for part in image_parts]
    text = [llm_pb2.GenerateRequest(prompt="story", sampling=llm_pb2.SamplingParams(
        temperature=0, max_tokens=30, ignore_eos=True)) for _ in range(12)]
    with concurrent.futures.ThreadPoolExecutor(len(large) + len(text)) as pool:
        answers = list(pool.map(lambda request: answer(client, request), [*large, *text]))
    codes = [code for code, _, _ in answers]
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
    assert all(tokens > 0 for code, _, tokens in answers if code == grpc.StatusCode.OK)
    assert all((RETRY_AFTER_KEY, "1") in metadata for code, metadata, _ in answers if code != grpc.StatusCode.OK)
    assert wait_until_idle(metrics_port) == 0
    assert metric(metrics_port, "llm_svc_admitted_requests") == 0 and metric(metrics_port, "llm_svc_held_bytes") == 0
    assert_still_serving(llm, client)
    assert answer(client, large[0])[0] == grpc.StatusCode.OK


def image_part_by_hash(content_hash: str) -> llm_pb2.ContentPart:
    return llm_pb2.ContentPart(image=llm_pb2.ImagePart(content_hash=content_hash))


HOSTILE = {
    "unknown image hash": (llm_pb2.GenerateRequest(chat=llm_pb2.Chat(messages=[llm_pb2.ChatMessage(
        role=llm_pb2.ROLE_USER, content=[image_part_by_hash("ab" * 32)])]), sampling=greedy(3)),
        grpc.StatusCode.INVALID_ARGUMENT, "send their bytes"),
    "too many images": (llm_pb2.GenerateRequest(chat=chat(("user", [image(50, 50, i) for i in range(4)])),
                                                sampling=greedy(3)), grpc.StatusCode.INVALID_ARGUMENT, "limit is 3"),
    "prompt longer than the context": (llm_pb2.GenerateRequest(prompt="word " * 6000, sampling=greedy(3)),
                                       grpc.StatusCode.INVALID_ARGUMENT, "4096"),
    "max_tokens over the context": (llm_pb2.GenerateRequest(prompt="hi", sampling=greedy(5000)),
                                    grpc.StatusCode.INVALID_ARGUMENT, "[1, 4096]"),
    "temperature": (llm_pb2.GenerateRequest(prompt="hi", sampling=llm_pb2.SamplingParams(temperature=7)),
                    grpc.StatusCode.INVALID_ARGUMENT, "[0, 2]"),
    "top_p": (llm_pb2.GenerateRequest(prompt="hi", sampling=llm_pb2.SamplingParams(top_p=0)),
              grpc.StatusCode.INVALID_ARGUMENT, "(0, 1]"),
    "n over its limit": (llm_pb2.GenerateRequest(prompt="hi", sampling=llm_pb2.SamplingParams(n=129)),
                         grpc.StatusCode.INVALID_ARGUMENT, "must be in [1, 128]"),
    "too many logprobs": (llm_pb2.GenerateRequest(prompt="hi", sampling=llm_pb2.SamplingParams(logprobs=50)),
                          grpc.StatusCode.INVALID_ARGUMENT, "at most 20"),
    "corrupt image": (llm_pb2.GenerateRequest(chat=llm_pb2.Chat(messages=[llm_pb2.ChatMessage(
        role=llm_pb2.ROLE_USER, content=[llm_pb2.ContentPart(image=llm_pb2.ImagePart(data=b"\x89PNG junk"))])]),
        sampling=greedy(3)), grpc.StatusCode.INVALID_ARGUMENT, "image 0"),
    "image in an assistant message": (llm_pb2.GenerateRequest(chat=chat(("assistant", [image(50, 50, 1)])),
                                                              sampling=greedy(3)),
                                      grpc.StatusCode.INVALID_ARGUMENT, "user messages only"),
    "no input": (llm_pb2.GenerateRequest(sampling=greedy(3)), grpc.StatusCode.INVALID_ARGUMENT, "neither"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_input_gets_a_clear_error_and_the_engine_stays_healthy(stack, case):
    llm, _, client, _ = stack
    request, code, message = HOSTILE[case]
    with pytest.raises(grpc.RpcError) as error:
        client.generate(request)
    assert error.value.code() == code
    assert message in error.value.details()
    assert_still_serving(llm, client)


def test_readme_grpc_example_runs(stack, tmp_path):
    llm, _, _, _ = stack
    code = readme_example("grpc-client")
    (tmp_path / "example.py").write_text(code)
    (tmp_path / "photo.png").write_bytes(png_bytes(image(640, 480, seed=8)))
    result = subprocess.run([sys.executable, str(tmp_path / "example.py"), llm.address, str(tmp_path / "photo.png")],
                            capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "FINISH_REASON_LENGTH: " in result.stdout and " 32 completion tokens" in result.stdout


def test_request_completes_on_the_other_replica_when_its_vision_replica_dies_mid_request(stack):
    llm, visions, client, _ = stack
    # A picture whose content hash routes it to the first (slow) replica.
    picture = next(p for p in (image(400, 300, seed) for seed in range(100, 200))
                   if int(hashlib.sha256(png_bytes(p)).hexdigest()[:8], 16) % 2 == 0)
    request = llm_pb2.GenerateRequest(chat=chat(("user", [picture, "What is it?"])), sampling=greedy(6))
    result = {}
    worker = threading.Thread(target=lambda: result.setdefault("tokens", client.tokens(request)))
    worker.start()
    time.sleep(0.7)  # the request now waits in the first replica's batch
    visions[0].kill()
    worker.join(60)
    assert len(result["tokens"]) == 6
    assert client.tokens(request) == result["tokens"]  # same answer from the surviving replica
    assert_still_serving(llm, client)


def test_vision_stage_down_is_unavailable_and_text_still_works(stack):
    llm, visions, client, _ = stack
    visions[1].kill()
    with pytest.raises(grpc.RpcError) as error:
        client.generate(llm_pb2.GenerateRequest(chat=chat(("user", [image(60, 60, 3), "Hi"])), sampling=greedy(3)))
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "vision_svc" in error.value.details()
    assert ("failed-stage", "vision_svc") in tuple(error.value.trailing_metadata())
    assert len(client.tokens(llm_pb2.GenerateRequest(prompt="hello", sampling=greedy(3)))) == 3


def test_sigterm_lets_the_in_flight_stream_finish(stack):
    llm, _, client, _ = stack
    call = client.stub.Generate(llm_pb2.GenerateRequest(prompt="story", sampling=llm_pb2.SamplingParams(
        temperature=0, max_tokens=60, ignore_eos=True)))
    first = next(call)
    llm.proc.terminate()
    rest = list(call)
    assert sum(len(r.token_ids) for r in [first, *rest]) == 60
    assert rest[-1].finish_reason == llm_pb2.FINISH_REASON_LENGTH
    assert llm.proc.wait(30) == 0


@pytest.fixture
def doomed_llm(doomed_stages):
    vision, llm = doomed_stages
    vision.wait_ready()
    llm.wait_ready()
    client = LlmClient(llm.address)
    yield llm, client
    client.close()


def test_engine_death_fails_the_stream_with_unavailable_and_turns_health_not_serving(doomed_llm):
    llm, client = doomed_llm
    call = client.stub.Generate(llm_pb2.GenerateRequest(prompt="story", sampling=LONG))
    next(call)
    for child in psutil.Process(llm.proc.pid).children(recursive=True):
        child.kill()
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    deadline = time.monotonic() + 10
    with grpc.insecure_channel(llm.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health still SERVING with a dead engine"
            time.sleep(0.2)
