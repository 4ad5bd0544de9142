"""However llm_svc ends, vLLM's engine core and multiprocessing's helpers end with it, and the shared memory
they made is gone."""

import os
import signal
import socket
import threading
import time

import pytest

from deploy.local import Stage
from protos import llm_pb2
from tests.llm_svc.llm_helpers import LlmClient, chat, greedy, image
from tests.stack import StageProcesses, start_llm, start_vision, stop_all


@pytest.fixture(scope="module")
def vision(tiny_checkpoint, tmp_path_factory):
    stage = start_vision(tiny_checkpoint(), tmp_path_factory.mktemp("logs")).wait_ready()
    yield stage
    stage.stop()


SIGNALS = [signal.SIGINT, signal.SIGTERM, signal.SIGKILL]


class FailedStart:
    """An llm_svc whose gRPC port is taken: its engine starts, then the port cannot be bound. Every process it starts
    is noted, from a thread, until it exits."""

    def __init__(self, model, vision: Stage, logs):
        self._start = lambda port: start_llm(model, [vision], logs, "--port", str(port))
        self._taken = socket.socket()
        self._watch = threading.Thread(target=self._note_processes, daemon=True)
        self.llm: Stage | None = None
        self.processes = StageProcesses()

    def begin(self) -> None:
        if self.llm is None:
            self._taken.bind(("127.0.0.1", 0))
            self._taken.listen()
            self.llm = self._start(self._taken.getsockname()[1])
            self._watch.start()

    def ended(self) -> Stage:
        self.begin()
        self._watch.join(300)
        assert not self._watch.is_alive(), "llm_svc still running with its port taken"
        return self.llm

    def _note_processes(self) -> None:
        while self.llm.proc.poll() is None:
            self.processes.add(self.llm)
            time.sleep(0.2)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.stop()
        self._taken.close()


@pytest.fixture(scope="module")
def failed_start(tiny_checkpoint, vision, tmp_path_factory):
    start = FailedStart(tiny_checkpoint(), vision, tmp_path_factory.mktemp("failed"))
    yield start
    start.close()


@pytest.fixture(scope="module")
def llm_to_end_by(tiny_checkpoint, vision, failed_start, tmp_path_factory):
    """`llm_to_end_by(sig)` -> a ready llm_svc of its own for the test that ends it with `sig`. Starting is the slow
    part and runs mostly on one CPU, so the next test's llm_svc starts along with this one's (two at a time, not
    all: each holds an engine); after the last signal's comes the failed start's."""
    logs = tmp_path_factory.mktemp("llm")
    started: dict[int, Stage] = {}

    def get(sig: int) -> Stage:
        for upcoming in SIGNALS[SIGNALS.index(sig):][:2]:
            if upcoming not in started:
                started[upcoming] = start_llm(tiny_checkpoint(), [vision], logs)
        if sig == SIGNALS[-1]:
            failed_start.begin()
        return started[sig].wait_ready()

    yield get
    stop_all(list(started.values()))  # any that a failed test left running, or that its test did not run for


@pytest.mark.parametrize("sig", SIGNALS)
def test_nothing_of_llm_svc_outlives_it(llm_to_end_by, sig):
    llm = llm_to_end_by(sig)
    client = LlmClient(llm.address)
    try:
        request = llm_pb2.GenerateRequest(chat=chat(("user", [image(640, 480, 3), "What is it?"])),
                                          sampling=greedy(4))
        assert len(client.tokens(request)) == 4
    finally:
        client.close()
    processes = StageProcesses().add(llm)
    # The stage, its orphan guard, vLLM's engine core and multiprocessing's resource tracker; the stage's
    # temporary directory, which holds vLLM's IPC sockets.
    assert len(processes.processes) >= 4 and processes.files
    # As a terminal does, SIGINT goes to the stage's whole process group (the stage leads it).
    os.killpg(llm.proc.pid, sig) if sig == signal.SIGINT else llm.proc.send_signal(sig)
    assert llm.proc.wait(60) == (-signal.SIGKILL if sig == signal.SIGKILL else 0)
    processes.assert_all_gone()
    assert "Traceback" not in llm.logs(), llm.logs()


def test_nothing_of_llm_svc_outlives_a_failed_start(failed_start):
    llm = failed_start.ended()
    assert llm.proc.returncode != 0 and "cannot bind" in llm.logs()
    assert len(failed_start.processes.processes) >= 3  # the stage, its guard, the engine core
    failed_start.processes.assert_all_gone()
