"""However llm_svc ends, vLLM's engine core and multiprocessing's helpers end with it, and the shared memory
they made is gone."""

import os
import signal
import socket
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


@pytest.fixture(scope="module")
def llm_to_end_by(tiny_checkpoint, vision, tmp_path_factory):
    """`llm_to_end_by(sig)` -> a ready llm_svc of its own for the test that ends it with `sig`. Starting is the slow
    part and runs mostly on one CPU, so the next test's llm_svc starts along with this one's (two at a time, not
    all: each holds an engine)."""
    logs = tmp_path_factory.mktemp("llm")
    started: dict[int, Stage] = {}

    def get(sig: int) -> Stage:
        for upcoming in SIGNALS[SIGNALS.index(sig):][:2]:
            if upcoming not in started:
                started[upcoming] = start_llm(tiny_checkpoint(), [vision], logs)
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


def test_nothing_of_llm_svc_outlives_a_failed_start(tiny_checkpoint, vision, tmp_path):
    with socket.socket() as taken:  # the engine starts, then the gRPC port cannot be bound
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        llm = start_llm(tiny_checkpoint(), [vision], tmp_path, "--port", str(taken.getsockname()[1]))
        processes = StageProcesses()
        while llm.proc.poll() is None:  # note every process it starts, until it exits
            processes.add(llm)
            time.sleep(0.2)
    assert llm.proc.returncode != 0 and "cannot bind" in llm.logs()
    assert len(processes.processes) >= 3  # the stage, its guard, the engine core
    processes.assert_all_gone()
