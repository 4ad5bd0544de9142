"""The gRPC server bootstrap every stage uses: limits, health, reflection, error mapping, TLS, tokens, drain.

Health starts NOT_SERVING and becomes SERVING only when the stage says it is warm; on SIGTERM or SIGINT it
turns NOT_SERVING (load balancers stop sending), in-flight calls get `grace_s` to finish, then the server
stops. With TLS, probes that cannot speak it ask a second, plaintext server that serves health alone.
"""

import asyncio
import json
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.reflection import SERVICE_NAME as REFLECTION_SERVICE, enable_server_reflection

from protos.errors import ErrorInterceptor
from protos.security import TlsFiles, TokenAuthInterceptor, server_credentials

log = logging.getLogger(__name__)

# Both ends ping a connection this often, and give up on it when a ping has no answer within PING_TIMEOUT_S.
KEEPALIVE_S = 10
PING_TIMEOUT_S = 10


# A client's channel watches its server's gRPC health (the overall status, service ""): a replica that says
# NOT_SERVING (warming up, draining, its engine dead, its encoder stuck) takes no new calls, which fail at once
# with UNAVAILABLE ("backend unhealthy") for the caller to retry elsewhere, and its channel leaves READY.
HEALTH_CHECKED = json.dumps({"healthCheckConfig": {"serviceName": ""}})


def channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """A client channel's options: those of `connection_options`, round-robin over every address a target
    resolves to (a `dns:///` name of a headless Service reaches all its replicas; gRPC's default, pick-first,
    would send everything to one), and health checking (`HEALTH_CHECKED`)."""
    return [
        *connection_options(max_message_bytes),
        ("grpc.lb_policy_name", "round_robin"),
        ("grpc.service_config", HEALTH_CHECKED),
    ]


def connection_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    """Both ends': explicit message limits (gRPC's default receive limit is 4 MB), keepalive, and a reconnect
    backoff capped at a few seconds: gRPC's default grows to 120 s, so a replica restarted after a crash would
    sit unused for up to two minutes (28 s in the fault bench) while the others carry its load.

    Keepalive finds a peer that went silent (stopped, partitioned, behind a proxy that forwards nothing) within
    20 s: its calls fail UNAVAILABLE, which the callers retry on another replica, instead of waiting out their
    deadlines. gRPC waits for a ping's answer `ping_timeout_ms` (a minute by default), not `keepalive_timeout_ms`
    alone, so both are set."""
    return [
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", 5_000),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
        ("grpc.keepalive_timeout_ms", PING_TIMEOUT_S * 1000),
        ("grpc.http2.ping_timeout_ms", PING_TIMEOUT_S * 1000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def channel_state(channel: grpc.aio.Channel) -> grpc.ChannelConnectivity:
    """`channel`'s connectivity; asking starts a connection on an idle one."""
    return channel.get_state(try_to_connect=True)


class GrpcServer:
    """A grpc.aio server with health, reflection and the error interceptor installed; TLS (mutual with a CA)
    when `tls` is enabled, a bearer token required when `auth_token` is set, and plaintext health alone on
    `health_port` when that is set."""

    def __init__(self, host: str, port: int, max_message_bytes: int, grace_s: float, announce_s: float = 1.0, *,
                 tls: TlsFiles = TlsFiles(), auth_token: str | None = None, reflection: bool = True,
                 health_port: int | None = None):
        self.grace_s = grace_s
        # Time between turning NOT_SERVING and refusing new calls, so that probes and balancers notice.
        self.announce_s = announce_s
        self._address = f"{host}:{port}"
        self._tls = tls
        self._reflection = reflection
        # Connections are recycled every few minutes so that clients re-resolve DNS and find new replicas;
        # streams in flight on a recycled connection keep 11 minutes to finish: a call's deadline (the gateway's
        # 10 minutes) after a GenerateStream's last new call (`protos.call_stream.NEW_CALLS_S`).
        options = [*connection_options(max_message_bytes), ("grpc.max_connection_age_ms", 300_000),
                   ("grpc.max_connection_age_grace_ms", 660_000),
                   # Accept the clients' keepalive pings on quiet connections (every 10 s); gRPC's default
                   # minimum of 5 minutes answers them with GOAWAY "too_many_pings".
                   ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2)]
        interceptors = [ErrorInterceptor()]
        if auth_token is not None:
            interceptors.insert(0, TokenAuthInterceptor(auth_token))
        self._server = grpc.aio.server(interceptors=interceptors, options=options)
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._service_names = [health.SERVICE_NAME, *([REFLECTION_SERVICE] if reflection else [])]
        self._health_server: grpc.aio.Server | None = None
        if health_port is not None:
            # The same servicer, so both ports always tell the same status.
            self._health_server = grpc.aio.server(options=options)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self._health_address = f"{host}:{health_port}"
        self.port: int | None = None

    def add_service(self, add_to_server, servicer, full_name: str) -> None:
        """Registers a servicer; `full_name` is the proto's `package.Service` (for health and reflection)."""
        add_to_server(servicer, self._server)
        self._service_names.append(full_name)

    async def start(self) -> int:
        if self._reflection:
            enable_server_reflection(self._service_names, self._server)
        credentials = server_credentials(self._tls) if self._tls.enabled else None
        self.port = _bind(self._server, self._address, credentials)
        if self._health_server is not None:
            _bind(self._health_server, self._health_address, None)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        if self._health_server is not None:
            await self._health_server.start()
            log.info("plaintext gRPC health alone on %s", self._health_address)
        security = ("mutual TLS" if self._tls.ca is not None else "TLS") if self._tls.enabled else "plaintext"
        log.info("gRPC listening on %s (port %d, %s), NOT_SERVING until warm", self._address, self.port, security)
        return self.port

    async def set_serving(self) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("health: SERVING")

    async def set_not_serving(self, reason: str) -> None:
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        log.error("health: NOT_SERVING: %s", reason)

    async def drain(self) -> None:
        """NOT_SERVING, then let in-flight calls finish for up to `grace_s` before cancelling them."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(self.announce_s)
        log.info("draining: in-flight calls have %.1f s to finish", self.grace_s)
        await self._server.stop(self.grace_s)
        if self._health_server is not None:
            await self._health_server.stop(0)
        log.info("gRPC server stopped")

    async def _set_health(self, status) -> None:
        for name in ["", *self._service_names]:
            await self._health.set(name, status)


def _bind(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    try:
        port = (server.add_secure_port(address, credentials) if credentials is not None else
                server.add_insecure_port(address))
    except RuntimeError:  # grpc's "Failed to bind", with the cause only in its debug log
        port = 0
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}: the port is taken, or the address is not one of "
                      "this machine's")
    return port


async def wait_for_shutdown_signal() -> signal.Signals:
    """Returns the first SIGTERM or SIGINT received."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[signal.Signals] = loop.create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s))
    try:
        sig = await received
    finally:
        for s in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(s)
    log.info("received %s", sig.name)
    return sig
