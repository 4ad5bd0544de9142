"""A client that stops reading: what a streamed answer costs the front meanwhile, this stack against vLLM's server.

    python -m bench.slow_reader                 # ~3 minutes
    python -m bench.slow_reader --stall-s 20 --output-len 6000

Each system gets the same streamed chat completion (a random prompt, --output-len tokens with ignore_eos, greedy,
each token with its --top-logprobs), read by a client with a small receive buffer that takes the response's first
event, reads nothing for --stall-s seconds (a phone in a tunnel, a consumer busy elsewhere), then reads the rest.
Once the socket's and the server's write buffers are full the server must hold what the engine makes: vLLM's server
lets the engine merge the request's tokens meanwhile (its output collector), so the answer comes in fewer, larger
events and nothing is done per token for it; the gateway pauses the call on its GenerateStream for the same effect
(`protos/call_stream.py`). Reported per request: the answer's tokens and the events they came in, and the fronts'
CPU time (psutil; the gateway and llm_svc, or vLLM's API server, without the engine) and context switches per second
of the stall; a line says so if the systems' texts differ (they must not: nothing may be lost).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import socket
import time
from collections.abc import Callable

from bench.common import markdown_table
from bench.e2e import chat_body, model_and_work_dir, random_texts, stop
from bench.front_cost import SYSTEMS, VLLM, split_cpu, tree_cpu
from deploy.local import Stage


@dataclasses.dataclass(frozen=True)
class StreamedAnswer:
    text: str
    events: int  # SSE events that carried text
    completion_tokens: int
    token_bytes: list[bytes]  # each token's bytes, in order, where logprobs were asked for


def parse_sse(body: bytes) -> StreamedAnswer:
    """The text, text-carrying events and usage of a streamed chat completion's body (with include_usage)."""
    texts, tokens, token_bytes = [], 0, []
    for line in body.split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        for choice in chunk.get("choices") or ():
            if content := choice["delta"].get("content"):
                texts.append(content)
            token_bytes += [bytes(entry["bytes"]) for entry in (choice.get("logprobs") or {}).get("content") or ()]
    return StreamedAnswer("".join(texts), len(texts), tokens, token_bytes)


def stalled_read(address: str, body: dict, stall: Callable[[], None], headers: dict[str, str] | None = None,
                 receive_buffer: int = 4096) -> StreamedAnswer:
    """POSTs a streamed chat completion over HTTP/1.0 (no chunked encoding: the body ends with the connection),
    reads up to its first event, calls `stall` without reading, then reads the rest."""
    host, port = address.rsplit(":", 1)
    payload = json.dumps(body).encode()
    head = "".join(f"{key}: {value}\r\n" for key, value in {
        "Host": address, "Content-Type": "application/json", "Content-Length": str(len(payload)),
        **(headers or {})}.items())
    with socket.socket() as sock:
        sock.settimeout(300)  # a server that sends nothing for this long fails the read
        # Before connecting, so the window it offers stays small: else the kernel takes megabytes for the reader.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect((host, int(port)))
        sock.sendall(f"POST /v1/chat/completions HTTP/1.0\r\n{head}\r\n".encode() + payload)
        data = b""
        while b"\r\n\r\n" not in data or b"data: " not in data.split(b"\r\n\r\n", 1)[1]:
            if not (received := sock.recv(1024)):
                break
            data += received
        status = data.split(b"\r\n", 1)[0]
        if b" 200 " not in status:
            raise RuntimeError(f"{address}: {data[:500]!r}")
        stall()
        while received := sock.recv(1 << 16):
            data += received
    return parse_sse(data.split(b"\r\n\r\n", 1)[1])


@dataclasses.dataclass(frozen=True)
class Stalled:
    answer: StreamedAnswer
    stall_s: float
    front_cpu_s: float  # the fronts' processes but the engine's, during the stall
    switches: int  # the fronts' threads' context switches during the stall


def measure(stages: list[Stage], front: dict[str, int], body: dict, stall_s: float) -> Stalled:
    roots = {label: stages[index].proc.pid for label, index in front.items()}
    readings = []

    def stall() -> None:
        readings.append(({label: tree_cpu(pid) for label, pid in roots.items()}, time.perf_counter()))
        time.sleep(stall_s)
        readings.append(({label: tree_cpu(pid) for label, pid in roots.items()}, time.perf_counter()))

    answer = stalled_read(stages[-1].address, body, stall)
    (before, started), (after, ended) = readings
    spent = [split_cpu(pid, before[label], after[label]) for label, pid in roots.items()]
    return Stalled(answer, ended - started, sum(s.main + s.helpers for s in spent), sum(s.switches for s in spent))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.slow_reader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="checkpoint directory (default: build the tiny checkpoint, original layout)")
    parser.add_argument("--work-dir", default=None, help="where the tiny checkpoint and the logs go")
    parser.add_argument("--stall-s", type=float, default=10.0, help="how long the client reads nothing")
    parser.add_argument("--output-len", type=int, default=4000,
                        help="tokens of the answer (ignore_eos): enough that the engine outlasts the stall")
    parser.add_argument("--input-len", type=int, default=64, help="random text tokens of the prompt")
    parser.add_argument("--top-logprobs", type=int, default=20,
                        help="top logprobs of each token (0: none): ~2 KB events at 20, which fill the ~3 MB of "
                             "socket buffers that a stalled reader gets on Linux in seconds rather than minutes")
    parser.add_argument("--rounds", type=int, default=2, help="requests per system, the systems in turns")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of both engines")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=["DvD (gateway)", VLLM],
                        help="which to measure (the third: this stack with a Generate call per request)")
    args = parser.parse_args()
    args.concurrency = [1]  # for bench.e2e's engine flags
    return args


def main() -> None:
    args = parse_args()
    model_dir, directory = model_and_work_dir(args)
    servers: dict[str, list[Stage]] = {}
    rows = []
    try:
        for system in args.systems:
            servers[system] = SYSTEMS[system][0](args, model_dir, directory / "logs")
        texts = random_texts(model_dir, args.rounds, args.input_len, seed=11)
        for n, text in enumerate(texts):
            body = chat_body(model_dir.name, text, None, args.output_len)
            if args.top_logprobs:
                body.update(logprobs=True, top_logprobs=args.top_logprobs)
            answers = {}
            for system in args.systems if n % 2 == 0 else args.systems[::-1]:
                got = measure(servers[system], SYSTEMS[system][1], body, args.stall_s)
                answers[system] = got.answer.text
                rows.append([n + 1, system, got.answer.completion_tokens, got.answer.events,
                             round(got.answer.events / max(got.answer.completion_tokens, 1), 3),
                             round(1000 * got.front_cpu_s / got.stall_s, 1), round(got.switches / got.stall_s, 1),
                             f"{os.getloadavg()[0]:.1f}"])
                print(f"round {n + 1}, {system}: {got.answer.events} events for {got.answer.completion_tokens} "
                      f"tokens", flush=True)
            if len(set(answers.values())) > 1:
                print(f"round {n + 1}: the systems' texts differ", flush=True)
    finally:
        for stages in servers.values():
            stop(stages)
    print(f"\n{args.input_len} random tokens in, {args.output_len} out (ignore_eos), greedy, top logprobs "
          f"{args.top_logprobs}, {args.dtype}; the client reads the first event, then nothing for {args.stall_s:g} s, "
          f"then the rest\n")
    print(markdown_table(["round", "system", "tokens", "events", "events / token", "front CPU-ms / s of stall",
                          "front switches / s of stall", "load"], rows))


if __name__ == "__main__":
    main()
