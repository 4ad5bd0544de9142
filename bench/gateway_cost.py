"""The gateway's own CPU per request and per token, against the least a Python streaming front costs.

    python -m bench.gateway_cost                        # ~3 minutes
    python -m bench.gateway_cost --tokens 1 128 --rounds 4

The gateway serves streamed chat completions from a synthetic language service (a gRPC server with llm_svc's
GenerateStream, in a process of its own) that gives every call a token per step (every 6 ms, as an engine decoding a
batch would), so that what is measured is the gateway alone: no engine, no tokenizer. Beside it, the floor: a bare
Starlette app under the same uvicorn and uvloop that reads the same body and streams as many SSE events of the same
size at the same steps from a `StreamingResponse`, with no parsing, no gRPC, no metrics, no logs. Both get the same
requests from the same client, in alternating turns (`--rounds`). The CPU time (user + system, psutil) of each
server's process per request is printed for each output length, and from two lengths the fit per request + per
token: what a request and what a token cost the gateway, and how much of it any front in Python pays.
"""

import argparse
import asyncio
import collections
import contextlib
import os
import statistics
import sys
import time

import psutil

from bench.common import markdown_table, ratio
from bench.e2e import chat_body, run_load, stop
from deploy.local import Stage, free_port, gateway_stage
from gateway.llm_client import LANGUAGE_SERVICE

STEP_S = 0.006
MODEL = "synthetic"
TOKEN_TEXT = " word"
GATEWAY, FLOOR = "gateway", "bare Starlette stream"


class Steps:
    """Every STEP_S the waiting streams each get their next token, as from one engine step."""

    def __init__(self):
        self._tick = asyncio.Event()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(STEP_S)
            self._tick.set()
            self._tick = asyncio.Event()

    async def next(self) -> None:
        await self._tick.wait()


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

        async def Generate(self, request, context):
            tokens = request.sampling.max_tokens
            for i in range(tokens):
                await steps.next()
                last = i == tokens - 1
                yield llm_pb2.GenerateResponse(
                    request_id=request.request_id, text=TOKEN_TEXT, token_ids=[100 + i],
                    finish_reason=llm_pb2.FINISH_REASON_LENGTH if last else llm_pb2.FINISH_REASON_UNSPECIFIED,
                    usage=llm_pb2.Usage(prompt_tokens=8, completion_tokens=tokens) if last else None)

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


def start_servers(logs: str) -> list[Stage]:
    """The synthetic language service, the gateway in front of it and the floor, each ready (or all stopped)."""
    stages: list[Stage] = []
    try:
        llm_port = free_port()
        stages.append(Stage("synthetic llm", ["bench.gateway_cost", "--serve", "synthetic-llm", "--port",
                                              str(llm_port)], llm_port, f"{logs}/synthetic-llm.log").wait_ready())
        stages.append(gateway_stage(stages[:1], "127.0.0.1", free_port(), [], f"{logs}/gateway.log").wait_ready())
        floor_port = free_port()
        stages.append(Stage(FLOOR, ["bench.gateway_cost", "--serve", "floor", "--port", str(floor_port)], floor_port,
                            f"{logs}/floor.log", http_health=True).wait_ready())
        return stages
    except BaseException:
        stop(stages)
        raise


def cpu_ms_per_request(server: Stage, tokens: int, requests: int, concurrency: int) -> float:
    process = psutil.Process(server.proc.pid)
    before = process.cpu_times()
    body = chat_body(MODEL, "Say something.", None, tokens)
    timings, _ = asyncio.run(run_load(f"http://{server.address}", [body] * requests, concurrency))
    after = process.cpu_times()
    if any(t.output_tokens != tokens for t in timings):
        raise RuntimeError(f"{server.name}: a stream did not bring its {tokens} tokens")
    return 1e3 * (after.user + after.system - before.user - before.system) / requests


def fit(short: tuple[int, float], long: tuple[int, float]) -> tuple[float, float]:
    """Per request (ms) and per token (us) from the CPU per request at two output lengths."""
    (n1, ms1), (n2, ms2) = short, long
    per_token_ms = (ms2 - ms1) / (n2 - n1)
    return ms1 - n1 * per_token_ms, 1e3 * per_token_ms


def tables(results: dict[int, dict[str, list[float]]]) -> str:
    rows = []
    for tokens, by_server in results.items():
        means = {server: statistics.mean(runs) for server, runs in by_server.items()}
        for server, runs in by_server.items():
            rows.append([tokens, server, means[server], ", ".join(f"{run:.3f}" for run in runs)])
        rows.append([tokens, "**gateway / floor**", ratio(means[GATEWAY], means[FLOOR]), ""])
    out = markdown_table(["tokens out", "server", "CPU ms / request", "by round"], rows)
    lengths = sorted(results)
    if len(lengths) >= 2:
        fitted = {server: fit(*((n, statistics.mean(results[n][server])) for n in (lengths[0], lengths[-1])))
                  for server in (GATEWAY, FLOOR)}
        out += "\n\n" + markdown_table(
            ["server", "CPU ms / request", "CPU us / token"],
            [[server, per_request, per_token] for server, (per_request, per_token) in fitted.items()] +
            [["**gateway / floor**", ratio(fitted[GATEWAY][0], fitted[FLOOR][0]),
              ratio(fitted[GATEWAY][1], fitted[FLOOR][1])]])
    return out


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128],
                        help="output lengths to measure; the first and last give the fit (default: 1 128)")
    parser.add_argument("--concurrency", type=int, default=64, help="streams in flight (default: 64)")
    parser.add_argument("--requests", type=int, default=1024, help="requests per server and round (default: 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each server gets per length (default: 3)")
    parser.add_argument("--logs", default="/tmp/internvl-dvd-bench/gateway-cost",
                        help="directory for the servers' logs")
    parser.add_argument("--serve", choices=["synthetic-llm", "floor"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is None and (min(args.tokens) < 1 or args.rounds < 1 or args.requests < args.concurrency):
        parser.error("--tokens and --rounds must be at least 1, --requests at least --concurrency")
    return args


def main() -> None:
    args = parse_args()
    if args.serve is not None:
        serve(args.serve, args.port)
        return
    os.makedirs(args.logs, exist_ok=True)
    started = time.perf_counter()
    stages = start_servers(args.logs)
    servers = {GATEWAY: stages[1], FLOOR: stages[2]}
    results: dict[int, dict[str, list[float]]] = collections.defaultdict(lambda: {GATEWAY: [], FLOOR: []})
    try:
        for server in (servers[GATEWAY], servers[FLOOR]):  # warm-up
            cpu_ms_per_request(server, 2, args.concurrency * 2, args.concurrency)
        for tokens in args.tokens:
            for round_ in range(args.rounds):
                order = (GATEWAY, FLOOR) if round_ % 2 == 0 else (FLOOR, GATEWAY)
                for name in order:
                    results[tokens][name].append(
                        cpu_ms_per_request(servers[name], tokens, args.requests, args.concurrency))
            print(f"{tokens} tokens done, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    finally:
        stop(stages)
    print(f"\n{args.concurrency} streamed chats in flight, {args.requests} per server and round, a token every "
          f"{STEP_S * 1e3:.0f} ms; CPU of each server's process\n")
    print(tables(dict(results)))
    print(f"\n{time.perf_counter() - started:.0f} s in all, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
