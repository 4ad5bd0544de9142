"""`python -m deploy.local --model DIR`: the whole pipeline on one machine (what `make serve` runs).

Starts vision_svc, llm_svc and the gateway as separate processes on loopback, exactly as they would run
on separate machines, waits until each is healthy, prints where to send requests, and stops all three on
Ctrl-C or SIGTERM. Flags after `--llm-args` / `--vision-args` go to that stage unchanged (device, dtype,
tensor parallelism, ...). With `--trace` every stage exports its spans to a small OTLP receiver in the launcher,
which prints them; `--otlp-traces-endpoint` sends them to a collector instead.
"""

from deploy import fork_safe_grpc  # noqa: F401,I001  (first: before anything imports grpc)

import argparse
import base64
import collections
import contextlib
import functools
import io
import json
import os
import pathlib
import random
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

from deploy.trace_collector import TraceCollector, span_line
from protos import lifetime

LOG_TAIL_LINES = 40
# How long the helpers of stopped stages may take to end (their orphan guards wait up to 7 s) before the
# launcher reports them.
LEFTOVER_WAIT_S = 10.0


# Ports `free_port` handed out: their stages bind them later, so none may be handed out twice.
_handed_out: set[int] = set()
# free_port picks below the kernel's ephemeral range: a port from that range (what binding port 0 gives) may be
# taken, before its stage binds it, by any socket that gets an ephemeral port: an outgoing connection, or another
# stage's listener on port 0 (once a test stack's llm_svc failed to start so: "Address already in use").
FIRST_FREE_PORT = 10000


