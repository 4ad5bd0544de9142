"""What bench.gateway_cost and bench.llm_svc_cost share: a server's CPU per request, against a floor's, in turns.

Each measures one front (and maybe the same front from another checkout) and the least a server of its
kind costs (the floor) on the same requests from the same client, in alternating turns, at two output lengths or
more; the fit of the two ends splits the cost into per request and per token.
"""

import argparse
import asyncio
import collections
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import psutil

from bench.common import markdown_table, ratio
from bench.e2e import stop
from deploy.local import Stage

STEP_S = 0.006
TOKEN_TEXT = " word"


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


def synthetic_generate(steps: Steps, prompt_tokens: int):
    """A servicer's Generate answering as llm_svc: `max_tokens` messages of a token of TOKEN_TEXT, one per step."""
    from protos import llm_pb2

    async def generate(self, request, context):
        tokens = request.sampling.max_tokens
        for i in range(tokens):
            await steps.next()
            last = i == tokens - 1
            yield llm_pb2.GenerateResponse(
                request_id=request.request_id, text=TOKEN_TEXT, token_ids=[100 + i],
                finish_reason=llm_pb2.FINISH_REASON_LENGTH if last else llm_pb2.FINISH_REASON_UNSPECIFIED,
                usage=llm_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=tokens) if last else None)
    return generate


def fit(short: tuple[int, float], long: tuple[int, float]) -> tuple[float, float]:
    """Per request (ms) and per token (us) from the CPU per request at two output lengths."""
    (n1, ms1), (n2, ms2) = short, long
    per_token_ms = (ms2 - ms1) / (n2 - n1)
    return ms1 - n1 * per_token_ms, 1e3 * per_token_ms


def by_round(ours: list[float], theirs: list[float]) -> str:
    return ", ".join(ratio(a, b) for a, b in zip(ours, theirs))


def tables(results: dict[int, dict[str, list[float]]], floor: str) -> str:
    """Each length's rounds, means and ratios: each server's to the floor, and the first server's to each other one
    (another checkout's), also round by round, as the two ran next to each other in every round (the machine's pace
    moves more between rounds than within one); and from the shortest and longest length, the fit."""
    rows = []
    for tokens, by_server in results.items():
        means = {server: statistics.mean(runs) for server, runs in by_server.items()}
        for server, runs in by_server.items():
            rows.append([tokens, server, means[server], ", ".join(f"{run:.3f}" for run in runs)])
        rows += [[tokens, label, ratio(means[server], means[other]), by_round(by_server[server], by_server[other])]
                 for server, other, label in compared(by_server, floor)]
    out = markdown_table(["tokens out", "server", "CPU ms / request", "by round"], rows)
    lengths = sorted(results)
    if len(lengths) >= 2:
        fitted = {server: fit(*((n, statistics.mean(results[n][server])) for n in (lengths[0], lengths[-1])))
                  for server in results[lengths[0]]}
        out += "\n\n" + markdown_table(
            ["server", "CPU ms / request", "CPU us / token"],
            [[server, per_request, per_token] for server, (per_request, per_token) in fitted.items()] +
            [[label, ratio(fitted[server][0], fitted[other][0]), ratio(fitted[server][1], fitted[other][1])]
             for server, other, label in compared(fitted, floor)])
    return out


def compared(servers, floor: str) -> list[tuple[str, str, str]]:
    """The pairs whose ratios are shown, each with its row's label: each server and the floor, then the first server
    and each other one."""
    measured = [server for server in servers if server != floor]
    return [(server, floor, f"**{server} / floor**") for server in measured] + \
        [(measured[0], other, f"**{measured[0]} / {other}**") for other in measured[1:]]


def parse_args(module: str, doc: str, serve_choices: list[str],
               more_arguments: Callable[[argparse.ArgumentParser], None] = lambda parser: None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{module}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 128],
                        help="output lengths to measure; the first and last give the fit (default: 1 128)")
    parser.add_argument("--concurrency", type=int, default=64, help="streams in flight (default: 64)")
    parser.add_argument("--requests", type=int, default=1024, help="requests per server and round (default: 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="turns each server gets per length (default: 3)")
    parser.add_argument("--logs", default=f"/tmp/internvl-dvd-bench/{module.replace('_', '-')}",
                        help="directory for the servers' logs")
    more_arguments(parser)
    parser.add_argument("--serve", choices=serve_choices, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is None and (min(args.tokens) < 1 or args.rounds < 1 or args.requests < args.concurrency):
        parser.error("--tokens and --rounds must be at least 1, --requests at least --concurrency")
    return args


def compare_with_argument(server: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--compare-with", metavar="CHECKOUT",
                            help=f"also measure {server} as another checkout of the project has it (a git worktree "
                                 "of an earlier commit, its protos built), in the same turns and with this one's "
                                 "Python")
    return add


def check_checkout(checkout: str | None, bench: str) -> None:
    """Exits unless `checkout` (if given) has the bench and the built protos that its servers need."""
    missing = [path for path in (bench, "protos/llm_pb2.py")
               if checkout is not None and not os.path.exists(os.path.join(checkout, path))]
    if missing:
        sys.exit(f"--compare-with {checkout}: it has no {' or '.join(missing)}; it must be a checkout of the project "
                 f"that has this bench, with its protos built (or protos/*_pb2*.py copied from here)")


def commit_of(checkout: str) -> str:
    """The checkout's commit, "+" if it has changes."""
    def git(*args):
        return subprocess.run(["git", "-C", checkout, *args], capture_output=True, text=True).stdout.strip()
    return (git("rev-parse", "--short", "HEAD") or "?") + ("+" if git("status", "--porcelain", "-uno") else "")


Load = Callable[[Stage, int, int, int], None]  # (server, tokens, requests, concurrency): the requests, each checked


def cpu_ms_per_request(load: Load, server: Stage, tokens: int, requests: int, concurrency: int) -> float:
    """The CPU time (user + system) of the server's process per request of `load`."""
    process = psutil.Process(server.proc.pid)
    before = process.cpu_times()
    load(server, tokens, requests, concurrency)
    after = process.cpu_times()
    return 1e3 * (after.user + after.system - before.user - before.system) / requests


def measure_in_turns(args: argparse.Namespace, servers: dict[str, Stage], stages: list[Stage], load: Load,
                     setting: str) -> None:
    """The `servers` (the floor last) in turns at each length; the tables; `stages` stopped."""
    started = time.perf_counter()
    names = list(servers)
    results: dict[int, dict[str, list[float]]] = collections.defaultdict(lambda: {name: [] for name in names})
    try:
        for server in servers.values():  # warm-up
            load(server, 2, args.concurrency * 2, args.concurrency)
        for tokens in args.tokens:
            for round_ in range(args.rounds):
                for name in names if round_ % 2 == 0 else reversed(names):
                    results[tokens][name].append(
                        cpu_ms_per_request(load, servers[name], tokens, args.requests, args.concurrency))
            print(f"{tokens} tokens done, load average {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    finally:
        stop(stages)
    print(f"\n{args.concurrency} {setting}, {args.requests} per server and round, a token every "
          f"{STEP_S * 1e3:.0f} ms; CPU of each server's process\n")
    print(tables(dict(results), names[-1]))
    print(f"\n{time.perf_counter() - started:.0f} s in all (after the servers' start), "
          f"load average {os.getloadavg()[0]:.1f}")
