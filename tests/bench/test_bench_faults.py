"""The fault bench's own parts (`bench.faults` itself is a bench command: 5 min and more): the fault proxy, the
classification of what a client saw, and the namespaces' names, against small local servers."""

import asyncio
import ipaddress
import json
import os
import socket
import threading
import time

import httpx
import pytest

from bench import netns
from bench.fault_phases import Phase
from bench.fault_proxy import NO_FAULT, Fault, FaultProxy
from bench.faults import check
from bench.traffic import COMPLETED, NO_MESSAGE, STREAM_CUT, Outcome, send_chat


@pytest.fixture
def echo_server():
    """A TCP server that echoes what it gets, on a thread of its own; yields its port."""
    loop = asyncio.new_event_loop()

    async def echo(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = loop.run_until_complete(asyncio.start_server(echo, "127.0.0.1", 0))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield server.sockets[0].getsockname()[1]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def round_trip(address: str, size: int, timeout_s: float = 5.0) -> tuple[float, bytes]:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout_s) as sock:
        started = time.monotonic()
        sock.sendall(b"x" * size)
        received = b""
        while len(received) < size:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return time.monotonic() - started, received


def test_fault_proxy_delays_resets_and_holds_bytes(echo_server):
    proxy = FaultProxy("127.0.0.1", echo_server)
    address = proxy.start()
    try:
        assert round_trip(address, 100_000)[1] == b"x" * 100_000
        proxy.set_fault(Fault(delay_s=0.2))
        seconds, echoed = round_trip(address, 1_000_000)
        assert echoed == b"x" * 1_000_000 and seconds >= 0.4  # 0.2 s each way; the chunks stay pipelined
        proxy.set_fault(Fault(reset_probability=1.0))
        with pytest.raises(ConnectionResetError):
            round_trip(address, 1000)
        proxy.set_fault(Fault(blackhole=True))
        with pytest.raises(socket.timeout):
            round_trip(address, 1000, timeout_s=1.0)
        proxy.set_fault(NO_FAULT)
        assert round_trip(address, 1000)[1] == b"x" * 1000
    finally:
        proxy.close()


def sent(handler, body: dict) -> tuple[str, str]:
    async def go():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await send_chat(client, "http://gateway/v1/chat/completions", body, {})
    return asyncio.run(go())


def sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


CHUNK = json.dumps({"choices": [{"delta": {"content": "hi"}, "finish_reason": "length"}]})
ERROR = json.dumps({"error": {"message": "Service unavailable (llm_svc down)", "code": 503}})


@pytest.mark.parametrize("stream, response, expected", [
    (True, httpx.Response(200, content=sse(CHUNK, "[DONE]")), (COMPLETED, "")),
    (True, httpx.Response(200, content=sse(CHUNK, ERROR, "[DONE]")),
     ("SSE error 503", "Service unavailable (llm_svc down)")),
    (True, httpx.Response(200, content=sse(CHUNK)), (STREAM_CUT, "the stream ended without data: [DONE]")),
    (False, httpx.Response(503, json={"error": {"message": "down"}}), ("HTTP 503", "down")),
    (False, httpx.Response(200, json={"choices": [{"finish_reason": "length"}]}), (COMPLETED, "")),
])
def test_each_request_gets_the_outcome_its_client_saw(stream, response, expected):
    assert sent(lambda request: response, {"stream": stream}) == expected


def test_a_bare_5xx_is_not_a_clean_failure():
    result, message = sent(lambda request: httpx.Response(502, text="Bad Gateway"), {"stream": False})
    assert result == "HTTP 502" and message.startswith(NO_MESSAGE)
    assert not Outcome(0, "r", "text", False, 0.0, 1.0, result, message).clean
    assert Outcome(0, "r", "text", False, 0.0, 1.0, "HTTP 503", "Service unavailable").clean


