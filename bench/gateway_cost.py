"""The gateway's own CPU per request and per token, against the least a Python streaming front costs.

    python -m bench.gateway_cost                        # ~3 minutes
    python -m bench.gateway_cost --tokens 1 128 --rounds 4
    python -m bench.gateway_cost --compare-with ../before  # a worktree of another commit, in the same turns

The gateway serves streamed chat completions from a synthetic language service (a gRPC server with llm_svc's
GenerateStream, in a process of its own) that gives every call a token per step (every 6 ms, as an engine decoding a
batch would), so that what is measured is the gateway alone: no engine, no tokenizer. Beside it, the floor: a bare
Starlette app under the same uvicorn and uvloop that reads the same body and streams as many SSE events of the same
size at the same steps from a `StreamingResponse`, with no parsing, no gRPC, no metrics, no logs. Both get the same
requests from the same client, in alternating turns (`--rounds`). The CPU time (user + system, psutil) of each
server's process per request is printed for each output length, and from two lengths the fit per request + per
token: what a request and what a token cost the gateway, and how much of it any front in Python pays.
`--compare-with` serves a third: the gateway as another checkout has it, in front of that checkout's synthetic
language service (the two ends of GenerateStream as that commit has them), in the same turns.
"""

import asyncio
import contextlib
import os

from bench.cost_in_turns import (TOKEN_TEXT, Steps, check_checkout, commit_of, compare_with_argument,
                                 measure_in_turns, parse_args, synthetic_generate)
from bench.e2e import chat_body, run_load, stop
from deploy.local import Stage, free_port
from gateway.llm_client import LANGUAGE_SERVICE

MODEL = "synthetic"
GATEWAY, FLOOR = "gateway", "bare Starlette stream"


async def serve_synthetic_llm(port: int) -> None:
    """A language service answering every Generate with `max_tokens` tokens of TOKEN_TEXT, one per step."""
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    from protos import llm_pb2, llm_pb2_grpc
    from protos.call_stream import ServesCallStreams

    steps = Steps()

    class Synthetic(ServesCallStreams, llm_pb2_grpc.LanguageModelServicer):
        async def GetModelInfo(self, request, context):
            return llm_pb2.GetModelInfoResponse(model=MODEL, max_model_len=1 << 16, hidden_size=64, vocab_size=1000,
                                                max_images_per_request=8, max_request_bytes=64 << 20)

        Generate = synthetic_generate(steps, prompt_tokens=8)

    server = grpc.aio.server()
    llm_pb2_grpc.add_LanguageModelServicer_to_server(Synthetic(), server)
    checks = health.aio.HealthServicer()
    for service in ("", LANGUAGE_SERVICE):  # the gateway's health asks for the service by name
        await checks.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stepping = asyncio.create_task(steps.run())
    try:
        await server.wait_for_termination()
    finally:
        stepping.cancel()


def floor_app():
    """The bare streaming endpoint: the body read, `max_tokens` SSE events of a chat chunk's size, one per step."""
    import json

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    steps = Steps()
    chunk = {"id": "chatcmpl-0123456789abcdef0123456789abcdef", "object": "chat.completion.chunk", "created": 0,
             "model": MODEL, "choices": [{"index": 0, "delta": {"content": TOKEN_TEXT}, "logprobs": None,
                                          "finish_reason": None}]}
    event = b"data: " + json.dumps(chunk).encode() + b"\n\n"

    async def chat(request):
        tokens = json.loads(await request.body())["max_tokens"]
        usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": tokens,
                                                   "total_tokens": 8 + tokens}}

        async def events():
            for _ in range(tokens):
                await steps.next()
                yield event
            yield b"data: " + json.dumps(usage).encode() + b"\n\n"
            yield b"data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    async def health(request):
        return JSONResponse({"status": "ok"})

    @contextlib.asynccontextmanager
    async def stepping(app):
        task = asyncio.create_task(steps.run())
        yield
        task.cancel()

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)],
                     lifespan=stepping)


def serve(which: str, port: int) -> None:
    if which == "synthetic-llm":
        asyncio.run(serve_synthetic_llm(port))
    else:
        import uvicorn  # as the gateway runs it: uvloop and httptools
        uvicorn.run(floor_app(), host="127.0.0.1", port=port, loop="uvloop", log_config=None)


def start_servers(logs: str, compare_with: str | None) -> dict[str, Stage]:
    """The gateway (and another checkout's, if asked) in front of a synthetic language service of its own checkout,
    and the floor, by name; each ready (or all stopped)."""
    checkouts = [(GATEWAY, None)]
    if compare_with is not None:
        checkouts.append((f"{GATEWAY} at {commit_of(compare_with)}", compare_with))
    stages: dict[str, Stage] = {}
    try:
        for i, (name, checkout) in enumerate(checkouts):
            llm_port, port = free_port(), free_port()
            llm = Stage(f"synthetic llm {i}", ["bench.gateway_cost", "--serve", "synthetic-llm", "--port",
                                               str(llm_port)], llm_port, f"{logs}/synthetic-llm-{i}.log", cwd=checkout)
            stages[llm.name] = llm.wait_ready()
            stages[name] = Stage(name, ["gateway", "--llm", llm.address, "--host", "127.0.0.1", "--port", str(port)],
                                 port, f"{logs}/gateway-{i}.log", http_health=True, cwd=checkout).wait_ready()
        floor_port = free_port()
        stages[FLOOR] = Stage(FLOOR, ["bench.gateway_cost", "--serve", "floor", "--port", str(floor_port)],
                              floor_port, f"{logs}/floor.log", http_health=True).wait_ready()
        return stages
    except BaseException:
        stop(list(stages.values()))
        raise


def stream_chats(server: Stage, tokens: int, requests: int, concurrency: int) -> None:
    body = chat_body(MODEL, "Say something.", None, tokens)
    timings, _ = asyncio.run(run_load(f"http://{server.address}", [body] * requests, concurrency))
    if any(t.output_tokens != tokens for t in timings):
        raise RuntimeError(f"{server.name}: a stream did not bring its {tokens} tokens")


def main() -> None:
    args = parse_args("gateway_cost", __doc__, ["synthetic-llm", "floor"], compare_with_argument("the gateway"))
    if args.serve is not None:
        serve(args.serve, args.port)
        return
    check_checkout(args.compare_with, "bench/gateway_cost.py")
    os.makedirs(args.logs, exist_ok=True)
    stages = start_servers(args.logs, args.compare_with)
    measured = {name: stage for name, stage in stages.items() if not name.startswith("synthetic llm")}
    measure_in_turns(args, measured, list(stages.values()), stream_chats, "streamed chats in flight")


if __name__ == "__main__":
    main()