def free_port() -> int:
    """A loopback port that nothing listens on now, for a stage to bind soon."""
    ephemeral_start = ephemeral_port_range_start()
    if ephemeral_start - FIRST_FREE_PORT >= 1000:
        for port in random.sample(range(FIRST_FREE_PORT, ephemeral_start), 200):
            if port not in _handed_out and _bindable(port):
                _handed_out.add(port)
                return port
    with socket.socket() as s:  # a machine whose ephemeral range leaves no room below it: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ephemeral_port_range_start() -> int:
    """The first port the kernel hands out as an ephemeral one (an outgoing connection's, a listener on port 0)."""
    try:
        return int(pathlib.Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def flag_value(args: list[str], flag: str) -> str | None:
    """The value the last `flag V` or `flag=V` in `args` gives, or None."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


class Stage:
    """One stage process; ready when its health check says so: gRPC health, or `GET /health` for HTTP servers.
    A stage given `--health-port` is asked there, in plaintext, since its main port may speak TLS only.

    Each stage leads a process group of its own, so that a terminal's Ctrl-C reaches the launcher alone and
    the launcher stops the stages in order; and each gets SIGTERM from the kernel if the launcher dies
    (strictly, when the thread that started it ends: start stages from a thread that lives as long). Its
    output goes to `log_path`, or else to our own output, each line prefixed with the stage's name.
    """

    def __init__(self, name: str, module_args: list[str], port: int, log_path: pathlib.Path | None = None,
                 env: dict | None = None, http_health: bool = False, cwd: str | None = None):
        self.name, self.port = name, port
        self.http_health = http_health
        self.address = f"127.0.0.1:{port}"
        health_port = flag_value(module_args, "--health-port")
        self.health_address = f"127.0.0.1:{health_port}" if health_port else self.address
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else None
        self._tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.proc = subprocess.Popen([sys.executable, "-m", *module_args],
                                     stdout=self._log or subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})}, cwd=cwd, process_group=0,
                                     preexec_fn=functools.partial(lifetime.set_parent_death_signal, signal.SIGTERM))
        if self._log is None:
            threading.Thread(target=self._echo, name=f"{name}-output", daemon=True).start()

    def _echo(self) -> None:
        for line in iter(self.proc.stdout.readline, b""):
            text = line.decode(errors="replace").rstrip("\n")
            self._tail.append(text)
            print(f"{self.name:<10} | {text}", flush=True)

    def logs(self) -> str:
        """The last lines of the stage's output."""
        if self.log_path:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
        return "\n".join(self._tail)

    def failure(self, what: str) -> str:
        return f"{self.name} {what}; its last output:\n{self.logs()}"

    def wait_ready(self, timeout_s: float = 600.0) -> "Stage":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise StageFailed(self.failure(f"exited with status {self.proc.returncode} while starting"))
            if self.healthy():
                return self
            time.sleep(0.25)
        raise StageFailed(self.failure(f"not healthy after {timeout_s:.0f} s"))

    def healthy(self) -> bool:
        if self.http_health:
            try:
                return httpx.get(f"http://{self.address}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        with grpc.insecure_channel(self.health_address) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, which drains the stage; SIGKILL to its whole group if it has not ended within `timeout_s`."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.kill_group()
        self.proc.wait()
        if self._log:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """The stage alone dies at once, as in a crash; its orphan guard stops its children."""
        self.proc.kill()
        self.proc.wait()

    def kill_group(self) -> None:
        """The stage and every process of its group die at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class StageFailed(RuntimeError):
    """A stage exited or did not become healthy; the message holds its last output."""


def with_health_port(extra: list[str]) -> list[str]:
    """A gRPC stage serving TLS answers plaintext health checks only on its --health-port: one is picked when the
    flags give none."""
    if flag_value(extra, "--tls-cert") is not None and flag_value(extra, "--health-port") is None:
        return [*extra, "--health-port", str(free_port())]
    return extra


def vision_stage(model: pathlib.Path, port: int, extra: list[str], log_path=None) -> Stage:
    return Stage("vision_svc", ["vision_svc", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                                *with_health_port(extra)], port, log_path)


def llm_stage(model: pathlib.Path, vision: list[Stage], port: int, extra: list[str], log_path=None) -> Stage:
    # On a CPU, llm_svc itself picks the engine flags that work there (KV cache size, context, eager mode).
    defaults = ["--served-model-name", model.resolve().name]
    if "llm_config" in json.loads((model / "config.json").read_text()):
        # The original OpenGVLab layout ships its config classes as code; vLLM runs them only when allowed.
        defaults.append("--trust-remote-code")
    return Stage("llm_svc", ["llm_svc", "--model", str(model), "--vision", ",".join(v.address for v in vision),
                             "--host", "127.0.0.1", "--port", str(port), *defaults, *with_health_port(extra)], port,
                 log_path)


def gateway_stage(llm: list[Stage], host: str, port: int, extra: list[str], log_path=None) -> Stage:
    return Stage("gateway", ["gateway", "--llm", ",".join(s.address for s in llm), "--host", host,
                             "--port", str(port), *extra], port, log_path, http_health=True)


def example_request(port: int, model: str) -> str:
    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    body = {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": "Describe the image."}]}]}
    return (f"curl -s http://127.0.0.1:{port}/v1/chat/completions -H 'Content-Type: application/json' "
            f"-d {shlex.quote(json.dumps(body))}")


class Interrupted(Exception):
    """Ctrl-C (SIGINT) or SIGTERM: stop the stages in order."""

    def __init__(self, sig: int):
        super().__init__(signal.Signals(sig).name)
        self.signal = sig


def _interrupt(sig, _frame) -> None:
    raise Interrupted(sig)


def process_snapshot(stages: list[Stage]) -> dict[int, int]:
    """pid -> start time of every process the stages are made of, their helpers included."""
    pids = [p for stage in stages for p in (stage.proc.pid, *lifetime.descendants(stage.proc.pid))]
    return lifetime.snapshot(pids)


def left_running(processes: dict[int, int], wait_s: float) -> list[str]:
    """What still runs of `processes` after up to `wait_s`, each as 'PID command line'."""
    deadline = time.monotonic() + wait_s
    while (left := lifetime.still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [f"{pid} {command_line(pid)}" for pid in left]


def command_line(pid: int) -> str:
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "(ended)"


def stop_in_order(stages: list[Stage]) -> None:
    """The gateway first, so that no new work reaches the stages behind it, then llm_svc, then vision_svc; each
    gets its grace period to finish what is in flight. From here on a second Ctrl-C (or SIGTERM) kills them
    all at once, and whatever they left behind is reported."""
    def kill_all(*_):
        print("\nsecond interrupt: killing all stages", file=sys.stderr, flush=True)
        for stage in stages:
            stage.kill_group()

    signal.signal(signal.SIGINT, kill_all)
    signal.signal(signal.SIGTERM, kill_all)
    snapshot = process_snapshot(stages)
    for stage in reversed(stages):
        stage.stop()
    left = left_running(snapshot, LEFTOVER_WAIT_S)
    if left:
        print("still running after the stop:\n  " + "\n  ".join(left), file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int | None:
    """Serves until interrupted; returns the signal that ended it, or None when a stage failed."""
    stages: list[Stage] = []
    ended_by = None
    collector = TraceCollector(on_spans=print_spans) if args.trace else None
    traces_to = collector.start() if collector is not None else args.otlp_traces_endpoint
    tracing = ["--otlp-traces-endpoint", traces_to] if traces_to else []
    try:
        # Each stage is listed as soon as it exists, so that a failed or interrupted start stops it too.
        vision = vision_stage(args.model, args.vision_port or free_port(), [*shlex.split(args.vision_args), *tracing])
        stages.append(vision)
        vision.wait_ready()
        llm = llm_stage(args.model, [vision], args.llm_port or free_port(), [*shlex.split(args.llm_args), *tracing])
        stages.append(llm)
        llm.wait_ready()
        gateway = gateway_stage([llm], args.host, args.port, [*shlex.split(args.gateway_args), *tracing])
        stages.append(gateway)
        gateway.wait_ready()
        model_name = httpx.get(f"http://{gateway.address}/v1/models").json()["data"][0]["id"]
        print(f"\nServing {model_name} at http://{args.host}:{args.port}/v1 "
              f"(vision_svc {vision.address}, llm_svc {llm.address}). Try:\n\n"
              f"{example_request(args.port, model_name)}\n\n{tracing_note(collector, traces_to)}"
              "Ctrl-C stops all three.", flush=True)
        while all(s.proc.poll() is None for s in stages):
            time.sleep(0.5)
        dead = next(s for s in stages if s.proc.poll() is not None)
        print(dead.failure(f"exited with status {dead.proc.returncode}") + "\nstopping the others",
              file=sys.stderr, flush=True)
    except StageFailed as failure:
        print(failure, file=sys.stderr, flush=True)
    except Interrupted as interrupt:
        print(f"\n{interrupt}: stopping the stages, gateway first (Ctrl-C again kills them)", file=sys.stderr,
              flush=True)
        ended_by = interrupt.signal
    finally:
        stop_in_order(stages)  # each stage exports its last spans as it stops
        if collector is not None:
            collector.stop()
    return ended_by


def print_spans(spans) -> None:
    for span in spans:
        print(f"{'trace':<10} | {span_line(span)}", flush=True)


def tracing_note(collector: TraceCollector | None, traces_to: str | None) -> str:
    if collector is not None:
        return (f"Tracing: the stages export spans to the collector in this launcher ({traces_to}), which prints "
                "them here, one line each ('trace |').\n")
    if traces_to:
        return f"Tracing: the stages export spans over OTLP to {traces_to}; look them up in its UI.\n"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=pathlib.Path, required=True, help="InternVL checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address of the gateway (the only public stage)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the gateway")
    parser.add_argument("--vision-port", type=int, default=0, help="gRPC port of vision_svc (0: any free one)")
    parser.add_argument("--llm-port", type=int, default=0, help="gRPC port of llm_svc (0: any free one)")
    parser.add_argument("--vision-args", default="", help="extra flags for vision_svc, one quoted string")
    parser.add_argument("--llm-args", default="", help="extra flags for llm_svc (vLLM engine flags), one string")
    parser.add_argument("--gateway-args", default="", help="extra flags for the gateway, one string")
    traces = parser.add_mutually_exclusive_group()
    traces.add_argument("--trace", action="store_true",
                        help="trace every request: the stages export OpenTelemetry spans to a small collector in "
                             "this launcher, which prints them")
    traces.add_argument("--otlp-traces-endpoint", metavar="URL", default=None,
                        help="trace every request: the stages export OpenTelemetry spans over OTLP to this "
                             "collector (Jaeger, Tempo, an OpenTelemetry Collector: HOST:4317 for gRPC)")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        parser.error(f"{args.model} has no config.json: not a checkpoint directory")
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    ended_by = run(args)
    if ended_by is None:
        sys.exit(1)
    # End as an interrupted program does, by the signal itself: a shell or make then reports an interrupt,
    # not a failure.
    signal.signal(ended_by, signal.SIG_DFL)
    os.kill(os.getpid(), ended_by)


if __name__ == "__main__":
    main()
