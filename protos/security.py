"""Security between the stages: TLS and mutual TLS on every gRPC hop, and an optional bearer token per hop.

Every stage has one TLS identity (`--tls-cert`, `--tls-key`) that it presents both as a server and as a client of
the next stage, and one CA (`--tls-ca`) that signs its peers: a server given a CA requires and verifies client
certificates, a client given one verifies the server with it. Without these flags every hop is plaintext.

A server re-reads its certificate, key and CA when their files change (a rotated Kubernetes Secret), for each new
connection; a client reads its files once, at start. Tokens are read from files at start and only ever sent as
`authorization: Bearer <token>` metadata; health checks need none, so that probes and balancers work.
"""

import dataclasses
import hmac
import logging
import os
import pathlib

import grpc
from grpc.aio import Metadata

log = logging.getLogger(__name__)

HEALTH_METHOD_PREFIX = "/grpc.health.v1.Health/"


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """A stage's PEM files: its certificate chain and key (`--tls-cert`, `--tls-key`), and the CA of its peers
    (`--tls-ca`). All None: plaintext."""
    cert: pathlib.Path | None = None
    key: pathlib.Path | None = None
    ca: pathlib.Path | None = None

    def __post_init__(self):
        if (self.cert is None) != (self.key is None):
            raise ValueError("--tls-cert and --tls-key go together: the certificate and its private key")
        for flag, path in (("--tls-cert", self.cert), ("--tls-key", self.key), ("--tls-ca", self.ca)):
            if path is not None:
                read_pem(path, flag)

    @property
    def enabled(self) -> bool:
        return self.cert is not None or self.ca is not None


