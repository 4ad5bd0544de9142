"""llm_svc's own CPU per request and per token, against a bare GenerateStream server.

    python -m bench.llm_svc_cost                        # ~3 minutes
    python -m bench.llm_svc_cost --tokens 1 128 --rounds 4
    python -m bench.llm_svc_cost --compare-with ../before  # a worktree of another commit, in the same turns

llm_svc's servicer and `LanguageService`, as they serve (in `protos.server.GrpcServer`, on GenerateStream), in front
of a synthetic engine that gives every request a token per step (every 6 ms, as an engine decoding a batch would):
vLLM's `RequestOutput`s, built once per output length, so that what is measured is the project's code around the
engine: the request's parse, sampling parameters, admission, the delta's way out and the stream's messages. The
prompt is a chat of one text message, rendered by joining its texts (vLLM's chat template and tokenizer are vLLM's
work, the same in vLLM's own server, and left out). Beside it, the floor: a servicer whose Generate gives the same
number of messages of the same text, one per step, on the same GenerateStream and gRPC server, with no parsing, no
engine, no metrics, no logs. Both get the same requests from the same client (a `CallStream`, as the gateway's, in
this process), in alternating turns (`--rounds`). The CPU time (user + system, psutil) of each server's process per
request is printed for each output length, and from two lengths the fit per request + per token. `--compare-with`
serves a third: llm_svc as another checkout has it (with this one's bench client and Python), so that a change to
llm_svc is measured against the commit before it, in the same turns.
"""

import asyncio
import os

from bench.cost_in_turns import (TOKEN_TEXT, Steps, check_checkout, commit_of, compare_with_argument,
                                 measure_in_turns, parse_args, synthetic_generate)
from bench.e2e import stop
from deploy.local import Stage, free_port

PROMPT_TOKEN_IDS = list(range(1, 33))
LLM_SVC, FLOOR = "llm_svc", "bare GenerateStream"


class SyntheticEngine:
    """vLLM's AsyncLLM as LanguageService uses it: a request's outputs (DELTA), one per step of `steps`."""

    def __init__(self, steps: Steps):
        self._steps = steps
        self._outputs: dict[int, list] = {}  # by output length

    def _outputs_of(self, tokens: int) -> list:
        if tokens not in self._outputs:  # once per length: what it costs is not llm_svc's
            from vllm.outputs import CompletionOutput, RequestOutput
            self._outputs[tokens] = [RequestOutput(
                "synthetic", None, PROMPT_TOKEN_IDS, None,
                [CompletionOutput(0, TOKEN_TEXT, [100 + i], None, None,
                                  finish_reason="length" if i == tokens - 1 else None)],
                finished=i == tokens - 1, num_cached_tokens=0) for i in range(tokens)]
        return self._outputs[tokens]

    async def generate(self, engine_input, sampling, request_id, **kwargs):
        for output in self._outputs_of(sampling.max_tokens):
            await self._steps.next()
            yield output

    async def abort(self, request_id):
        pass


class TextRenderer:
    """PromptRenderer's interface without vLLM's template and tokenizer."""

    def render(self, messages, options=None) -> str:
        return "\n".join(part for message in messages for part in message.parts if isinstance(part, str))

    async def engine_input(self, prompt, tok_params=None) -> dict:
        return {"type": "token", "prompt_token_ids": PROMPT_TOKEN_IDS, "prompt": prompt.get("prompt")}

    def decode(self, token_ids) -> str:
        return TOKEN_TEXT * len(token_ids)


def servicers(steps: Steps) -> dict:
    """Each server's LanguageModel servicer."""
    from llm_svc.limits import ModelDimensions, RequestLimits
    from llm_svc.service import LanguageService
    from llm_svc.servicer import LanguageModelServicer
    from protos import llm_pb2, llm_pb2_grpc
    from protos.call_stream import ServesCallStreams

    info = llm_pb2.GetModelInfoResponse(model="synthetic", max_model_len=1 << 16, hidden_size=64, vocab_size=1000,
                                        max_images_per_request=8, max_request_bytes=64 << 20)
    limits = RequestLimits(max_images_per_request=8, max_request_bytes=64 << 20, max_image_bytes_per_request=64 << 20,
                           max_embedding_bytes=1 << 20, vision_timeout_s=60, max_requests_in_flight=4096,
                           max_bytes_in_flight=1 << 30)
    dims = ModelDimensions(hidden_size=64, tokens_per_tile=256, max_model_len=info.max_model_len)
    service = LanguageService(SyntheticEngine(steps), None, TextRenderer(), None, dims, limits)

    class Bare(ServesCallStreams, llm_pb2_grpc.LanguageModelServicer):
        Generate = synthetic_generate(steps, prompt_tokens=len(PROMPT_TOKEN_IDS))

    return {LLM_SVC: LanguageModelServicer(service, info), FLOOR: Bare()}


