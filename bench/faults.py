"""Faults under load: replicas killed and restarted, and network faults between the stages, while mixed traffic runs.

    python -m bench.faults                      # 300 s of traffic, plus 1-2 min to start the stages
    python -m bench.faults --duration-s 60 --json faults.json

Starts on this machine two vision_svc replicas, two llm_svc replicas (each given both vision replicas) and one
gateway, with the tiny checkpoint, and sends chat completions at concurrency 8 (text and image, streamed and
not: `bench.traffic`). The run is split into equal phases; each begins with a lead-in of plain traffic (at
least --lead-in-s, and until every request of the phases before has ended, so that a phase's fault reaches only
its own requests), then applies its fault:

- baseline: none;
- vision kill -9: vision-1 is killed with SIGKILL and started again at once at the same address;
- llm_svc kill -9: the same for llm-1;
- delay, loss: on the llm_svc -> vision hop. With netem in the kernel, netem's delay / packet loss on the veth
  pair of vision-1's namespace; without it, the bench's fault proxy (`bench.fault_proxy`) in front of vision-0:
  +delay per chunk each way, and connections reset at random;
- blackhole: the fault proxy in front of vision-0 forwards nothing for --fault-s, connections left open;
- stuck worker: vision-0's preprocessing worker is stopped (SIGSTOP) for --fault-s, then resumed: the replica
  still answers pings and health checks, but its images wait;
- partition: vision-1 runs in a network namespace of its own, reached over a veth pair, and the link goes down
  for --fault-s (packets dropped, no reset). Needs root and `ip netns`; skipped, with the reason, otherwise.

gRPC's keepalive finds a silent vision replica (blackhole, partition) within 20 s: its calls fail UNAVAILABLE,
llm_svc retries them on the other replica and sends it that replica's images until the connection is back. A
--vision-timeout-s under that fails the image requests that meet the fault with a 504 at the deadline instead.
A stuck worker is found by vision_svc itself: after --stall-timeout-s without progress it says NOT_SERVING, and
llm_svc's channels, which watch health, send its images to the other replica until it serves again; the images it
held fail UNAVAILABLE then, and llm_svc retries them on the other replica.
Timeouts are small, so that the faults play out within a run.

Which mechanism each phase used is printed with its results. Checked (the exit status is 1 when one fails): no
request hangs (open past the gateway's --request-timeout-s plus a margin); every failure is an HTTP error or an
SSE error event with a message; the baseline and the vision kill lose no request, nor do the blackhole and the
partition when --vision-timeout-s leaves keepalive its 20 s, nor does the stuck worker when it leaves the stall
watch its --stall-timeout-s and a margin; once a stuck worker is found (that long into the fault) no request waits
for it (each sent then takes less than --stall-timeout-s); the llm_svc
kill fails only requests that were in flight on the killed replica, each with a 5xx or an SSE error; both
restarted replicas serve again; the gateway sees both llm_svc replicas healthy at the end.
"""

from deploy import fork_safe_grpc  # noqa: F401  (first: before anything imports grpc)

import argparse
import dataclasses
import json
import pathlib
import re
import time

import httpx

from bench import netns, stage_runs
from bench.common import markdown_table
from bench.fault_phases import PHASE_COUNT, Phase, plan, run_phases
from bench.fault_stack import Stack, start_stack
from bench.traffic import HUNG, Outcome, RequestMix, Traffic, latency_summary
from deploy.local import Stage
from protos.server import KEEPALIVE_S, PING_TIMEOUT_S

# How long past the gateway's deadline a request may stay open before it counts as hung.
HANG_MARGIN_S = 10.0
ID_PREFIX = "faults"
# Keepalive's ping interval and answer timeout, and a margin for the retry: how long a silent replica can hold a call.
SILENT_FOUND_S = KEEPALIVE_S + PING_TIMEOUT_S + 5
# After --stall-timeout-s, what a stuck vision replica's callers take to see it NOT_SERVING: its watch checks every
# second, and their channels' health watch answers at once.
STALL_FOUND_MARGIN_S = 3.0