def read_pem(path: pathlib.Path, flag: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{flag} {path}: cannot read it ({error.strerror or error})") from None
    if b"-----BEGIN " not in data:
        raise ValueError(f"{flag} {path}: not a PEM file (no '-----BEGIN' line)")
    return data


def read_token_file(path: pathlib.Path, flag: str) -> str:
    """The token in `path`, surrounding whitespace (a trailing newline) stripped; never logged or echoed."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{flag} {path}: cannot read the token ({getattr(error, 'strerror', None) or error})") \
            from None
    if not token:
        raise ValueError(f"{flag} {path}: the token is empty")
    if any(not 0x21 <= ord(c) <= 0x7e for c in token):
        raise ValueError(f"{flag} {path}: the token must be printable ASCII without spaces (it travels as "
                         "gRPC metadata)")
    return token


def check_server_settings(tls: TlsFiles, port: int, health_port: int | None, metrics_port: int | None) -> None:
    """The security settings of a stage that serves gRPC; ValueError names the flag at fault."""
    if tls.ca is not None and tls.cert is None:
        raise ValueError("--tls-ca needs --tls-cert and --tls-key: a TLS server presents a certificate")
    if health_port is not None:
        if not 0 < health_port < 65536:
            raise ValueError(f"--health-port must be a port number in [1, 65535], got {health_port}")
        if health_port in (port, metrics_port):
            raise ValueError("--health-port must differ from --port and --metrics-port")


def check_client_settings(tls: TlsFiles, server_name: str | None) -> None:
    if server_name is not None and not tls.enabled:
        raise ValueError("--tls-server-name needs TLS (--tls-ca, or --tls-cert and --tls-key)")


# ---- credentials ---------------------------------------------------------------------------------------

def _server_configuration(tls: TlsFiles) -> grpc.ServerCertificateConfiguration:
    ca = read_pem(tls.ca, "--tls-ca") if tls.ca is not None else None
    return grpc.ssl_server_certificate_configuration(
        [(read_pem(tls.key, "--tls-key"), read_pem(tls.cert, "--tls-cert"))], root_certificates=ca)


class CertificateReloader:
    """gRPC asks it before every TLS handshake: a new configuration when one of the files changed, else None
    (keep the current one). A file caught half-written is retried at the next handshake."""

    def __init__(self, tls: TlsFiles):
        self._tls = tls
        self._stamp = self._stamps()

    def _stamps(self) -> tuple:
        # Kubernetes swaps a Secret's files by a symlink: stat follows it, so a new file shows a new inode.
        stamps = []
        for path in (self._tls.cert, self._tls.key, self._tls.ca):
            try:
                stat = os.stat(path) if path is not None else None
            except OSError:
                stat = None
            stamps.append(stat and (stat.st_ino, stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self._stamps()
        if stamp == self._stamp:
            return None
        try:
            configuration = _server_configuration(self._tls)
        except ValueError as error:
            log.warning("TLS files changed but cannot be read yet, keeping the current ones: %s", error)
            return None
        self._stamp = stamp
        log.info("TLS: certificate, key and CA reloaded from %s", self._tls.cert)
        return configuration


def server_credentials(tls: TlsFiles) -> grpc.ServerCredentials:
    """TLS with the stage's certificate; with a CA, clients must present a certificate it signed (mTLS)."""
    return grpc.dynamic_ssl_server_credentials(_server_configuration(tls), CertificateReloader(tls),
                                               require_client_authentication=tls.ca is not None)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Verifies the server against the CA (the system's roots without one) and presents the stage's
    certificate, when it has one."""
    return grpc.ssl_channel_credentials(
        root_certificates=read_pem(tls.ca, "--tls-ca") if tls.ca is not None else None,
        private_key=read_pem(tls.key, "--tls-key") if tls.key is not None else None,
        certificate_chain=read_pem(tls.cert, "--tls-cert") if tls.cert is not None else None)


def open_channel(target: str, options: list[tuple[str, int | str]], tls: TlsFiles = TlsFiles(),
                 server_name: str | None = None, token: str | None = None) -> grpc.aio.Channel:
    """A channel to another stage: TLS when `tls` is enabled (the server's certificate must name `server_name`,
    or else the target's host), and `token` on every call."""
    interceptors = bearer_token_interceptors(token) if token is not None else None
    if not tls.enabled:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    if server_name is not None:
        options = [*options, ("grpc.ssl_target_name_override", server_name)]
    return grpc.aio.secure_channel(target, channel_credentials(tls), options=options, interceptors=interceptors)


# ---- tokens --------------------------------------------------------------------------------------------

class _BearerToken:
    def __init__(self, token: str):
        self._metadata = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return details._replace(metadata=Metadata(*(details.metadata or ()), self._metadata))


class _UnaryUnaryToken(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


class _UnaryStreamToken(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


class _StreamUnaryToken(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return await continuation(self._with_token(client_call_details), request_iterator)


class _StreamStreamToken(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await continuation(self._with_token(client_call_details), request_iterator)


def bearer_token_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """Add `authorization: Bearer <token>` to every call of a channel; one per kind of call, since a channel
    files each interceptor under one kind only."""
    return [kind(token) for kind in (_UnaryUnaryToken, _UnaryStreamToken, _StreamUnaryToken, _StreamStreamToken)]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses with UNAUTHENTICATED every call but health checks that lacks `authorization: Bearer <token>`."""

    def __init__(self, token: str):
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(HEALTH_METHOD_PREFIX) or self._carries_token(handler_call_details):
            return handler
        return _refusing(handler, method)

    def _carries_token(self, handler_call_details) -> bool:
        given = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        # Compared in constant time, so that response times say nothing about the token.
        return len(given) == 1 and isinstance(given[0], str) and hmac.compare_digest(given[0].encode(),
                                                                                      self._expected)


def _refusing(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` (so that gRPC reads the call as it would) that refuses; the request
    stays raw bytes, unparsed."""
    async def refuse(_request, context: grpc.aio.ServicerContext):
        log.warning("%s from %s refused: no valid bearer token", method, context.peer())
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this stage requires a valid bearer token")

    kind = ("unary_unary" if handler.unary_unary else "unary_stream" if handler.unary_stream else
            "stream_unary" if handler.stream_unary else "stream_stream")
    make = getattr(grpc, f"{kind}_rpc_method_handler")
    return make(refuse)