async def serve(which: str, port: int) -> None:
    """One server, as llm_svc runs its gRPC server (interceptors, health, reflection), until SIGTERM."""
    from protos import llm_pb2, llm_pb2_grpc
    from protos.heap import freeze_startup_heap
    from protos.logs import configure_logging
    from protos.server import GrpcServer, wait_for_shutdown_signal

    configure_logging()  # llm_svc logs a line per request: part of its cost
    steps = Steps()
    server = GrpcServer("127.0.0.1", port, 64 << 20, grace_s=1.0, announce_s=0.0)
    server.add_service(llm_pb2_grpc.add_LanguageModelServicer_to_server, servicers(steps)[which],
                       llm_pb2.DESCRIPTOR.services_by_name["LanguageModel"].full_name)
    await server.start()
    freeze_startup_heap()  # as llm_svc does once up
    await server.set_serving()
    stepping = asyncio.create_task(steps.run())
    await wait_for_shutdown_signal()
    stepping.cancel()
    await server.drain()


async def run_calls(address: str, tokens: int, requests: int, concurrency: int) -> None:
    """`requests` streamed chats over one GenerateStream, `concurrency` at a time, each read to its end."""
    import grpc

    from protos import llm_pb2, llm_pb2_grpc
    from protos.call_stream import CallStream

    chat = llm_pb2.Chat(messages=[llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER,
                                                      content=[llm_pb2.ContentPart(text="Say something.")])])
    sampling = llm_pb2.SamplingParams(max_tokens=tokens, temperature=0)
    left = iter(range(requests))
    async with grpc.aio.insecure_channel(address) as channel:
        calls = CallStream(llm_pb2_grpc.LanguageModelStub(channel), address)

        async def one_at_a_time() -> None:
            for n in left:
                request = llm_pb2.GenerateRequest(request_id=f"bench-{n}", chat=chat, sampling=sampling)
                call = await calls.start(request, 60.0, None)
                received = []
                while (message := await call.read()) is not grpc.aio.EOF:
                    received.extend(message.token_ids)
                if len(received) != tokens:
                    raise RuntimeError(f"a call brought {len(received)} tokens, not {tokens}")

        try:
            await asyncio.gather(*(one_at_a_time() for _ in range(concurrency)))
        finally:
            await calls.close()


def stream_chats(server: Stage, tokens: int, requests: int, concurrency: int) -> None:
    asyncio.run(run_calls(server.address, tokens, requests, concurrency))


def start_servers(logs: str, compare_with: str | None) -> dict[str, Stage]:
    """llm_svc, another checkout's if asked, and the floor (last), each ready (or all stopped)."""
    wanted = [(LLM_SVC, LLM_SVC, None), (FLOOR, FLOOR, None)]
    if compare_with is not None:
        wanted.insert(1, (f"{LLM_SVC} at {commit_of(compare_with)}", LLM_SVC, compare_with))
    stages: dict[str, Stage] = {}
    try:
        for i, (name, serves, checkout) in enumerate(wanted):
            port = free_port()
            stages[name] = Stage(name, ["bench.llm_svc_cost", "--serve", serves, "--port", str(port)], port,
                                 f"{logs}/server-{i}.log", cwd=checkout).wait_ready()
        return stages
    except BaseException:
        stop(list(stages.values()))
        raise


def main() -> None:
    args = parse_args("llm_svc_cost", __doc__, [LLM_SVC, FLOOR], compare_with_argument("llm_svc"))
    if args.serve is not None:
        asyncio.run(serve(args.serve, args.port))
        return
    check_checkout(args.compare_with, "bench/llm_svc_cost.py")
    os.makedirs(args.logs, exist_ok=True)
    servers = start_servers(args.logs, args.compare_with)
    measure_in_turns(args, servers, list(servers.values()), stream_chats,
                     "streamed chats in flight on one GenerateStream")


if __name__ == "__main__":
    main()
