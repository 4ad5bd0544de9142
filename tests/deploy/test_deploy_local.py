"""`make serve` as a user meets it: the README's examples answer, llm_svc serves on what it picks for a CPU,
one Ctrl-C stops the stages in order while in-flight streams finish, a second Ctrl-C kills at once, nothing is
left running, and a stage that fails to start is reported with its output."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
from openai import OpenAI
from PIL import Image

from deploy.local import FIRST_FREE_PORT, ephemeral_port_range_start, free_port
from protos import lifetime, llm_pb2
from tests.llm_svc.llm_helpers import LlmClient, greedy
from tests.readme_examples import README, readme_example

ROOT = pathlib.Path(__file__).resolve().parents[2]


class Served:
    """A launcher (`make serve` or `python -m deploy.local`) in a session of its own, as a terminal runs it."""

    def __init__(self, command: list[str], log_path: pathlib.Path, port: int):
        self.port = port
        self.log_path = log_path
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_serving(self, timeout_s: float = 600) -> "Served":
        deadline = time.monotonic() + timeout_s
        while "\nServing " not in self.output():
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()[-5000:]
            time.sleep(0.5)
        return self

    def processes(self) -> dict[int, int]:
        return lifetime.snapshot([self.proc.pid, *lifetime.descendants(self.proc.pid)])

    def ctrl_c(self) -> None:
        """What a terminal does: SIGINT to the whole foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def kill(self) -> None:
        for pid in lifetime.still_running(self.processes()):
            os.kill(pid, signal.SIGKILL)

    def client(self) -> OpenAI:
        return OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key="none", max_retries=0)


