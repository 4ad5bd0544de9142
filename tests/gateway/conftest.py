"""Real servers on loopback ports for the gateway tests: a scripted LanguageModel (standing in for llm_svc),
the gateway itself under uvicorn, a plain HTTP server that hosts images; and, for the end-to-end modules, the
real stages and vLLM's own OpenAI server."""

import asyncio
import contextlib
import dataclasses
import http.server
import io
import json
import threading
import time

import httpx
import openai
import pytest
import uvicorn
from PIL import Image

import tests.stack as real_stages
from deploy.local import Stage, free_port
from deploy.trace_collector import TraceCollector
from gateway.app import create_app
from gateway.config import GatewayConfig
from protos import errors, llm_pb2, llm_pb2_grpc
from protos.call_stream import ServesCallStreams
from protos.server import GrpcServer

MODEL = "tiny-internvl"
REPLY = ["Hello", " from", " the", " fake", "."]
MAX_REQUEST_BYTES = 6 << 20  # what the fake reports as the largest Generate request it takes


class FakeLanguageModel(ServesCallStreams, llm_pb2_grpc.LanguageModelServicer):
    """Records every GenerateRequest; the first text part picks a behaviour:
    'error:<STATUS>' fails with that status, 'slow' streams a token every 50 ms for 10 s,
    'sleep' waits 2 s before its first token, 'crash' fails after its second token; anything else streams REPLY."""

    MODEL = MODEL
    REPLY = REPLY

    def __init__(self):
        self.requests: list[llm_pb2.GenerateRequest] = []
        self.cancelled = asyncio.Event()
        self.cancellations = 0  # Generate calls cancelled mid-stream

    async def GetModelInfo(self, request, context):
        return llm_pb2.GetModelInfoResponse(model=MODEL, max_model_len=4096, hidden_size=64,
                                            max_images_per_request=8, vocab_size=1000,
                                            max_request_bytes=MAX_REQUEST_BYTES)

    async def Generate(self, request, context):
        self.requests.append(request)
        command = first_text(request)
        if command.startswith("error:"):
            status = command.removeprefix("error:")
            if status == "VISION_UNAVAILABLE":  # as llm_svc passes on a vision stage that is down
                raise errors.Unavailable("scripted vision_svc down",
                                         metadata=((errors.FAILED_STAGE_KEY, "vision_svc"),))
            cls = {"RESOURCE_EXHAUSTED": errors.Overloaded, "UNAVAILABLE": errors.Unavailable,
                   "INTERNAL": errors.InternalError, "INVALID_ARGUMENT": errors.InvalidInput}[status]
            raise cls(f"scripted {status}")
        if request.sampling.max_tokens > 1000:
            raise errors.InvalidInput(f"max_tokens={request.sampling.max_tokens} exceeds the context length")
        if command == "sleep":
            await asyncio.sleep(2)
        try:
            tokens = ["x"] * 200 if command == "slow" else REPLY
            for i, token in enumerate(tokens):
                if command == "slow":
                    await asyncio.sleep(0.05)
                if command == "crash" and i == 2:
                    raise RuntimeError("engine crashed")
                last = i == len(tokens) - 1
                yield llm_pb2.GenerateResponse(
                    request_id=request.request_id, text=token, token_ids=[100 + i],
                    logprobs=logprobs(token, i, request.sampling),
                    finish_reason=llm_pb2.FINISH_REASON_STOP if last else llm_pb2.FINISH_REASON_UNSPECIFIED,
                    usage=llm_pb2.Usage(prompt_tokens=11, completion_tokens=len(tokens), cached_tokens=4)
                    if last else None,
                    choice_usage=llm_pb2.Usage(prompt_tokens=11, completion_tokens=i + 1)
                    if request.continuous_usage else None)
        except asyncio.CancelledError:
            self.cancellations += 1
            self.cancelled.set()
            raise


def first_text(request: llm_pb2.GenerateRequest) -> str:
    if request.WhichOneof("input") == "prompt":
        return request.prompt
    return next((p.text for m in request.chat.messages for p in m.content if p.HasField("text")), "")


def logprobs(token: str, i: int, sampling: llm_pb2.SamplingParams) -> list[llm_pb2.TokenLogprob]:
    if not sampling.HasField("logprobs"):
        return []
    top = [llm_pb2.TopLogprob(token_id=100 + i, token=token, logprob=-0.5),
           llm_pb2.TopLogprob(token_id=7, token="?", logprob=-2.0)][:sampling.logprobs]
    return [llm_pb2.TokenLogprob(token_id=100 + i, token=token, logprob=-0.5, top=top)]


