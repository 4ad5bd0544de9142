"""What one gRPC message costs each end on this machine, over TCP on the loopback and over a Unix socket.

    python -m bench.grpc_messages      # ~1 minute

The gateway and llm_svc talk over one GenerateStream: each message costs both processes CPU time, whatever it
carries. Here a grpc.aio client streams small messages to a grpc.aio server in another process, which answers each
one (as llm_svc answers a start with deltas), `--in-flight` of them outstanding at a time. CPU time is each
process's user + system time over the run (psutil), per message; wall time per message too. The transports take
turns for `--rounds` rounds, so that a load drifting during the run weighs on both.
"""

import argparse
import asyncio
import multiprocessing
import os
import pathlib
import tempfile
import time

import psutil

# The client as the gateway runs grpc (gateway/__main__.py); a client-side setting, so the servers run as llm_svc does.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")
import grpc  # noqa: E402 - after the setting above

from bench.common import markdown_table
from protos.server import channel_options

_METHOD = "/bench.Echo/Stream"
_OPTIONS = channel_options(64 << 20)


async def _echo(request_iterator, context):
    async for message in request_iterator:
        yield message


def serve(address: str, bound) -> None:
    """Serves the echo on `address` and puts the address it bound (its port chosen when given as 0) in `bound`."""
    async def run():
        server = grpc.aio.server(options=_OPTIONS)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "bench.Echo", {"Stream": grpc.stream_stream_rpc_method_handler(_echo)}),))
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


def measure(address: str, messages: int, in_flights: list[int], payload_bytes: int) -> dict[int, dict[str, float]]:
    """Per in-flight count: CPU us per message of the server and of the client, and wall us per message."""
    # Spawned, not forked: a forked child would inherit grpc's state from this process's earlier channels.
    spawn = multiprocessing.get_context("spawn")
    bound = spawn.Queue()
    server = spawn.Process(target=serve, args=(address, bound), daemon=True)
    server.start()
    try:
        address = bound.get(timeout=60)
        payload = b"x" * payload_bytes
        asyncio.run(stream(address, min(messages, 200), max(in_flights), payload))  # connect, warm up: untimed
        server_cpu, client_cpu = psutil.Process(server.pid), psutil.Process()
        figures = {}
        for in_flight in in_flights:
            server_before, client_before, started = _cpu_s(server_cpu), _cpu_s(client_cpu), time.perf_counter()
            asyncio.run(stream(address, messages, in_flight, payload))
            wall_s = time.perf_counter() - started
            server_s, client_s = _cpu_s(server_cpu) - server_before, _cpu_s(client_cpu) - client_before
            figures[in_flight] = {"server": 1e6 * server_s / messages, "client": 1e6 * client_s / messages,
                                  "wall": 1e6 * wall_s / messages}
    finally:
        server.kill()
        server.join()
    return figures


def _cpu_s(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


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
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.messages} messages of "
          f"{args.payload_bytes} bytes per case, {args.rounds} rounds", flush=True)
    rows = run_rounds(args.messages, args.in_flight, args.rounds, args.payload_bytes)
    print(markdown_table(["transport", "in flight", "server CPU us / msg", "client CPU us / msg", "both",
                          "wall us / msg"], rows))
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