def assert_all_gone(processes: dict[int, int], timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while left := lifetime.still_running(processes):
        assert time.monotonic() < deadline, f"still running: {left}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def launchers(tiny_checkpoint, tmp_path_factory):
    """Every launcher this module's tests run, started together when the first is asked for: a launcher starts
    its stages one after another, mostly on one CPU, so starting them one launcher after another is the slow part.
    `make serve`; a `deploy.local` whose gateway waits up to 300 s for in-flight streams when stopped (for the
    second Ctrl-C); and one whose llm_svc cannot start (its flags are invalid)."""
    logs = tmp_path_factory.mktemp("launchers")

    def local(*args: str) -> list[str]:
        return [sys.executable, "-m", "deploy.local", "--model", str(tiny_checkpoint()), *args]

    serve_port, long_grace_port = free_port(), free_port()
    started = {
        "make serve": Served(["make", "serve", f"PORT={serve_port}"], logs / "make.log", serve_port),
        "long grace": Served(local("--port", str(long_grace_port), "--gateway-args", "--shutdown-grace-s 300"),
                             logs / "long-grace.log", long_grace_port),
        "failing": Served(local("--port", str(free_port()), "--llm-args", "--max-num-seqs lots"), logs / "failing.log",
                          0),
    }
    yield started
    for served in started.values():
        served.kill()


@pytest.fixture(scope="module")
def make_serve(launchers):
    return launchers["make serve"].wait_serving()


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    # Below it, no outgoing connection or listener on port 0 can take a port before its stage binds it.
    ephemeral_start = ephemeral_port_range_start()
    if ephemeral_start < FIRST_FREE_PORT + 1000:
        pytest.skip(f"this machine's ephemeral ports start at {ephemeral_start}: free_port takes the kernel's pick")
    ports = [free_port() for _ in range(100)]
    assert len(set(ports)) == len(ports)
    assert all(port < ephemeral_start for port in ports)
    listener = socket.create_server(("127.0.0.1", ports[0]))  # free now, as it said
    listener.close()


def test_every_python_example_of_the_readme_is_run_by_a_test():
    """Each one is tagged; the grpc-client example runs in tests/llm_svc/test_llm_lifecycle.py, the
    structured-output one in tests/gateway/test_gateway_structured_outputs_e2e.py, the tools and thinking ones in
    tests/gateway/test_gateway_tools_e2e.py and tests/gateway/test_gateway_reasoning_e2e.py."""
    blocks = README.count("```python\n")
    tagged = re.findall(r"<!-- readme-example: ([\w-]+) -->\n```python\n", README)
    assert sorted(tagged) == ["grpc-client", "openai-client", "structured-output", "thinking", "tools"] \
        and blocks == len(tagged)


def test_readme_openai_example_runs_against_make_serve(make_serve, tmp_path):
    code = readme_example("openai-client").replace("127.0.0.1:8000", f"127.0.0.1:{make_serve.port}")
    (tmp_path / "example.py").write_text(code)
    Image.new("RGB", (640, 480), (40, 90, 200)).save(tmp_path / "photo.jpg")
    result = subprocess.run([sys.executable, "example.py", "photo.jpg"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), "no text streamed"


def test_the_request_make_serve_prints_answers(make_serve):
    curl = re.search(r"^curl .*$", make_serve.output(), re.M)[0]
    result = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=120)
    assert '"finish_reason":' in result.stdout and '"completion_tokens":' in result.stdout, result.stdout


def test_the_bare_llm_svc_of_make_serve_serves_the_model_s_own_context(make_serve):
    """`make serve` gives llm_svc no KV cache size, context length, eager flag or thread binding: what it picks on a
    CPU (tests/llm_svc/test_llm_cpu_defaults.py) makes it start and serve."""
    address = re.search(r"llm_svc (127\.0\.0\.1:\d+)\)", make_serve.output())[1]
    client = LlmClient(address)
    try:
        info = client.stub.GetModelInfo(llm_pb2.GetModelInfoRequest())
        tokens = client.tokens(llm_pb2.GenerateRequest(prompt="hello", sampling=greedy(3)))
    finally:
        client.close()
    # The model's own context length: its KV cache (~1 KiB a token) fits in what was picked.
    config = json.loads((ROOT / ".cache" / "tiny-internvl" / "config.json").read_text())
    assert info.max_model_len == config["llm_config"]["max_position_embeddings"]
    assert len(tokens) == 3


def test_one_ctrl_c_finishes_the_stream_stops_the_stages_in_order_and_leaves_nothing(make_serve):
    stream = make_serve.client().chat.completions.create(
        model="tiny-internvl", max_tokens=150, stream=True, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": "Tell me a story."}])
    chunks = [next(stream)]
    reader = threading.Thread(target=lambda: chunks.extend(stream))
    reader.start()
    processes = make_serve.processes()
    assert len(processes) >= 9  # make, the launcher, three stages, two guards, engine core, trackers, workers
    make_serve.ctrl_c()
    reader.join(60)
    assert chunks[-1].usage.completion_tokens == 150
    # Interrupted, not failed: make says "Interrupt".
    assert make_serve.proc.wait(120) == -signal.SIGINT, make_serve.output()
    assert_all_gone(processes)
    output = make_serve.output()
    assert "Traceback" not in output and "still running" not in output and "Error 1" not in output, output
    stops = [re.search(pattern, output, re.M).start() for pattern in (r"^gateway +\| .*Finished server process",
                                                                     r"^llm_svc +\| .*received SIGTERM",
                                                                     r"^vision_svc \| .*received SIGTERM")]
    assert stops == sorted(stops), "stages not stopped gateway first, vision_svc last"


def test_second_ctrl_c_kills_everything_at_once(launchers, tiny_checkpoint):
    served = launchers["long grace"].wait_serving()
    try:
        stream = served.client().completions.create(model=tiny_checkpoint().name, prompt="Once", max_tokens=8000,
                                                    stream=True, extra_body={"ignore_eos": True})
        next(stream)
        processes = served.processes()
        served.ctrl_c()
        time.sleep(2)  # the gateway now waits for the stream, for up to 300 s
        assert served.proc.poll() is None
        started = time.monotonic()
        served.ctrl_c()
        assert served.proc.wait(30) == -signal.SIGINT
        assert time.monotonic() - started < 15
        assert_all_gone(processes)
        assert "second interrupt: killing all stages" in served.output()
    finally:
        served.kill()


def test_a_stage_that_fails_to_start_is_reported_with_its_output(launchers):
    served = launchers["failing"]
    assert served.proc.wait(300) == 1
    output = served.output()
    assert "llm_svc exited with status 2 while starting; its last output:" in output
    report = output.split("its last output:", 1)[1]
    assert "--max-num-seqs" in report and "invalid" in report, output
    assert "still running" not in output