def test_namespaces_are_named_by_pid_and_get_subnets_of_their_own():
    assert netns.subnet_of(os.getpid()) != netns.subnet_of(os.getpid() + 1)
    assert netns.subnet_of(4_194_303).subnet_of(ipaddress.IPv4Network("10.0.0.0/8"))  # the largest pid


@pytest.mark.parametrize("vision_timeout_s, checked", [(5.0, False), (30.0, True)])
def test_a_blackhole_must_lose_nothing_when_the_vision_deadline_outlasts_keepalive(tmp_path, vision_timeout_s, checked):
    names = ["baseline", "vision kill -9", "llm_svc kill -9", "blackhole", "partition"]
    phases = [Phase(name, "", "", started=10.0 * n, fault_at=10.0 * n + 1) for n, name in enumerate(names)]
    phases[-1].skipped = "no namespaces"
    lost = Outcome(0, "faults-000000", "image", False, 31.0, 45.0, "HTTP 504", "Deadline exceeded")
    checks = {expected: held for expected, held, _ in check(phases, [lost], tmp_path / "llm.log", ["a", "b"],
                                                             vision_timeout_s, 10.0)}
    assert checks.get("blackhole: no request lost") is (False if checked else None)
    assert "partition: no request lost" not in checks  # skipped


@pytest.mark.parametrize("waited_s, holds", [(2.0, True), (15.0, False)])
def test_once_a_stuck_worker_is_found_no_request_waits_for_it(tmp_path, waited_s, holds):
    """Requests sent once the stall is found (the stall timeout and a margin into the fault) must each take less
    than the stall timeout; those sent before it may wait for the worker."""
    names = ["baseline", "vision kill -9", "llm_svc kill -9", "blackhole", "stuck worker", "partition"]
    phases = [Phase(name, "", "", started=100.0 * n, fault_at=100.0 * n + 5) for n, name in enumerate(names)]
    phases[-1].skipped = "no namespaces"
    stuck = phases[4]
    stuck.healed_at = stuck.fault_at + 30
    outcomes = [Outcome(0, "faults-000000", "image", False, stuck.fault_at + 1, stuck.fault_at + 30, COMPLETED),
                Outcome(1, "faults-000001", "image", False, stuck.fault_at + 14, stuck.fault_at + 14 + waited_s,
                        COMPLETED)]
    found = [(held, seen) for expected, held, seen in check(phases, outcomes, tmp_path / "llm.log", ["a", "b"], 30.0,
                                                           10.0) if expected.startswith("stuck worker: each")]
    assert found == [(holds, f"1 requests, the longest {waited_s:.1f} s")]
    assert not any(e.startswith("stuck worker") for e, _, _ in check(phases, outcomes, tmp_path / "llm.log",
                                                                      ["a", "b"], 30.0, 0.0))  # never found


@pytest.mark.parametrize("stall_timeout_s, vision_timeout_s, checked", [(5.0, 30.0, True), (30.0, 30.0, False),
                                                                         (0.0, 30.0, False)])
def test_a_stuck_worker_must_lose_nothing_when_it_is_found_before_the_vision_deadline(
        tmp_path, stall_timeout_s, vision_timeout_s, checked):
    """The images a stuck replica holds once it finds itself stuck go back to llm_svc, which retries them elsewhere:
    none is lost when the stall timeout and a margin fit in the vision deadline."""
    names = ["baseline", "vision kill -9", "llm_svc kill -9", "blackhole", "stuck worker", "partition"]
    phases = [Phase(name, "", "", started=100.0 * n, fault_at=100.0 * n + 5) for n, name in enumerate(names)]
    phases[-1].skipped = "no namespaces"
    stuck = phases[4]
    lost = Outcome(0, "faults-000000", "image", False, stuck.fault_at + 1, stuck.fault_at + 31, "HTTP 504",
                   "Deadline exceeded")
    checks = {expected: held for expected, held, _ in check(phases, [lost], tmp_path / "llm.log", ["a", "b"],
                                                             vision_timeout_s, stall_timeout_s)}
    assert checks.get("stuck worker: no request lost") is (False if checked else None)
