"""The gateway over several llm_svc replicas named by one target: each address is a replica of its own."""

import pytest

from protos import llm_pb2_grpc
from protos.server import GrpcServer
from tests.gateway.conftest import FakeLanguageModel
from tests.gateway.test_gateway_errors import chat, post


@pytest.fixture
async def replica_at_127_0_0_2():
    servicer = FakeLanguageModel()
    server = GrpcServer("127.0.0.2", 0, max_message_bytes=1 << 20, grace_s=0.5, announce_s=0)
    server.add_service(llm_pb2_grpc.add_LanguageModelServicer_to_server, servicer, "internvl.llm.v1.LanguageModel")
    port = await server.start()
    await server.set_serving()
    yield servicer, f"127.0.0.2:{port}"
    await server.drain()


async def test_an_address_list_target_balances_over_its_addresses(backend, fake, replica_at_127_0_0_2,
                                                                   start_gateway):
    second, address = replica_at_127_0_0_2
    both = f"ipv4:{backend.target},{address}"
    async with start_gateway(both) as url:
        assert [(await post(url, chat())).status_code for _ in range(4)] == [200] * 4
    assert len(fake.requests) == 2 and len(second.requests) == 2
