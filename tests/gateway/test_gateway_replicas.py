"""The gateway over several llm_svc replicas named by one target: each address is a replica of its own."""

import pytest

from tests.gateway.conftest import FakeLanguageModel, serving
from tests.gateway.test_gateway_errors import chat, post


@pytest.fixture
async def replica_at_127_0_0_2():
    servicer = FakeLanguageModel()
    async with serving(servicer, "127.0.0.2") as target:
        yield servicer, target


async def test_an_address_list_target_balances_over_its_addresses(backend, fake, replica_at_127_0_0_2,
                                                                   start_gateway):
    second, address = replica_at_127_0_0_2
    both = f"ipv4:{backend.target},{address}"
    async with start_gateway(both) as url:
        assert [(await post(url, chat())).status_code for _ in range(4)] == [200] * 4
    assert len(fake.requests) == 2 and len(second.requests) == 2
