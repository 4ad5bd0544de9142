"""Replicas behind targets: target forms, rendezvous hashing, and an endpoint set that follows DNS."""

import asyncio
import socket
import time

import grpc
import pytest

from protos.endpoints import (Address, Endpoint, EndpointSet, certificate_name, check_targets, down_last,
                              parse_target, rendezvous_order, system_resolver)


@pytest.mark.parametrize("target,pairs,names", [
    ("vision:50051", [("vision", 50051)], True),
    ("dns:///vision-headless:50051", [("vision-headless", 50051)], True),
    ("10.0.0.7:50051", [("10.0.0.7", 50051)], False),
    ("[fd00::7]:50051", [("fd00::7", 50051)], False),
    ("ipv4:10.0.0.1:1,10.0.0.2:2", [("10.0.0.1", 1), ("10.0.0.2", 2)], False),
    ("ipv6:[fd00::1]:1,[fd00::2]:2", [("fd00::1", 1), ("fd00::2", 2)], False),
])
def test_target_forms(target, pairs, names):
    assert parse_target(target) == (pairs, names)


@pytest.mark.parametrize("target", ["vision", "vision:http", "ipv4:vision:1", ":50051", "dns:///vision"])
def test_malformed_targets_are_named(target):
    with pytest.raises(ValueError, match="HOST:PORT, dns:///HOST:PORT"):
        check_targets(["ok:1", target])


def endpoints(*hosts: str) -> list[Endpoint]:
    return [Endpoint(Address(host, 1, host), None) for host in hosts]


def test_rendezvous_moves_only_the_keys_of_a_replica_that_joins_or_leaves():
    keys = [f"image-{i}" for i in range(2000)]
    three = endpoints("10.0.0.1", "10.0.0.2", "10.0.0.3")
    home = {key: rendezvous_order(key, three)[0].address.host for key in keys}
    four = three + endpoints("10.0.0.4")
    moved = {key for key in keys if rendezvous_order(key, four)[0].address.host != home[key]}
    assert all(rendezvous_order(key, four)[0].address.host == "10.0.0.4" for key in moved)
    assert 300 < len(moved) < 700  # about a quarter
    two = three[1:]
    moved = {key for key in keys if rendezvous_order(key, two)[0].address.host != home[key]}
    assert moved == {key for key in keys if home[key] == "10.0.0.1"}
    # The order is a fallback list: a key's second choice is where it goes when its home is down.
    assert all(rendezvous_order(key, two)[0].address.host == rendezvous_order(key, three)[1].address.host
               for key in moved)


def test_replicas_that_answered_unavailable_go_last_until_cooled_down_and_connected():
    a, b, c = (Endpoint(Address(host, 1, host), host) for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"))
    ready, connecting = grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.CONNECTING
    state = {"10.0.0.1": connecting, "10.0.0.2": ready, "10.0.0.3": connecting}

    def order() -> list[str]:
        return [e.address.host for e in down_last([a, b, c], lambda host: state[host])]

    assert order() == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]  # none down: connecting is no reason to go last
    a.down_until = b.down_until = time.monotonic() + 60
    assert order() == ["10.0.0.3", "10.0.0.1", "10.0.0.2"]  # cooling down, in their order among themselves
    a.down_until = b.down_until = time.monotonic() - 1
    assert order() == ["10.0.0.2", "10.0.0.3", "10.0.0.1"]  # a's cooldown is over but its channel still connecting
    state["10.0.0.1"] = ready
    assert order() == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


def test_replicas_whose_channel_is_failing_go_last_without_a_failed_call():
    """TRANSIENT_FAILURE: unreachable, or (the channels check health) a replica that says NOT_SERVING."""
    a, b = (Endpoint(Address(host, 1, host), host) for host in ("10.0.0.1", "10.0.0.2"))
    state = {"10.0.0.1": grpc.ChannelConnectivity.TRANSIENT_FAILURE, "10.0.0.2": grpc.ChannelConnectivity.READY}
    assert [e.address.host for e in down_last([a, b], lambda host: state[host])] == ["10.0.0.2", "10.0.0.1"]
    state["10.0.0.1"] = grpc.ChannelConnectivity.READY
    assert [e.address.host for e in down_last([a, b], lambda host: state[host])] == ["10.0.0.1", "10.0.0.2"]


