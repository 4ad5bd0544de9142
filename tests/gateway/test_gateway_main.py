"""gateway/__main__.py: the spans still queued leave before SIGTERM ends the gateway, which still dies of it."""

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
