"""The stages of the fault bench: two vision_svc replicas, two llm_svc replicas (each given both vision replicas)
and one gateway, on this machine. vision-0 is reached through the bench's fault proxy; vision-1 runs in a network
namespace of its own when one can be made (else on loopback). Replicas can be killed and started again at the
same address.
"""

import dataclasses
import pathlib
from collections.abc import Callable

from bench import netns
from bench.fault_proxy import FaultProxy
from bench.stage_probes import scrape_or_empty
from deploy.local import Stage, free_port, gateway_stage, llm_stage, vision_stage

START_TIMEOUT_S = 300.0
ENGINE_FLAGS = ["--kv-cache-memory-bytes", str(512 << 20), "--max-model-len", "4096", "--max-num-seqs", "8"]


@dataclasses.dataclass(frozen=True)
class Target:
    """An address to give a stage in place of a Stage (the launcher's helpers read `.address`)."""
    address: str


@dataclasses.dataclass
class Replica:
    """A gRPC stage the bench may kill and start again at the same address; each incarnation logs to a file of
    its own."""
    label: str
    launch: Callable[[pathlib.Path], Stage]  # log path -> the stage, started
    metrics_address: str
    served_counter: str  # the metric that counts the requests it served
    logs: pathlib.Path
    stage: Stage | None = None
    incarnation: int = 0

    def log_path(self, incarnation: int) -> pathlib.Path:
        return self.logs / f"{self.label}.{incarnation}.log"

    def start(self) -> Stage:
        self.stage = self.launch(self.log_path(self.incarnation))
        return self.stage

    def kill_and_start_again(self) -> Stage:
        self.stage.kill()
        self.stage.stop()  # closes its log
        self.incarnation += 1
        return self.start()

    def served(self) -> float:
        return scrape_or_empty(self.metrics_address).get(self.served_counter, 0.0)


class NamespacedStage(Stage):
    """A stage whose process runs inside a network namespace, reached at that namespace's address."""

    def __init__(self, name: str, module_args: list[str], host: str, port: int, log_path: pathlib.Path):
        super().__init__(name, module_args, port, log_path)
        self.address = self.health_address = f"{host}:{port}"


@dataclasses.dataclass
class Stack:
    vision: list[Replica]
    llm: list[Replica]
    gateway: Stage | None = None
    proxy: FaultProxy | None = None  # in front of vision-0
    namespace: netns.VethNamespace | None = None  # around vision-1

    def stages(self) -> list[Stage]:
        return [s for s in (*(r.stage for r in self.vision + self.llm), self.gateway) if s is not None]

    def stop(self) -> None:
        """Gateway first, then llm_svc, then vision_svc; then the proxy and the namespace. Safe to call twice."""
        for stage in reversed(self.stages()):
            stage.stop(15)
        if self.proxy is not None:
            self.proxy.close()
        if self.namespace is not None:
            self.namespace.delete()


def vision_replica(label: str, model: pathlib.Path, logs: pathlib.Path, namespace: netns.VethNamespace | None,
                   args) -> Replica:
    port, metrics_port = free_port(), free_port()
    host = namespace.inside_address if namespace else "127.0.0.1"
    # One worker process: the fault phases stop it (bench.fault_phases.preprocessing_worker).
    flags = ["--preprocess-workers", "1", "--preprocess-pool", "processes", "--grace-s", "2",
             "--metrics-port", str(metrics_port), "--stall-timeout-s", str(args.stall_timeout_s)]

    def launch(log_path: pathlib.Path) -> Stage:
        if namespace is None:
            return vision_stage(model, port, flags, log_path)
        args = ["--model", str(model), "--host", host, "--port", str(port), *flags]
        return NamespacedStage("vision_svc", namespace.module_args("vision_svc", *args), host, port, log_path)
    return Replica(label, launch, f"{host}:{metrics_port}", 'vision_requests_total{code="OK"}', logs)


def llm_replica(label: str, model: pathlib.Path, vision: list[Target], args, logs: pathlib.Path) -> Replica:
    port, metrics_port = free_port(), free_port()
    flags = [*ENGINE_FLAGS, "--vision-timeout-s", str(args.vision_timeout_s), "--grace-s", "2",
             "--metrics-port", str(metrics_port)]
    return Replica(label, lambda log_path: llm_stage(model, vision, port, flags, log_path),
                   f"127.0.0.1:{metrics_port}", 'llm_svc_requests_total{code="OK"}', logs)


def start_stack(args, model: pathlib.Path, logs: pathlib.Path, stack: Stack) -> None:
    """Fills `stack` as it starts things, so that a failed start is cleaned up by the caller's `stack.stop()`.
    Stages are started from this (the main) thread: they get SIGTERM when the thread that started them ends."""
    if stack.namespace is not None:
        stack.namespace.create()
    stack.vision = [vision_replica("vision-0", model, logs, None, args),
                    vision_replica("vision-1", model, logs, stack.namespace, args)]
    for replica in stack.vision:
        replica.start()
    for replica in stack.vision:
        replica.stage.wait_ready(START_TIMEOUT_S)
    stack.proxy = FaultProxy("127.0.0.1", stack.vision[0].stage.port)
    vision_targets = [Target(stack.proxy.start()), Target(stack.vision[1].stage.address)]
    stack.llm = [llm_replica(f"llm-{n}", model, vision_targets, args, logs) for n in range(2)]
    for replica in stack.llm:
        replica.start()
    for replica in stack.llm:
        replica.stage.wait_ready(START_TIMEOUT_S)
    stack.gateway = gateway_stage([Target(r.stage.address) for r in stack.llm], "127.0.0.1", free_port(),
                                  ["--request-timeout-s", str(args.request_timeout_s), "--shutdown-grace-s", "2"],
                                  logs / "gateway.log").wait_ready(START_TIMEOUT_S)
