"""Replicas joining and leaving under load: vision_svc 1 -> 2 -> 1, then llm_svc 1 -> 2 -> 1, while mixed text and
image traffic flows through the gateway.

    python -m bench.scale [--concurrency 8] [--hold-s 40]

Each replica listens on an address of its own (127.0.10.N for vision_svc, 127.0.20.N for llm_svc; one port per
stage, as pods behind a headless Service), and its callers (llm_svc, the gateway) find replicas by one name each,
`vision.scale.test` and `llm.scale.test`, in a hosts file of the bench's own mounted over their /etc/hosts
(`bench.private_hosts`). Scaling out starts a replica and, once it is healthy, adds its address under the name;
scaling in removes the address and sends the replica SIGTERM, at the same moment, as Kubernetes does. Callers
re-resolve names every 30 s and after a failed call.

Measured: requests sent, completed and failed; for each replica that joined, the seconds from its address
appearing under the name to its first request served; for each that left, the seconds it took to drain and
exit. Exit status 1 when a request failed or hung, a new replica got no traffic within the re-resolution period
(plus a margin), or a leaving one did not exit within its grace.
"""

from deploy import fork_safe_grpc  # noqa: F401,I001  (first: before anything imports grpc)

import argparse
import dataclasses
import pathlib
import signal
import sys
import time
from collections.abc import Callable

from bench import private_hosts, stage_runs
from bench.common import markdown_table
from bench.stage_probes import scrape_or_empty
from bench.traffic import COMPLETED, HUNG, RequestMix, Traffic, latency_summary
from deploy.local import Stage, free_port
from protos.endpoints import DEFAULT_REFRESH_S

START_TIMEOUT_S = 300.0
HANG_MARGIN_S = 10.0
JOIN_MARGIN_S = 10.0  # past the re-resolution period: a new replica must serve by then
GRACE_S = 30.0  # each replica's --grace-s: streams in flight get this long to finish after SIGTERM
ENGINE_FLAGS = ["--kv-cache-memory-bytes", str(256 << 20), "--max-model-len", "4096", "--max-num-seqs", "8"]
VISION_NAME, LLM_NAME = "vision.scale.test", "llm.scale.test"


@dataclasses.dataclass
class Replica:
    label: str
    host: str
    stage: Stage
    metrics_address: str
    served_counter: str
    joined_at: float | None = None  # when its address appeared under the name (traffic clock)
    first_served_at: float | None = None
    left_at: float | None = None
    exited_at: float | None = None

    def served(self) -> float:
        return scrape_or_empty(self.metrics_address).get(self.served_counter, 0.0)


class ScaledStack:
    """The stages, the hosts file their callers read, and which replicas are under each name."""

    def __init__(self, model: pathlib.Path, logs: pathlib.Path):
        self.model, self.logs = model, logs
        self.hosts = logs / "hosts"
        self.vision_port, self.llm_port, self.metrics_port = free_port(), free_port(), free_port()
        self.names: dict[str, list[Replica]] = {VISION_NAME: [], LLM_NAME: []}
        self.replicas: list[Replica] = []
        self.gateway: Stage | None = None
        private_hosts.write(self.hosts, {})

    def _publish(self) -> None:
        private_hosts.write(self.hosts, {name: [r.host for r in replicas] for name, replicas in self.names.items()})

    def _with_hosts(self, module: str, *args: str) -> list[str]:
        return ["bench.private_hosts", "exec", str(self.hosts), "--", module, *args]

    def start_vision(self, n: int) -> Replica:
        host = f"127.0.10.{n}"
        args = ["vision_svc", "--model", str(self.model), "--host", host, "--port", str(self.vision_port),
                "--preprocess-workers", "0", "--grace-s", str(GRACE_S), "--metrics-port", str(self.metrics_port)]
        return self._start(f"vision-{n}", host, self.vision_port, args, 'vision_requests_total{code="OK"}')

    def start_llm(self, n: int) -> Replica:
        host = f"127.0.20.{n}"
        args = self._with_hosts(
            "llm_svc", "--model", str(self.model), "--vision", f"dns:///{VISION_NAME}:{self.vision_port}",
            "--host", host, "--port", str(self.llm_port), "--served-model-name", self.model.resolve().name,
            "--trust-remote-code", *ENGINE_FLAGS, "--grace-s", str(GRACE_S), "--metrics-port", str(self.metrics_port))
        return self._start(f"llm-{n}", host, self.llm_port, args, 'llm_svc_requests_total{code="OK"}')

    def _start(self, label: str, host: str, port: int, module_args: list[str], counter: str) -> Replica:
        stage = Stage(label, module_args, port, self.logs / f"{label}.log")
        stage.address = stage.health_address = f"{host}:{port}"
        replica = Replica(label, host, stage, f"{host}:{self.metrics_port}", counter)
        self.replicas.append(replica)
        return replica

    def start_gateway(self) -> Stage:
        port = free_port()
        self.gateway = Stage("gateway", self._with_hosts(
            "gateway", "--llm", f"dns:///{LLM_NAME}:{self.llm_port}", "--host", "127.0.0.1", "--port", str(port),
            "--request-timeout-s", "60", "--shutdown-grace-s", "2"), port, self.logs / "gateway.log",
            http_health=True)
        return self.gateway

    def join(self, name: str, replica: Replica, clock: Callable[[], float] | None = None) -> None:
        """Once healthy, its address goes under `name`; with `clock` (the traffic's), the moment is noted."""
        replica.stage.wait_ready(START_TIMEOUT_S)
        self.names[name].append(replica)
        self._publish()
        replica.joined_at = clock() if clock else None

    def leave(self, name: str, replica: Replica, now: float) -> None:
        """Out of the name and SIGTERM at once (`watch` notes when it exits)."""
        self.names[name].remove(replica)
        self._publish()
        replica.left_at = now
        replica.stage.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        for stage in [self.gateway, *(r.stage for r in reversed(self.replicas))]:
            if stage is not None:
                stage.stop(GRACE_S + 15)


