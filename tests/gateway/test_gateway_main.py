"""gateway/__main__.py: the spans still queued leave before SIGTERM ends the gateway, which still dies of it; grpc's
client I/O is chosen before grpc loads, unless the user chose it."""

import os
import signal
import subprocess
import sys

PROGRAM = """
import os, signal, sys
from gateway.__main__ import flush_before_dying_of
flush_before_dying_of(signal.SIGTERM, lambda: print("flushed", flush=True))
signal.raise_signal(signal.SIGTERM)  # as uvicorn does, once it has shut down
print("survived", flush=True)
"""


def test_sigterm_flushes_then_ends_the_process_by_the_signal():
    result = subprocess.run([sys.executable, "-c", PROGRAM], capture_output=True, text=True, timeout=120)
    assert result.stdout == "flushed\n", result.stderr
    assert result.returncode == -signal.SIGTERM


def grpc_experiments_in_the_gateway(env: dict[str, str]) -> str:
    program = "import os, gateway.__main__, grpc; print(os.environ['GRPC_EXPERIMENTS'])"
    return subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120,
                          env=env, check=True).stdout.strip()


def test_the_gateway_reads_grpc_messages_on_grpcs_own_thread_unless_told_otherwise():
    env = {k: v for k, v in os.environ.items() if k != "GRPC_EXPERIMENTS"}
    assert grpc_experiments_in_the_gateway(env) == "-event_engine_client"
    assert grpc_experiments_in_the_gateway({**env, "GRPC_EXPERIMENTS": "event_engine_client"}) == "event_engine_client"
