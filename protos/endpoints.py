"""The replicas behind a client's targets: one endpoint (one gRPC channel) per address, kept current as DNS changes.

A target names one replica or many: `host:port`, `dns:///host:port` (a Kubernetes headless Service resolves to
one address per ready pod), or gRPC's address lists `ipv4:a:port,b:port` and `ipv6:[a]:port,[b]:port`. Each
address becomes an endpoint with a channel of its own, so that balancing, content affinity and retries see every
replica; gRPC's own resolution would hide them behind one channel. A name is read with one address family (IPv4
when it has any): a dual-stack pod or `localhost` is one replica, not two.

Names are resolved again every `refresh_s` and soon after a call fails. An endpoint whose address is gone takes
no new calls; its channel closes after `retire_s`, when the calls it was serving have had their time.
"""

import asyncio
import dataclasses
import hashlib
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import grpc

log = logging.getLogger(__name__)

T = TypeVar("T")
# (host, port) -> the host's addresses; socket.gaierror when it has none.
Resolver = Callable[[str, int], Awaitable[list[str]]]

DNS_SCHEME = "dns:///"
ADDRESS_LIST_SCHEMES = ("ipv4:", "ipv6:")
# A failed call asks for a new resolution at most this often, so a dead replica cannot flood the resolver.
MIN_REFRESH_GAP_S = 1.0
# Kubernetes' DNS answers live 30 s.
DEFAULT_REFRESH_S = 30.0
DEFAULT_RETIRE_S = 600.0


async def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses of one family, IPv4 when it has any (see the module's docstring)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = [info[4][0] for info in infos if info[0] == socket.AF_INET]
    return list(dict.fromkeys(v4 or [info[4][0] for info in infos]))


@dataclasses.dataclass(frozen=True)
class Address:
    """One replica's address, and the name it was found under (what its TLS certificate names)."""

    host: str  # an IP address, or a name left to gRPC when it cannot be resolved here
    port: int
    name: str

    @property
    def target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def certificate_name(address: Address) -> str | None:
    """The name a replica's TLS certificate must carry when the caller names none: the host name the address was
    found under; None for an address given as such (gRPC then checks the certificate against the address)."""
    return address.name if address.name != address.host else None


def split_host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port)


def parse_target(target: str) -> tuple[list[tuple[str, int]], bool]:
    """The (host, port) pairs a target names, and whether they are names to resolve (else IP addresses)."""
    if target.startswith(ADDRESS_LIST_SCHEMES):
        pairs = [split_host_port(part) for part in target.split(":", 1)[1].split(",") if part]
        for host, _ in pairs:
            ipaddress.ip_address(host)  # raises ValueError for a name in an address list
        return pairs, False
    host, port = split_host_port(target.removeprefix(DNS_SCHEME))
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return [(host, port)], True
    return [(host, port)], False


def check_targets(targets: tuple[str, ...] | list[str]) -> None:
    """Raises ValueError naming the first target that is not one of the forms above."""
    for target in targets:
        try:
            parse_target(target)
        except ValueError as error:
            raise ValueError(f"target {target!r}: {error}; use HOST:PORT, dns:///HOST:PORT, ipv4:IP:PORT[,...] "
                             "or ipv6:[IP]:PORT[,...]") from None


def rendezvous_order(key: str, endpoints: list["Endpoint[T]"]) -> list["Endpoint[T]"]:
    """`endpoints` by highest random weight for `key`: the first is the key's home, and adding or removing an
    endpoint moves only the keys whose home it is."""
    def weight(endpoint: Endpoint) -> bytes:
        return hashlib.blake2b(f"{key}|{endpoint.address.target}".encode(), digest_size=8).digest()
    return sorted(endpoints, key=weight, reverse=True)


def down_last(endpoints: list["Endpoint[T]"], state: Callable[[T], grpc.ChannelConnectivity]) -> list["Endpoint[T]"]:
    """`endpoints` in their order, those that are down last: whose channel is failing (`state(connection)` is
    TRANSIENT_FAILURE: unreachable, or its health says NOT_SERVING), and those that answered UNAVAILABLE, during
    their cooldown and after it until their channel is connected again (a call on a channel still connecting to a
    silent address waits for the attempt to time out, 20 s)."""
    now = time.monotonic()

    def down(endpoint: Endpoint[T]) -> bool:
        connectivity = state(endpoint.connection)
        if connectivity == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            return True
        return endpoint.down_until != 0.0 and (endpoint.down_until > now
                                               or connectivity != grpc.ChannelConnectivity.READY)
    return sorted(endpoints, key=down)