@dataclasses.dataclass
class FakeBackend:
    servicer: FakeLanguageModel
    target: str


@contextlib.asynccontextmanager
async def serving(servicer: llm_pb2_grpc.LanguageModelServicer, host: str = "127.0.0.1"):
    """`servicer` as a LanguageModel on a free port of `host`; yields its HOST:PORT."""
    server = GrpcServer(host, 0, max_message_bytes=64 << 20, grace_s=0.5, announce_s=0)
    server.add_service(llm_pb2_grpc.add_LanguageModelServicer_to_server, servicer, "internvl.llm.v1.LanguageModel")
    port = await server.start()
    await server.set_serving()
    try:
        yield f"{host}:{port}"
    finally:
        await server.drain()


@pytest.fixture(scope="module")
async def backend():
    servicer = FakeLanguageModel()
    async with serving(servicer) as target:
        yield FakeBackend(servicer, target)


@pytest.fixture
def fake(backend) -> FakeLanguageModel:
    backend.servicer.requests.clear()
    backend.servicer.cancelled.clear()
    backend.servicer.cancellations = 0
    return backend.servicer


@contextlib.asynccontextmanager
async def running_gateway(config: GatewayConfig):
    """The gateway served by uvicorn on a loopback port in this event loop; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=0, log_level="warning",
                                           lifespan="on", timeout_graceful_shutdown=1))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "gateway did not start"
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def gateway_config(*targets: str, **overrides) -> GatewayConfig:
    return GatewayConfig(llm_targets=targets, **overrides)


@pytest.fixture(scope="module")
async def gateway_url(backend):
    async with running_gateway(gateway_config(backend.target, allow_private_image_urls=True)) as url:
        yield url


def png_bytes(size=(8, 6), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


class _ImageHandler(http.server.BaseHTTPRequestHandler):
    images = {"/red.png": png_bytes(), "/blue.png": png_bytes(color=(0, 0, 255)),
              "/big.png": b"\x89PNG" + bytes(3 << 20)}

    def do_GET(self):
        if self.path.startswith("/away?to="):
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/away?to="))
            self.end_headers()
            return
        if self.path.startswith("/redirect/"):
            # /redirect/N/<path>: N more redirects before <path>.
            _, _, hops, rest = self.path.split("/", 3)
            target = f"/redirect/{int(hops) - 1}/{rest}" if int(hops) > 1 else f"/{rest}"
            self.send_response(302)
            self.send_header("Location", target)
            self.end_headers()
            return
        if self.path.startswith("/slow.png"):  # /slow.png?seconds=S: S seconds (1.5 by default) to answer
            time.sleep(float(self.path.partition("?seconds=")[2] or 1.5))
            self.path = "/red.png"
        body = self.images.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    """Base URL of a threaded HTTP server on 127.0.0.1 serving _ImageHandler.images."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", _ImageHandler.images
    server.shutdown()
    server.server_close()



@pytest.fixture
def start_gateway(backend):
    """Starts another gateway: `async with start_gateway(*targets, **config_overrides) as url`."""
    return lambda *targets, **overrides: running_gateway(gateway_config(*(targets or [backend.target]), **overrides))


@pytest.fixture
def png():
    return png_bytes


# ---- the real stages, shared by the end-to-end modules of this package (starting engines is the slow part) --

API_KEY = "test-key"
# vLLM's tool-call flags, on both servers: they change nothing for a request without tools, and InternVL3.5 (Qwen3)
# writes hermes-style <tool_call> blocks.
TOOL_FLAGS = ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]


@pytest.fixture(scope="package")
def stack(tiny_checkpoint, tmp_path_factory):
    """The three stages, traced: each exports its spans over OTLP to a receiver in this process (`traces`), so every
    end-to-end test here runs the traced path. vision_svc and the gateway are turned on by the flag, llm_svc by
    OTEL_EXPORTER_OTLP_ENDPOINT alone (then vLLM is given the endpoint too, and its own span of a request joins)."""
    model = tiny_checkpoint(layout="original", llm="dense")
    logs = tmp_path_factory.mktemp("logs")
    traces = TraceCollector()
    endpoint = traces.start()
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # spans leave within 0.1 s, not the default 5 s
        vision_metrics = free_port()
        vision = real_stages.start_vision(model, logs, "--metrics-port", str(vision_metrics),
                                          "--otlp-traces-endpoint", endpoint)
        llm_metrics = free_port()
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://{endpoint}")
        # Started with vision_svc, not after it: llm_svc waits for vision_svc by itself.
        llm = real_stages.start_llm(model, [vision], logs, "--served-model-name", MODEL, "--metrics-port",
                                    str(llm_metrics), *TOOL_FLAGS)
        env.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
        vision.wait_ready()
        llm.wait_ready()
        gateway = real_stages.start_gateway([llm], logs, "--api-key", API_KEY, "--allow-private-image-urls",
                                            "--otlp-traces-endpoint", endpoint).wait_ready()
    yield {"vision": vision, "llm": llm, "gateway": gateway, "llm_metrics": llm_metrics,
           "vision_metrics": vision_metrics, "traces": traces}
    real_stages.stop_all([gateway, llm, vision])
    traces.stop()


