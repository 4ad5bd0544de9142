"""`python -m deploy.local --model DIR`: the whole pipeline on one machine (what `make serve` runs).

Starts vision_svc, llm_svc and the gateway as separate processes on loopback, exactly as they would run
on separate machines, waits until each is healthy, prints where to send requests, and stops all three on
Ctrl-C or SIGTERM. Flags after `--llm-args` / `--vision-args` go to that stage unchanged (device, dtype,
tensor parallelism, ...).
"""

import argparse
import base64
import io
import json
import os
import pathlib
import shlex
import signal
import socket
import subprocess
import sys
import time

import grpc
import httpx
from grpc_health.v1 import health_pb2, health_pb2_grpc

# CPU defaults, so that the embedded tiny model serves on a laptop: an in-process engine starts in seconds,
# and vLLM's CPU backend needs an explicit KV cache size.
CPU_ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
CPU_ENGINE_FLAGS = ["--kv-cache-memory-bytes", str(1 << 30), "--max-model-len", "8192", "--enforce-eager"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stage:
    """One stage process; ready when its health check says so: gRPC health, or `GET /health` for HTTP servers."""

    def __init__(self, name: str, module_args: list[str], port: int, log_path: pathlib.Path | None = None,
                 env: dict | None = None, http_health: bool = False):
        self.name, self.port = name, port
        self.http_health = http_health
        self.address = f"127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb") if log_path else None
        self.proc = subprocess.Popen([sys.executable, "-m", *module_args], stdout=self._log,
                                     stderr=subprocess.STDOUT if self._log else None,
                                     env={**os.environ, **(env or {})})

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-8000:] if self.log_path else ""

    def wait_ready(self, timeout_s: float = 600.0) -> "Stage":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}\n{self.logs()}")
            if self.healthy():
                return self
            time.sleep(0.25)
        raise TimeoutError(f"{self.name} not healthy after {timeout_s:.0f} s\n{self.logs()}")

    def healthy(self) -> bool:
        if self.http_health:
            try:
                return httpx.get(f"http://{self.address}/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False
        with grpc.insecure_channel(self.address) as channel:
            try:
                response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.RpcError:
                return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def vision_stage(model: pathlib.Path, port: int, extra: list[str], log_path=None) -> Stage:
    return Stage("vision_svc", ["vision_svc", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
                                *extra], port, log_path)


def llm_stage(model: pathlib.Path, vision: list[Stage], port: int, extra: list[str], log_path=None,
              cpu_defaults: bool = True) -> Stage:
    defaults = [*(CPU_ENGINE_FLAGS if cpu_defaults else []), "--served-model-name", model.resolve().name]
    if "llm_config" in json.loads((model / "config.json").read_text()):
        # The original OpenGVLab layout ships its config classes as code; vLLM runs them only when allowed.
        defaults.append("--trust-remote-code")
    return Stage("llm_svc", ["llm_svc", "--model", str(model), "--vision", ",".join(v.address for v in vision),
                             "--host", "127.0.0.1", "--port", str(port), *defaults, *extra], port, log_path,
                 env=CPU_ENGINE_ENV if cpu_defaults else None)


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


def _stop_on_sigterm(*_) -> None:
    raise KeyboardInterrupt  # the same clean stop as Ctrl-C


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m deploy.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=pathlib.Path, required=True, help="InternVL checkpoint directory")
    parser.add_argument("--host", default="127.0.0.1", help="address of the gateway (the only public stage)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of the gateway")
    parser.add_argument("--vision-port", type=int, default=0, help="gRPC port of vision_svc (0: any free one)")
    parser.add_argument("--llm-port", type=int, default=0, help="gRPC port of llm_svc (0: any free one)")
    parser.add_argument("--accelerator", action="store_true",
                        help="do not add the CPU engine defaults (KV cache size, eager mode, in-process engine)")
    parser.add_argument("--vision-args", default="", help="extra flags for vision_svc, one quoted string")
    parser.add_argument("--llm-args", default="", help="extra flags for llm_svc (vLLM engine flags), one string")
    parser.add_argument("--gateway-args", default="", help="extra flags for the gateway, one string")
    args = parser.parse_args()
    if not (args.model / "config.json").exists():
        parser.error(f"{args.model} has no config.json: not a checkpoint directory")

    stages: list[Stage] = []
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        # Each stage is listed as soon as it exists, so that a failed or interrupted start stops it too.
        vision = vision_stage(args.model, args.vision_port or free_port(), shlex.split(args.vision_args))
        stages.append(vision)
        vision.wait_ready()
        llm = llm_stage(args.model, [vision], args.llm_port or free_port(), shlex.split(args.llm_args),
                        cpu_defaults=not args.accelerator)
        stages.append(llm)
        llm.wait_ready()
        gateway = gateway_stage([llm], args.host, args.port, shlex.split(args.gateway_args))
        stages.append(gateway)
        gateway.wait_ready()
        model_name = httpx.get(f"http://{gateway.address}/v1/models").json()["data"][0]["id"]
        print(f"\nServing {model_name} at http://{args.host}:{args.port}/v1 "
              f"(vision_svc {vision.address}, llm_svc {llm.address}). Try:\n\n"
              f"{example_request(args.port, model_name)}\n\nCtrl-C stops all three.", flush=True)
        while all(s.proc.poll() is None for s in stages):
            time.sleep(0.5)
        dead = [s.name for s in stages if s.proc.poll() is not None]
        print(f"{', '.join(dead)} exited; stopping the others", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("\nstopping...", file=sys.stderr)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):  # a second Ctrl-C must not cut the stop short
            signal.signal(sig, signal.SIG_IGN)
        for stage in reversed(stages):  # the gateway first, so no new work reaches the stages behind it
            stage.stop()


if __name__ == "__main__":
    main()