class Endpoint(Generic[T]):
    """One replica: its address, what `connect` made for it (channel and stubs), and when it may be tried again."""

    def __init__(self, address: Address, connection: T):
        self.address = address
        self.connection = connection
        # Monotonic time before which balancers prefer other endpoints (after an UNAVAILABLE answer; 0 once a
        # call succeeds again).
        self.down_until = 0.0

    def __repr__(self) -> str:
        return f"Endpoint({self.address.target})"


class EndpointSet(Generic[T]):
    """The live endpoints of `targets`. `connect(address)` opens a connection (a channel and its stubs) for a
    new address, `close(connection)` closes one."""

    def __init__(self, targets: list[str], connect: Callable[[Address], T], close: Callable[[T], Awaitable[None]],
                 *, refresh_s: float = DEFAULT_REFRESH_S, retire_s: float = DEFAULT_RETIRE_S, resolver: Resolver = system_resolver):
        check_targets(targets)
        self._targets = list(targets)
        self._connect = connect
        self._close = close
        self._refresh_s = refresh_s
        self._retire_s = retire_s
        self._resolve = resolver
        self._live: dict[Address, Endpoint[T]] = {}
        self._last_refresh = -MIN_REFRESH_GAP_S
        self._refreshing: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._closed = False

    def live(self) -> list[Endpoint[T]]:
        return list(self._live.values())

    async def start(self) -> None:
        """Resolves every target once (a name that does not resolve yet is tried again later) and keeps them
        current from then on."""
        await self.refresh()
        self._spawn(self._refresh_periodically())

    async def refresh(self) -> None:
        self._last_refresh = time.monotonic()
        found: list[Address] = []
        for target in self._targets:
            found += await self._addresses(target)
        for address in found:
            if address not in self._live:
                log.info("replica %s (%s) joined", address.target, address.name)
                self._live[address] = Endpoint(address, self._connect(address))
        for address in [a for a in self._live if a not in found]:
            log.info("replica %s (%s) left; its channel closes in %.0f s", address.target, address.name,
                     self._retire_s)
            self._spawn(self._retire(self._live.pop(address)))

    def refresh_soon(self) -> None:
        """Asks for a resolution now (after a failed call), unless one ran within MIN_REFRESH_GAP_S."""
        if self._closed or time.monotonic() - self._last_refresh < MIN_REFRESH_GAP_S:
            return
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = self._spawn(self.refresh())

    async def ensure_some(self) -> list[Endpoint[T]]:
        """The live endpoints, resolving again first when there are none (a Service with no ready pod yet)."""
        if not self._live and time.monotonic() - self._last_refresh >= MIN_REFRESH_GAP_S:
            await self.refresh()
        return self.live()

    async def close(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._close(e.connection) for e in self._live.values()))
        self._live.clear()

    async def _addresses(self, target: str) -> list[Address]:
        pairs, names = parse_target(target)
        if not names:
            return [Address(host, port, host) for host, port in pairs]
        (host, port), = pairs
        try:
            return [Address(ip, port, host) for ip in await self._resolve(host, port)]
        except (socket.gaierror, OSError) as error:
            # A name with no address now (no ready replica, DNS down): keep what it had, try again later.
            log.warning("cannot resolve %s (%s); keeping its %d known replicas", host, error,
                        sum(a.name == host and a.port == port for a in self._live))
            return [a for a in self._live if a.name == host and a.port == port]

    async def _refresh_periodically(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a failed resolution must not stop the next ones
                log.exception("resolving the replicas failed")

    async def _retire(self, endpoint: Endpoint[T]) -> None:
        try:
            await asyncio.sleep(self._retire_s)
        finally:
            await self._close(endpoint.connection)

    def _spawn(self, work: Awaitable) -> asyncio.Task:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