# ---- what happened ------------------------------------------------------------------------------------------

def outcomes_of(phase: Phase, phases: list[Phase], outcomes: list[Outcome]) -> list[Outcome]:
    """The requests sent during `phase`: from its start to the next phase's start (the last phase: to the end)."""
    starts = [p.started for p in phases if p.skipped is None]
    following = [s for s in starts if s > phase.started]
    end = min(following, default=float("inf"))
    return [o for o in outcomes if phase.started <= o.started < end]


def ids_in_log(path: pathlib.Path) -> set[str]:
    """The bench's request ids that a stage's log mentions (each stage prefixes its lines with the request id)."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return set(re.findall(rf"{ID_PREFIX}-\d{{6}}", text))


def seconds_after(moment: float | None, origin: float | None) -> str:
    return "-" if moment is None or origin is None else f"{moment - origin:.1f}"


def phase_rows(phases: list[Phase], outcomes: list[Outcome]) -> list[list]:
    rows = []
    for phase in phases:
        if phase.skipped is not None:
            rows.append([phase.name, phase.fault, phase.mechanism, *["-"] * 8, f"skipped: {phase.skipped}"])
            continue
        mine = outcomes_of(phase, phases, outcomes)
        failed = [o for o in mine if not o.ok]
        in_flight = [o for o in failed if phase.fault_at is not None and o.started < phase.fault_at]
        p50, longest = latency_summary(mine)
        last_failure = max((o.ended for o in failed), default=None)
        if phase.ready_at is not None:
            back = (f"ready {seconds_after(phase.ready_at, phase.fault_at)} s, serving "
                    f"{seconds_after(phase.serving_at, phase.fault_at)} s after the kill")
        elif phase.healed_at is not None:
            back = f"healed {seconds_after(phase.healed_at, phase.fault_at)} s after the fault began"
        else:
            back = "-"
        rows.append([phase.name, phase.fault, phase.mechanism, len(mine), sum(o.ok for o in mine), len(failed),
                     len(in_flight), sum(o.result == HUNG for o in mine), p50, longest,
                     seconds_after(last_failure, phase.fault_at), back])
    return rows


PHASE_HEADERS = ["phase", "fault", "mechanism", "sent", "completed", "failed", "failed of those in flight at the fault",
                 "hung", "p50 s", "max s", "last failure ended (s after the fault)", "recovery"]


def failure_rows(phases: list[Phase], outcomes: list[Outcome]) -> list[list]:
    rows = []
    for phase in (p for p in phases if p.skipped is None):
        kinds: dict[str, list[Outcome]] = {}
        for outcome in outcomes_of(phase, phases, outcomes):
            if not outcome.ok:
                kinds.setdefault(outcome.result, []).append(outcome)
        for result, seen in sorted(kinds.items()):
            streamed = sum(o.stream for o in seen)
            message = seen[0].message.replace("|", "/")[:140]
            rows.append([phase.name, result, len(seen), f"{streamed} streamed, {len(seen) - streamed} not", message])
    return rows


def check(phases: list[Phase], outcomes: list[Outcome], killed_llm_log: pathlib.Path, healthy_at_end: list[str],
          vision_timeout_s: float, stall_timeout_s: float) -> list[tuple[str, bool, str]]:
    """(what is expected, whether it held, the figures behind it)."""
    by_name = {p.name: p for p in phases}
    checks = []
    hung = [o for o in outcomes if o.result == HUNG]
    checks.append(("no request hung", not hung, f"{len(hung)} of {len(outcomes)} hung"))
    unclean = [o for o in outcomes if not o.clean]
    checks.append(("every failure is an HTTP error or an SSE error event, with a message", not unclean,
                   "; ".join(f"{o.request_id}: {o.result}: {o.message[:80]}" for o in unclean[:3]) or "all clean"))
    lossless = ["baseline", "vision kill -9"]
    if vision_timeout_s > SILENT_FOUND_S:
        lossless += [name for name in ("blackhole", "partition") if by_name[name].skipped is None]
    if 0 < stall_timeout_s and stall_timeout_s + STALL_FOUND_MARGIN_S < vision_timeout_s and "stuck worker" in by_name:
        lossless.append("stuck worker")  # its images in hand are sent back before their deadline, and retried
    for name in lossless:
        failed = [o for o in outcomes_of(by_name[name], phases, outcomes) if not o.ok]
        checks.append((f"{name}: no request lost", not failed, f"{len(failed)} failed"))
    stuck = by_name.get("stuck worker")
    if stuck is not None and stuck.fault_at is not None and stuck.healed_at is not None and stall_timeout_s > 0:
        found_at = stuck.fault_at + stall_timeout_s + STALL_FOUND_MARGIN_S
        after = [o for o in outcomes_of(stuck, phases, outcomes) if found_at <= o.started < stuck.healed_at]
        longest = max((o.ended - o.started for o in after), default=0.0)
        checks.append((f"stuck worker: each request sent once it was found ({found_at - stuck.fault_at:g} s in) took "
                       "less than --stall-timeout-s", bool(after) and longest < stall_timeout_s,
                       f"{len(after)} requests, the longest {longest:.1f} s"))
    llm_kill = by_name["llm_svc kill -9"]
    failed = [o for o in outcomes_of(llm_kill, phases, outcomes) if not o.ok]
    served_by_killed = ids_in_log(killed_llm_log)
    strays = [o for o in failed if not (o.started < llm_kill.fault_at <= o.ended)  # not in flight at the kill
              or o.request_id not in served_by_killed or not re.fullmatch(r"(HTTP|SSE error) 5\d\d", o.result)]
    checks.append(("llm_svc kill -9: only requests in flight on the killed replica failed, each with a 5xx or an "
                   "SSE error", not strays, f"{len(failed)} failed, {len(strays)} of them otherwise"))
    for phase in (p for p in phases if p.name.endswith("kill -9")):
        checks.append((f"{phase.name}: the restarted replica serves again", phase.serving_at is not None,
                       f"serving {seconds_after(phase.serving_at, phase.fault_at)} s after the kill"))
    checks.append(("the gateway sees both llm_svc replicas healthy at the end", len(healthy_at_end) == 2,
                   ", ".join(healthy_at_end) or "none"))
    return checks


def healthy_replicas(gateway: Stage) -> list[str]:
    try:
        return httpx.get(f"http://{gateway.address}/health", timeout=10).json().get("healthy_replicas", [])
    except (httpx.HTTPError, ValueError):
        return []


# ---- the command --------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=300.0,
                        help="seconds of traffic, split evenly among the phases (a restart that takes longer than its "
                             "share lengthens its phase)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (ignore_eos)")
    parser.add_argument("--lead-in-s", type=float, default=5.0, help="plain traffic at the start of each phase")
    parser.add_argument("--fault-s", type=float, default=30.0,
                        help="how long each network fault lasts (at most what its phase leaves)")
    parser.add_argument("--delay-ms", type=int, default=100, help="delay phase: added latency, each way")
    parser.add_argument("--loss-percent", type=float, default=5.0, help="loss phase with netem: packets dropped")
    parser.add_argument("--reset-probability", type=float, default=0.02,
                        help="loss phase with the fault proxy: chance that a forwarded chunk resets its connection")
    parser.add_argument("--request-timeout-s", type=float, default=30.0,
                        help="the gateway's deadline per request (--request-timeout-s)")
    parser.add_argument("--vision-timeout-s", type=float, default=30.0,
                        help=f"llm_svc's deadline per vision_svc call (--vision-timeout-s); above {SILENT_FOUND_S} s, "
                             "keepalive's time to find a silent replica and a margin, the blackhole and partition "
                             "must lose no request")
    parser.add_argument("--stall-timeout-s", type=float, default=5.0,
                        help="vision_svc's --stall-timeout-s (its default is 60 s; short here so that the stuck worker "
                             "is found before every client waits on it: each client sends its next request only once "
                             "its last has ended; 0: never, so its images wait for it)")
    parser.add_argument("--no-namespace", action="store_true",
                        help="keep vision-1 on loopback (and skip the partition) even when namespaces are available")
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="checkpoint directory (default: build the tiny checkpoint, original layout)")
    parser.add_argument("--work-dir", default=None, help="where the tiny checkpoint and the logs go")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here, as JSON")
    return parser.parse_args(argv)


def report(args, phases: list[Phase], outcomes: list[Outcome], checks, logs: pathlib.Path) -> str:
    hang_after_s = args.request_timeout_s + HANG_MARGIN_S
    lines = [f"{len(outcomes)} requests at concurrency {args.concurrency}, {args.max_tokens} tokens out each; gateway "
             f"--request-timeout-s {args.request_timeout_s:g}, llm_svc --vision-timeout-s {args.vision_timeout_s:g}, "
             f"vision_svc --stall-timeout-s {args.stall_timeout_s:g}, a request open {hang_after_s:g} s counts as "
             f"hung; logs in {logs}",
             "", markdown_table(PHASE_HEADERS, phase_rows(phases, outcomes)), ""]
    failures = failure_rows(phases, outcomes)
    if failures:
        lines += [markdown_table(["phase", "failure", "requests", "of which", "message (first seen)"], failures), ""]
    lines.append(markdown_table(["expected", "holds", "seen"],
                                [[c, "yes" if ok else "**NO**", d] for c, ok, d in checks]))
    return "\n".join(lines)


def write_json(path: pathlib.Path, stack: Stack, phases: list[Phase], outcomes: list[Outcome], checks) -> None:
    path.write_text(json.dumps({
        "namespace": stack.namespace.name if stack.namespace else None,
        "phases": [{k: v for k, v in dataclasses.asdict(p).items() if k != "act"} for p in phases],
        "outcomes": [dataclasses.asdict(o) for o in outcomes],
        "checks": [{"expected": c, "holds": ok, "seen": d} for c, ok, d in checks]}, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs, model = stage_runs.prepare(args, "faults")
    namespace_problem = "--no-namespace" if args.no_namespace else netns.unavailable_reason()
    netem = namespace_problem is None and netns.netem_available()
    stack = Stack([], [], namespace=None if namespace_problem else netns.VethNamespace())
    traffic = None
    try:
        started = time.monotonic()
        start_stack(args, model, logs, stack)
        print(f"stages ready in {time.monotonic() - started:.0f} s; vision-1 "
              f"{'in namespace ' + stack.namespace.name if stack.namespace else 'on loopback: ' + namespace_problem}; "
              f"netem {'available' if netem else 'not in this kernel: the fault proxy stands in'}", flush=True)
        phase_s = args.duration_s / (PHASE_COUNT - (stack.namespace is None))  # the partition needs the namespace
        lead_in_s = min(args.lead_in_s, phase_s / 4)
        fault_s = max(1.0, min(args.fault_s, phase_s - lead_in_s - 2))
        phases = plan(args, stack, namespace_problem, netem, fault_s)
        mix = RequestMix(model.resolve().name, args.max_tokens)
        traffic = Traffic(f"http://{stack.gateway.address}", mix, args.concurrency,
                          args.request_timeout_s + HANG_MARGIN_S, ID_PREFIX).start()
        run_phases(phases, traffic, phase_s, lead_in_s)
        traffic.stop()
        checks = check(phases, traffic.outcomes, stack.llm[1].log_path(0), healthy_replicas(stack.gateway),
                       args.vision_timeout_s, args.stall_timeout_s)
    finally:
        # Interrupted: no new requests, the stages go (what is in flight fails at once), then the traffic ends.
        if traffic is not None:
            traffic.stop(wait=False)
        stack.stop()
        if traffic is not None:
            traffic.stop()
    print("\n" + report(args, phases, traffic.outcomes, checks, logs))
    if args.json:
        write_json(args.json, stack, phases, traffic.outcomes, checks)
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    stage_runs.run(main, "stages stopped, network set-up removed")
