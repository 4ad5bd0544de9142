"""Fixtures of the data plane tests (test_protos_transport*.py)."""

import os
import pathlib

import pytest

from protos.transport import shared_memory


@pytest.fixture
def shm_dir():
    """A directory of its own on the shared-memory file system, so that sweeps see only this test's segments."""
    path = pathlib.Path(shared_memory.DEFAULT_DIRECTORY) / f"dvd-test-{os.getpid()}-{os.urandom(4).hex()}"
    path.mkdir()
    yield str(path)
    for name in os.listdir(path):
        os.unlink(path / name)
    path.rmdir()
