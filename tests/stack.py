"""Runs the real stages as subprocesses on loopback ports for end-to-end tests, with the same launcher
as `make serve` (`deploy.local`), plus small CPU settings that keep the suite fast."""

import glob
import os
import pathlib
import signal
import subprocess
import tempfile
import time

from deploy.local import Stage, free_port, gateway_stage, llm_stage, vision_stage
from protos import lifetime

# fp32 so that greedy tokens can be compared with the fp32 references; a small KV cache, context and batch.
TEST_ENGINE_FLAGS = ["--kv-cache-memory-bytes", str(256 << 20), "--max-model-len", "8192", "--max-num-seqs", "8",
                     "--dtype", "float32", "--grace-s", "5"]


def start_vision(model: pathlib.Path, log_dir: pathlib.Path, *extra: str) -> Stage:
    port = free_port()
    return vision_stage(model, port, ["--preprocess-workers", "0", "--grace-s", "5", *extra],
                        log_dir / f"vision-{port}.log")


def start_llm(model: pathlib.Path, vision: list[Stage], log_dir: pathlib.Path, *extra: str) -> Stage:
    port = free_port()
    return llm_stage(model, vision, port, [*TEST_ENGINE_FLAGS, *extra], log_dir / f"llm-{port}.log")


def start_gateway(llm: list[Stage], log_dir: pathlib.Path, *extra: str) -> Stage:
    port = free_port()
    return gateway_stage(llm, "127.0.0.1", port, list(extra), log_dir / f"gateway-{port}.log")


def stop_all(stages: list[Stage], timeout_s: float = 60.0) -> None:
    """Stops `stages` together: SIGTERM to each, in the order given, then SIGKILL to the group of any that has not
    ended within `timeout_s`, as `Stage.stop` does for one. Most of a stop is waiting (drains, vLLM's engine
    shutdown), so a fixture's stages are stopped at once rather than one after another."""
    for stage in stages:
        if stage.proc.poll() is None:
            stage.proc.send_signal(signal.SIGTERM)
    for stage in stages:
        try:
            stage.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stage.kill_group()
        stage.stop()  # it has ended: this closes its log


class StageProcesses:
    """The processes a stage is made of (it and everything below it) and the shared memory they map, as seen
    by each `add`."""

    def __init__(self):
        self.processes: dict[int, int] = {}
        self.files: set[str] = set()  # shared memory, and the stage's own temporary directory

    def add(self, stage: Stage) -> "StageProcesses":
        pids = [stage.proc.pid, *lifetime.descendants(stage.proc.pid)]
        self.processes |= lifetime.snapshot(pids)
        self.files |= set().union(*map(lifetime.mapped_shared_memory, pids))
        self.files |= set(glob.glob(f"{tempfile.gettempdir()}/{lifetime.TMP_PREFIX}{stage.proc.pid}-*"))
        return self

    def assert_all_gone(self, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (left := lifetime.still_running(self.processes)) or \
                (files := [path for path in self.files if os.path.exists(path)]):
            assert time.monotonic() < deadline, f"still running: {left}; files left: {files}"
            time.sleep(0.2)