class Dns:
    """A resolver whose answers the test changes."""

    def __init__(self, **names: list[str]):
        self.names = names
        self.calls = 0

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls += 1
        if not self.names.get(host):
            raise socket.gaierror(socket.EAI_NONAME, "no such name")
        return self.names[host]


class Connections:
    def __init__(self):
        self.open: set[str] = set()

    def connect(self, address: Address) -> str:
        self.open.add(address.target)
        return address.target

    async def close(self, connection: str) -> None:
        self.open.remove(connection)


def targets_of(endpoint_set: EndpointSet) -> list[str]:
    return sorted(e.address.target for e in endpoint_set.live())


async def test_a_name_becomes_one_endpoint_per_address_and_follows_dns():
    dns, connections = Dns(svc=["10.0.0.1", "10.0.0.2"]), Connections()
    replicas = EndpointSet(["dns:///svc:5", "10.0.0.9:5"], connections.connect, connections.close,
                           refresh_s=0.05, retire_s=0.2, resolver=dns)
    await replicas.start()
    assert targets_of(replicas) == ["10.0.0.1:5", "10.0.0.2:5", "10.0.0.9:5"]
    assert {e.address.name for e in replicas.live()} == {"svc", "10.0.0.9"}
    dns.names["svc"] = ["10.0.0.2", "10.0.0.3"]
    await asyncio.sleep(0.1)
    assert targets_of(replicas) == ["10.0.0.2:5", "10.0.0.3:5", "10.0.0.9:5"]
    assert "10.0.0.1:5" in connections.open  # its streams still have time to finish
    await asyncio.sleep(0.25)
    assert connections.open == {"10.0.0.2:5", "10.0.0.3:5", "10.0.0.9:5"}
    await replicas.close()
    assert connections.open == set()


async def test_a_name_that_stops_resolving_keeps_its_replicas_and_an_empty_set_resolves_on_demand():
    dns, connections = Dns(), Connections()
    replicas = EndpointSet(["svc:5"], connections.connect, connections.close, refresh_s=60, resolver=dns)
    await replicas.start()
    assert replicas.live() == []  # no ready replica yet: the first calls find it once it resolves
    dns.names["svc"] = ["10.0.0.1"]
    await asyncio.sleep(1.1)  # MIN_REFRESH_GAP_S
    assert [e.address.target for e in await replicas.ensure_some()] == ["10.0.0.1:5"]
    dns.names["svc"] = []
    await replicas.refresh()
    assert targets_of(replicas) == ["10.0.0.1:5"]
    await replicas.close()


async def test_failures_ask_for_a_resolution_at_most_once_a_second():
    dns, connections = Dns(svc=["10.0.0.1"]), Connections()
    replicas = EndpointSet(["svc:5"], connections.connect, connections.close, refresh_s=60, resolver=dns)
    await replicas.start()
    for _ in range(50):
        replicas.refresh_soon()
        await asyncio.sleep(0)
    assert dns.calls == 1
    await asyncio.sleep(1.1)
    replicas.refresh_soon()
    await asyncio.sleep(0.01)
    assert dns.calls == 2
    await replicas.close()


async def test_localhost_is_one_replica():
    assert await system_resolver("localhost", 1) == ["127.0.0.1"]


def test_the_certificate_is_checked_against_the_name_an_address_was_found_under():
    assert certificate_name(Address("10.0.0.1", 5, "llm-headless")) == "llm-headless"
    assert certificate_name(Address("10.0.0.1", 5, "10.0.0.1")) is None
