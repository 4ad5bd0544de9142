"""What one gRPC message costs each end on this machine: over TCP on the loopback and over a Unix socket, and
against a plain socket.

    python -m bench.grpc_messages      # ~1 minute
    python -m bench.grpc_messages --push-every-ms 2    # ~2 minutes: pushed as engine steps, gRPC and a plain socket

The gateway and llm_svc talk over one GenerateStream: each message costs both processes CPU time, whatever it
carries. Here a grpc.aio client streams small messages to a grpc.aio server in another process, which answers each
one (as llm_svc answers a start with deltas), `--in-flight` of them outstanding at a time. CPU time is each
process's user + system time over the run (psutil), per message; wall time per message too. The transports take
turns for `--rounds` rounds, so that a load drifting during the run weighs on both.

`--push-every-ms` instead has the server push a message every so often, as llm_svc writes an engine step's deltas
while few requests are in flight, each end waking for each message; once over a grpc.aio stream and once over a
plain asyncio socket (length-prefixed frames), the floor of any hop between two processes. The server runs
asyncio's own loop and the client uvloop, as llm_svc and the gateway do; the server's figure includes the timer's
wake-up, which stands for the engine's output arriving (a single process wakes for that too), so a third row times
that timer alone, and the last column is what the hop itself costs the two ends per message. The timer alone
runs with no client beside it, and on a virtual machine a wake-up costs more next to an idle core: runs of a few
thousand messages put that column within ~10 us, a run of a thousand far less closely.
"""

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import pathlib
import struct
import tempfile
import time
from collections.abc import Iterator

import psutil
import uvloop

# The client as the gateway runs grpc (gateway/__main__.py); a client-side setting, so the servers run as llm_svc does.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")
import grpc  # noqa: E402 - after the setting above
from grpc_health.v1 import health, health_pb2_grpc  # noqa: E402

from bench.common import markdown_table
from protos.server import channel_options

_METHOD = "/bench.Echo/Stream"
_PUSH_METHOD = "/bench.Push/Stream"
_FRAME_HEADER = struct.Struct("<I")  # a plain socket's frame: the payload's length
_OPTIONS = channel_options(64 << 20)


async def _echo(request_iterator, context):
    async for message in request_iterator:
        yield message


async def _push(request: bytes, context):
    messages, payload_bytes, every_ms = map(int, request.split())
    for _ in range(messages):
        await asyncio.sleep(every_ms / 1000)
        yield b"x" * payload_bytes


def serve(address: str, bound) -> None:
    """Serves the echo and the push on `address` and puts the address it bound (its port chosen when given as 0) in
    `bound`."""
    async def run():
        server = grpc.aio.server(options=_OPTIONS)
        server.add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("bench.Echo",
                                                 {"Stream": grpc.stream_stream_rpc_method_handler(_echo)}),
            grpc.method_handlers_generic_handler("bench.Push",
                                                 {"Stream": grpc.unary_stream_rpc_method_handler(_push)})))
        # The client's channel asks for the server's health (`channel_options`), as the stages' servers answer it.
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        port = server.add_insecure_port(address)
        await server.start()
        bound.put(address if address.startswith("unix:") else f"{address.rsplit(':', 1)[0]}:{port}")
        await server.wait_for_termination()
    asyncio.run(run())


async def stream(address: str, messages: int, in_flight: int, payload: bytes) -> None:
    """Sends `messages` and reads their answers, with up to `in_flight` sent and not yet answered."""
    async with grpc.aio.insecure_channel(address, options=_OPTIONS) as channel:
        call = channel.stream_stream(_METHOD)()
        sent = answered = 0
        while answered < messages:
            while sent < messages and sent - answered < in_flight:
                await call.write(payload)
                sent += 1
            await call.read()
            answered += 1
        await call.done_writing()


@contextlib.contextmanager
def spawned_server(serve_it, address: str) -> Iterator[tuple[str, psutil.Process]]:
    """`serve_it(address, bound)` in a process of its own: the address it bound, and the process, killed after."""
    # Spawned, not forked: a forked child would inherit grpc's state from this process's earlier channels.
    spawn = multiprocessing.get_context("spawn")
    bound = spawn.Queue()
    server = spawn.Process(target=serve_it, args=(address, bound), daemon=True)
    server.start()
    try:
        yield bound.get(timeout=60), psutil.Process(server.pid)
    finally:
        server.kill()
        server.join()