@pytest.fixture(scope="package")
def client(stack):
    return openai.OpenAI(base_url=f"http://{stack['gateway'].address}/v1", api_key=API_KEY, max_retries=0)


def vllm_server_stage(model, log_dir, *extra: str) -> Stage:
    """vLLM's own OpenAI server, started; `.wait_ready()` it."""
    port = free_port()
    argv = ["vllm.entrypoints.openai.api_server", "--model", str(model), "--port", str(port), "--host", "127.0.0.1",
            "--served-model-name", MODEL, "--trust-remote-code", "--enforce-eager", "--dtype", "float32",
            "--max-model-len", "8192", "--kv-cache-memory-bytes", str(256 << 20), "--limit-mm-per-prompt",
            '{"image": 3}', *extra]
    return Stage("vllm-openai-server", argv, port, log_dir / "vllm.log",
                 env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}, http_health=True)


@pytest.fixture(scope="package")
def vllm_server_process(tiny_checkpoint, tmp_path_factory):
    """vLLM's own OpenAI server, monolithic (it encodes the images itself), same checkpoint and dtype; started, not
    waited for. `servers` asks for it before `stack`, so that the two start together: starting is the slow part."""
    server = vllm_server_stage(tiny_checkpoint(layout="original", llm="dense"), tmp_path_factory.mktemp("vllm"),
                               *TOOL_FLAGS)
    yield server
    server.stop()


@pytest.fixture(scope="package")
def vllm_server(vllm_server_process):
    """A client of vLLM's own OpenAI server (`vllm_server_process`), once it is ready."""
    server = vllm_server_process.wait_ready()
    return openai.OpenAI(base_url=f"http://{server.address}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="package")
def servers(vllm_server_process, stack, vllm_server):
    """(ours, vLLM's): plain HTTP clients, so that vLLM's own fields go as they are."""
    with httpx.Client(base_url=f"http://{stack['gateway'].address}", timeout=120,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as ours, \
            httpx.Client(base_url=str(vllm_server.base_url).removesuffix("/v1/"), timeout=120) as theirs:
        yield ours, theirs


def streamed_chat(client: httpx.Client, body: dict) -> tuple[list[dict], dict]:
    """A streamed chat's chunks (choice 0's) and its usage (asked for)."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return [c for chunk in chunks for c in chunk["choices"]], chunks[-1]["usage"]


def assembled(choices: list[dict], usage: dict) -> dict:
    """What a client assembles from a streamed chat answer. Only this compares with vLLM's server: the two group the
    same tokens into chunks differently (vLLM's output collector merges the deltas a busy server has not sent yet)."""
    deltas = [c["delta"] for c in choices]
    calls: dict[int, dict] = {}
    for delta in deltas:
        for piece in delta.get("tool_calls", []):
            call = calls.setdefault(piece["index"], {"ids": 0, "name": "", "arguments": ""})
            call["ids"] += "id" in piece
            for key in ("name", "arguments"):
                call[key] += (piece.get("function") or {}).get(key) or ""
    return {"content": "".join(d.get("content") or "" for d in deltas),
            "reasoning": "".join(d.get("reasoning") or "" for d in deltas),
            "tool_calls": [calls[i] for i in sorted(calls)],
            # The rest of the delta that starts a tool call (vLLM's parser sets "content": null there).
            "call_starts": [{k: v for k, v in d.items() if k != "tool_calls"} for d in deltas
                            if any("id" in piece for piece in d.get("tool_calls", []))],
            "finish_reason": [c["finish_reason"] for c in choices if c["finish_reason"]],
            # vLLM's server leaves prompt_tokens_details out of a stream's usage (no --enable-prompt-tokens-details).
            # Its streamed reasoning_tokens are what its parser counted chunk by chunk, so they vary with the chunking
            # too (by a token or two from run to run): only their presence compares.
            "usage": {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
            "reasoning_tokens_reported": "completion_tokens_details" in usage}
