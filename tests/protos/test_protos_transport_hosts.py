"""The data plane between network namespaces (a veth pair, as between hosts; needs root): the socket
transport crosses it, and the probe, not the addresses, decides shared memory (namespaces share /dev/shm)."""

import os
import subprocess
import sys

import pytest
import torch

from bench import netns
from llm_svc.embedding_receiver import ReceiverSettings
from llm_svc.vision_client import VisionClient

from tests.protos.test_protos_transport_faults import ENV, image, wait_until
from tests.protos.transport_peer import embeddings_of

pytestmark = pytest.mark.skipif(netns.unavailable_reason() is not None, reason=str(netns.unavailable_reason()))


@pytest.fixture
def namespace():
    space = netns.VethNamespace("t").create()
    yield space
    space.delete()


async def test_the_socket_crosses_namespaces_and_the_probe_still_finds_the_shared_memory(namespace, shm_dir,
                                                                                           tmp_path):
    port_file = tmp_path / "port"
    sender = subprocess.Popen([sys.executable, "-m", *namespace.module_args(
        "tests.protos.transport_peer", "serve", str(port_file), shm_dir, str(tmp_path), "0",
        namespace.inside_address)], env=ENV, cwd=os.getcwd())
    try:
        await wait_until(lambda: port_file.exists() and port_file.read_text(), what="the sender to start")
        target = f"{namespace.inside_address}:{port_file.read_text()}"
        for transport, expected in (("socket", "socket"), ("auto", "shm")):
            client = VisionClient([target], 64 << 20, 4 << 20, data_plane=ReceiverSettings(transport, shm_dir))
            try:
                [result] = await client.encode("ok", image(), 0, 60)
                assert torch.equal(result.embeddings, embeddings_of(0))
                assert (await client.receiver.plane(target, None)).name == expected
            finally:
                await client.close()
    finally:
        sender.kill()
        sender.wait()