def measure(address: str, messages: int, in_flights: list[int], payload_bytes: int) -> dict[int, dict[str, float]]:
    """Per in-flight count: CPU us per message of the server and of the client, and wall us per message."""
    with spawned_server(serve, address) as (address, server_cpu):
        payload = b"x" * payload_bytes
        asyncio.run(stream(address, min(messages, 200), max(in_flights), payload))  # connect, warm up: untimed
        client_cpu = psutil.Process()
        figures = {}
        for in_flight in in_flights:
            server_before, client_before, started = _cpu_s(server_cpu), _cpu_s(client_cpu), time.perf_counter()
            asyncio.run(stream(address, messages, in_flight, payload))
            wall_s = time.perf_counter() - started
            server_s, client_s = _cpu_s(server_cpu) - server_before, _cpu_s(client_cpu) - client_before
            figures[in_flight] = {"server": 1e6 * server_s / messages, "client": 1e6 * client_s / messages,
                                  "wall": 1e6 * wall_s / messages}
    return figures


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def serve_socket(address: str, bound) -> None:
    """The push over a plain socket on `address` (TCP): a line `messages payload_bytes every_ms` in, length-prefixed
    frames out."""
    async def push(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        messages, payload_bytes, every_ms = map(int, (await reader.readline()).split())
        for _ in range(messages):
            await asyncio.sleep(every_ms / 1000)
            writer.write(_FRAME_HEADER.pack(payload_bytes) + b"x" * payload_bytes)
        await writer.drain()
        writer.close()

    async def run():
        host, port = address.rsplit(":", 1)
        server = await asyncio.start_server(push, host, int(port))
        bound.put(f"{host}:{server.sockets[0].getsockname()[1]}")
        await server.serve_forever()
    asyncio.run(run())


async def read_grpc_push(address: str, request: bytes) -> int:
    async with grpc.aio.insecure_channel(address, options=_OPTIONS) as channel:
        return len([message async for message in channel.unary_stream(_PUSH_METHOD)(request)])


async def read_socket_push(address: str, request: bytes) -> int:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request + b"\n")
    received = 0
    while True:
        try:
            header = await reader.readexactly(_FRAME_HEADER.size)
        except asyncio.IncompleteReadError as end:
            if end.partial:
                raise
            break  # the server closed the connection after its last frame
        await reader.readexactly(_FRAME_HEADER.unpack(header)[0])
        received += 1
    writer.close()
    return received


PUSHES = {"gRPC stream": (serve, read_grpc_push), "plain socket": (serve_socket, read_socket_push)}


def measure_push(transport: str, messages: int, payload_bytes: int, every_ms: int) -> dict[str, float]:
    """CPU us per message of the server and of the client, the server pushing a message every `every_ms`."""
    serve_it, read = PUSHES[transport]
    with spawned_server(serve_it, "127.0.0.1:0") as (address, server_cpu):
        uvloop.run(read(address, f"{min(messages, 100)} {payload_bytes} {every_ms}".encode()))  # untimed warm-up
        client_cpu = psutil.Process()
        server_before, client_before = _cpu_s(server_cpu), _cpu_s(client_cpu)
        received = uvloop.run(read(address, f"{messages} {payload_bytes} {every_ms}".encode()))
        server_s, client_s = _cpu_s(server_cpu) - server_before, _cpu_s(client_cpu) - client_before
    assert received == messages, f"{transport}: {received} of {messages} messages"
    return {"server": 1e6 * server_s / messages, "client": 1e6 * client_s / messages}


def _timer_alone(messages: int, every_ms: int, result) -> None:
    async def wake():
        for _ in range(messages):
            await asyncio.sleep(every_ms / 1000)
    started = time.process_time()
    asyncio.run(wake())
    result.put(time.process_time() - started)