def watch(stack: ScaledStack, traffic: Traffic, seconds: float) -> None:
    """Waits `seconds`, noting when joined replicas first serve and when leaving ones exit."""
    deadline = traffic.now() + seconds
    while traffic.now() < deadline:
        for r in stack.replicas:
            if r.joined_at is not None and r.first_served_at is None and r.served() > 0:
                r.first_served_at = traffic.now()
            if r.left_at is not None and r.exited_at is None and r.stage.proc.poll() is not None:
                r.exited_at = traffic.now()
        time.sleep(0.5)


def scale_once(stack: ScaledStack, traffic: Traffic, name: str, new: Replica, hold_s: float) -> None:
    print(f"{traffic.now():6.0f} s  {new.label} starting", flush=True)
    stack.join(name, new, traffic.now)
    print(f"{traffic.now():6.0f} s  {new.label} ready, added under {name}", flush=True)
    watch(stack, traffic, hold_s)
    print(f"{traffic.now():6.0f} s  {new.label} removed from {name}, SIGTERM "
          f"(served {new.served():.0f} requests)", flush=True)
    stack.leave(name, new, traffic.now())
    watch(stack, traffic, GRACE_S + 5)


def report(stack: ScaledStack, traffic: Traffic, seconds: float) -> tuple[str, bool]:
    outcomes = traffic.outcomes
    failed = [o for o in outcomes if o.result != COMPLETED]
    p50, longest = latency_summary(outcomes)
    rows, ok = [], not failed
    for r in stack.replicas:
        took = None if r.first_served_at is None or r.joined_at is None else r.first_served_at - r.joined_at
        drained = None if r.exited_at is None or r.left_at is None else r.exited_at - r.left_at
        joined_ok = r.joined_at is None or (took is not None and took <= DEFAULT_REFRESH_S + JOIN_MARGIN_S)
        left_ok = r.left_at is None or (drained is not None and r.stage.proc.returncode == 0)
        ok &= joined_ok and left_ok
        rows.append([r.label, "-" if r.joined_at is None else f"{r.joined_at:.0f}",
                     "-" if took is None else f"{took:.1f}", "-" if r.left_at is None else f"{r.left_at:.0f}",
                     "-" if drained is None else f"{drained:.1f} (exit {r.stage.proc.returncode})",
                     "yes" if joined_ok and left_ok else "**NO**"])
    kinds = sorted({f"{o.result}: {o.message[:80]}" for o in failed})
    text = "\n".join([
        markdown_table(["requests", "completed", "failed", "hung", "req/s", "p50 s", "max s", "failures"],
                       [[len(outcomes), len(outcomes) - len(failed), len(failed),
                         sum(o.result == HUNG for o in outcomes), len(outcomes) / seconds, p50, longest,
                         "; ".join(kinds) or "-"]]),
        "",
        markdown_table(["replica", "added at s", "first request after s", "removed at s", "exited after s", "ok"],
                       rows),
    ])
    return text, ok


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (ignore_eos)")
    parser.add_argument("--hold-s", type=float, default=DEFAULT_REFRESH_S + JOIN_MARGIN_S + 5,
                        help="seconds a second replica stays (must exceed the 30 s re-resolution period)")
    parser.add_argument("--settle-s", type=float, default=15.0,
                        help="seconds of traffic before the first and after the last change")
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="checkpoint directory (default: build the tiny checkpoint, original layout)")
    parser.add_argument("--work-dir", default=None, help="where the tiny checkpoint and the logs go")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if (reason := private_hosts.unavailable_reason()) is not None:
        sys.exit(f"bench.scale: cannot run: {reason}")
    logs, model = stage_runs.prepare(args, "scale")
    stack = ScaledStack(model, logs)
    traffic = None
    try:
        vision, llm = stack.start_vision(1), stack.start_llm(1)
        stack.join(VISION_NAME, vision)  # there from the start: not measured
        stack.join(LLM_NAME, llm)
        stack.start_gateway().wait_ready(START_TIMEOUT_S)
        print(f"stages ready; logs in {logs}", flush=True)
        traffic = Traffic(f"http://{stack.gateway.address}", RequestMix(model.resolve().name, args.max_tokens),
                          args.concurrency, 60 + HANG_MARGIN_S, "scale").start()
        watch(stack, traffic, args.settle_s)
        scale_once(stack, traffic, VISION_NAME, stack.start_vision(2), args.hold_s)
        scale_once(stack, traffic, LLM_NAME, stack.start_llm(2), args.hold_s)
        watch(stack, traffic, args.settle_s)
        seconds = traffic.now()
        traffic.stop()
    finally:
        if traffic is not None:
            traffic.stop(wait=False)
        stack.stop()
    text, ok = report(stack, traffic, seconds)
    print(f"\nconcurrency {args.concurrency}, names re-resolved every {DEFAULT_REFRESH_S:g} s\n\n{text}")
    return 0 if ok else 1


if __name__ == "__main__":
    stage_runs.run(main)
