"""The phases of the fault bench: each a fault applied to the running stack (a replica killed and started again, a
network fault for a while), and the moments it happened on the traffic's clock."""

import dataclasses
import os
import signal
import time
from collections.abc import Callable

import psutil

from bench.fault_proxy import NO_FAULT, Fault
from bench.fault_stack import START_TIMEOUT_S, Replica, Stack
from bench.traffic import Traffic

PHASE_COUNT = 8  # the partition, the last, needs a namespace


@dataclasses.dataclass
class Phase:
    name: str
    fault: str
    mechanism: str
    act: Callable[["Phase", Traffic], None] | None = None
    skipped: str | None = None  # why the phase did not run
    started: float = 0.0  # times on the traffic's clock
    fault_at: float | None = None
    healed_at: float | None = None
    ready_at: float | None = None  # a restarted replica: healthy
    serving_at: float | None = None  # a restarted replica: has served a request
    ended: float = 0.0


def kill_and_restart(replica: Replica) -> Callable[[Phase, Traffic], None]:
    def act(phase: Phase, traffic: Traffic) -> None:
        phase.fault_at = traffic.now()
        replica.kill_and_start_again().wait_ready(START_TIMEOUT_S)
        phase.ready_at = traffic.now()
        deadline = time.monotonic() + START_TIMEOUT_S
        while replica.served() == 0 and time.monotonic() < deadline:
            time.sleep(0.25)
        if replica.served() > 0:
            phase.serving_at = traffic.now()
    return act


def fault_for(apply: Callable[[], None], heal: Callable[[], None], fault_s: float) -> Callable[[Phase, Traffic], None]:
    def act(phase: Phase, traffic: Traffic) -> None:
        phase.fault_at = traffic.now()
        try:
            apply()
            time.sleep(fault_s)
        finally:
            heal()
            phase.healed_at = traffic.now()
    return act


def preprocessing_worker(replica: Replica) -> psutil.Process:
    """The one preprocessing worker of a vision replica (`--preprocess-workers 1`): a spawned child, not
    multiprocessing's resource tracker."""
    workers = [child for child in psutil.Process(replica.stage.proc.pid).children(recursive=True)
               if "spawn_main" in (line := " ".join(child.cmdline())) and "resource_tracker" not in line]
    if len(workers) != 1:
        raise RuntimeError(f"{replica.label}: expected one preprocessing worker, found {len(workers)}")
    return workers[0]


def stop_for(replica: Replica, fault_s: float) -> Callable[[Phase, Traffic], None]:
    """SIGSTOP to the replica's preprocessing worker for `fault_s`, then SIGCONT: a worker that does not return."""
    stopped: list[psutil.Process] = []

    def stop() -> None:
        stopped.append(preprocessing_worker(replica))
        stopped[0].send_signal(signal.SIGSTOP)

    def resume() -> None:
        for worker in stopped:
            worker.send_signal(signal.SIGCONT)
    return fault_for(stop, resume, fault_s)


def plan(args, stack: Stack, namespace_problem: str | None, netem: bool, fault_s: float) -> list[Phase]:
    proxy, namespace = stack.proxy, stack.namespace
    proxy_hop = "fault proxy (user-space TCP, bench.fault_proxy) on llm_svc -> vision-0"
    delay_ms, loss = args.delay_ms, args.loss_percent
    if netem:
        netem_hop = "tc netem on the veth pair of vision-1"
        delay = Phase("delay", f"+{delay_ms} ms each way for {fault_s:.0f} s", netem_hop,
                      fault_for(lambda: namespace.netem("delay", f"{delay_ms}ms"), namespace.netem, fault_s))
        lossy = Phase("loss", f"{loss:g}% of packets dropped for {fault_s:.0f} s", netem_hop,
                      fault_for(lambda: namespace.netem("loss", f"{loss:g}%"), namespace.netem, fault_s))
    else:
        slow, resets = Fault(delay_s=delay_ms / 1e3), Fault(reset_probability=args.reset_probability)
        delay = Phase("delay", f"{slow.describe()}, for {fault_s:.0f} s", proxy_hop + " (no netem in this kernel)",
                      fault_for(lambda: proxy.set_fault(slow), lambda: proxy.set_fault(NO_FAULT), fault_s))
        lossy = Phase("loss", f"{resets.describe()}, for {fault_s:.0f} s", proxy_hop + " (no netem in this kernel)",
                      fault_for(lambda: proxy.set_fault(resets), lambda: proxy.set_fault(NO_FAULT), fault_s))
    blackhole = Fault(blackhole=True)
    phases = [
        Phase("baseline", "none", "-"),
        Phase("vision kill -9", "SIGKILL to vision-1, started again at once at the same address", "kill -9",
              kill_and_restart(stack.vision[1])),
        Phase("llm_svc kill -9", "SIGKILL to llm-1, started again at once at the same address", "kill -9",
              kill_and_restart(stack.llm[1])),
        delay, lossy,
        Phase("blackhole", f"{blackhole.describe()}, for {fault_s:.0f} s", proxy_hop,
              fault_for(lambda: proxy.set_fault(blackhole), lambda: proxy.set_fault(NO_FAULT), fault_s)),
        Phase("stuck worker", f"vision-0's preprocessing worker stopped for {fault_s:.0f} s (the process answers "
              "pings and health)", "SIGSTOP / SIGCONT", stop_for(stack.vision[0], fault_s)),
    ]
    partition = Phase("partition", f"link to vision-1 down for {fault_s:.0f} s",
                      "network namespace + veth pair, `ip link set veth0 down` inside it")
    if namespace is None:
        partition.skipped = namespace_problem
    else:
        partition.act = fault_for(namespace.cut, namespace.restore, fault_s)
    return [*phases, partition]


def wait_until(traffic: Traffic, moment: float) -> None:
    while traffic.now() < moment:
        time.sleep(min(0.2, moment - traffic.now()))


def run_phases(phases: list[Phase], traffic: Traffic, phase_s: float, lead_in_s: float) -> None:
    for phase in (p for p in phases if p.skipped is None):
        phase.started = traffic.now()
        wait_until(traffic, phase.started + lead_in_s)
        # Until the requests of the phases before have ended: this phase's fault then reaches its own requests only.
        while any(sent < phase.started for sent in list(traffic.open.values())):
            time.sleep(0.1)
        if phase.act is not None:
            phase.act(phase, traffic)
        wait_until(traffic, phase.started + phase_s)
        phase.ended = traffic.now()
        print(f"{traffic.now():6.0f} s  {phase.name} done, load average {os.getloadavg()[0]:.1f}", flush=True)