def measure_timer(messages: int, every_ms: int) -> float:
    """CPU us per wake-up of the push's server without a transport: its timer alone, in a process of its own."""
    spawn = multiprocessing.get_context("spawn")
    result = spawn.Queue()
    process = spawn.Process(target=_timer_alone, args=(messages, every_ms, result), daemon=True)
    process.start()
    try:
        return 1e6 * result.get(timeout=60 + messages * every_ms / 1000) / messages
    finally:
        process.join()


TIMER_ALONE = "neither: the server's timer alone"


def run_push_rounds(messages: int, payload_bytes: int, every_ms: int, rounds: int) -> list[list]:
    """One row per transport and one for the server's timer alone, each figure the mean over the rounds, in
    alternating order; what the transport adds to the two ends is `both` less the timer's."""
    totals: dict[str, list[dict[str, float]]] = {transport: [] for transport in [*PUSHES, TIMER_ALONE]}
    for round_ in range(rounds):
        order = list(totals) if round_ % 2 == 0 else list(totals)[::-1]
        for case in order:
            totals[case].append(measure_push(case, messages, payload_bytes, every_ms) if case in PUSHES
                                else {"server": measure_timer(messages, every_ms), "client": 0.0})
    timer = sum(run["server"] for run in totals[TIMER_ALONE]) / rounds
    rows = []
    for case, runs in totals.items():
        server, client = (sum(run[key] for run in runs) / len(runs) for key in ("server", "client"))
        rows.append([case, f"{server:.0f}", f"{client:.0f}" if case in PUSHES else "-", f"{server + client:.0f}",
                     f"{server + client - timer:.0f}" if case in PUSHES else "-"])
    return rows


def transports(directory: pathlib.Path) -> dict[str, str]:
    return {"TCP, loopback": "127.0.0.1:0", "Unix socket": f"unix:{directory / 'echo.sock'}"}


def run_rounds(messages: int, in_flights: list[int], rounds: int, payload_bytes: int) -> list[list]:
    """One row per transport and in-flight count, each figure the mean over the rounds."""
    with tempfile.TemporaryDirectory() as directory:
        addresses = transports(pathlib.Path(directory))
        totals: dict[tuple[str, int], list[dict[str, float]]] = {}
        for round_ in range(rounds):
            order = list(addresses.items())
            for name, address in order if round_ % 2 == 0 else order[::-1]:
                if address.startswith("unix:"):
                    pathlib.Path(address.removeprefix("unix:")).unlink(missing_ok=True)
                for in_flight, figures in measure(address, messages, in_flights, payload_bytes).items():
                    totals.setdefault((name, in_flight), []).append(figures)
    rows = []
    for (name, in_flight), runs in totals.items():
        mean = {key: sum(run[key] for run in runs) / len(runs) for key in runs[0]}
        rows.append([name, in_flight, f"{mean['server']:.0f}", f"{mean['client']:.0f}",
                     f"{mean['server'] + mean['client']:.0f}", f"{mean['wall']:.0f}"])
    return sorted(rows, key=lambda row: (row[1], row[0]))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_messages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=10_000, help="timed messages per case and round")
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 8], help="messages outstanding")
    parser.add_argument("--rounds", type=int, default=2, help="turns of each transport, in alternating order")
    parser.add_argument("--payload-bytes", type=int, default=300, help="bytes a message carries (a few deltas)")
    parser.add_argument("--push-every-ms", type=int, metavar="MS",
                        help="instead: the server pushes a message every MS, over gRPC and over a plain socket")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.messages} messages of "
          f"{args.payload_bytes} bytes per case, {args.rounds} rounds", flush=True)
    if args.push_every_ms is not None:
        rows = run_push_rounds(args.messages, args.payload_bytes, args.push_every_ms, args.rounds)
        print(markdown_table(["transport", "server CPU us / msg", "client CPU us / msg", "both",
                              "the transport's part"], rows))
        print(f"load average {os.getloadavg()[0]:.1f}")
        return
    rows = run_rounds(args.messages, args.in_flight, args.rounds, args.payload_bytes)
    print(markdown_table(["transport", "in flight", "server CPU us / msg", "client CPU us / msg", "both",
                          "wall us / msg"], rows))
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
