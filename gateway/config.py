"""The gateway's one configuration object, built from the command line in one place and validated once."""

import argparse
import dataclasses
import os
import pathlib

from protos.cli import HelpFormatter, add_security_flags, pop_security_args
from protos.endpoints import check_targets
from protos.security import TlsFiles, check_client_settings
from protos.tracing import add_tracing_flag

MIB = 1 << 20
# gRPC message lengths are signed 32-bit integers.
_GRPC_MESSAGE_LIMIT = (1 << 31) - 1
# Read by config_from_args when neither --api-key nor --api-key-file is given, as vLLM reads VLLM_API_KEY.
API_KEY_ENV = "GATEWAY_API_KEY"


@dataclasses.dataclass(frozen=True)
class GatewayConfig:
    llm_targets: tuple[str, ...]
    host: str = "0.0.0.0"
    port: int = 8000
    api_key: str | None = dataclasses.field(default=None, repr=False)  # a secret: kept out of logs
    served_model_name: str | None = None
    allowed_local_media_path: pathlib.Path | None = None
    allow_private_image_urls: bool = False
    max_image_bytes: int = 20 * MIB
    max_images_per_request: int = 8
    max_video_bytes: int = 32 * MIB  # per video_url part (gateway/videos.py)
    max_videos_per_request: int = 2
    image_fetch_timeout_s: float = 10.0
    max_redirects: int = 3
    request_timeout_s: float = 600.0
    max_request_bytes: int = 64 * MIB
    max_tokens_limit: int = 32768
    # Work in flight: generation requests being served, and the bytes of bodies and images they hold meanwhile.
    max_requests_in_flight: int = 1024
    max_bytes_in_flight: int = 1024 * MIB
    unavailable_cooldown_s: float = 5.0
    multiplex_llm_calls: bool = True  # the calls to a replica share one GenerateStream (gateway/llm_client.py)
    health_timeout_s: float = 2.0
    shutdown_grace_s: float = 30.0
    keep_alive_timeout_s: float = 75.0  # above clients' pool and load balancers' idle timeouts (--help says why)
    log_level: str = "INFO"
    log_json: bool = False
    # The client side of the gRPC hop to llm_svc: TLS files, the name its certificate carries, the token sent.
    tls: TlsFiles = TlsFiles()
    tls_server_name: str | None = None
    llm_auth_token: str | None = dataclasses.field(default=None, repr=False)  # a secret: kept out of logs
    otlp_traces_endpoint: str | None = None  # protos.tracing: with the OTEL_* variables, where spans go

    def __post_init__(self):
        if not self.llm_targets:
            raise ValueError("--llm needs at least one llm_svc target")
        check_targets(self.llm_targets)
        check_client_settings(self.tls, self.tls_server_name)
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty, which would lock nobody out; use None for no key")
        for name in ("max_image_bytes", "max_images_per_request", "max_video_bytes", "max_videos_per_request",
                     "max_request_bytes", "max_tokens_limit",
                     "max_requests_in_flight", "max_bytes_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        for name in ("image_fetch_timeout_s", "request_timeout_s", "unavailable_cooldown_s", "health_timeout_s",
                     "keep_alive_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.max_redirects < 0 or self.shutdown_grace_s < 0:
            raise ValueError("max_redirects and shutdown_grace_s cannot be negative")
        if self.allowed_local_media_path is not None and not self.allowed_local_media_path.is_dir():
            raise ValueError(f"--allowed-local-media-path {self.allowed_local_media_path} is not a directory")
        if self.grpc_max_message_bytes > _GRPC_MESSAGE_LIMIT:
            raise ValueError("max_images_per_request * max_image_bytes + max_videos_per_request * max_video_bytes + "
                             "max_request_bytes exceeds gRPC's 2 GiB message limit; lower one of them")
        if self.max_bytes_in_flight < self.grpc_max_message_bytes:
            # Else the largest allowed request could never be admitted, and would get 429s forever.
            raise ValueError(f"max_bytes_in_flight ({self.max_bytes_in_flight}) is below what one request may hold "
                             f"(max_request_bytes + max_images_per_request * max_image_bytes + "
                             f"max_videos_per_request * max_video_bytes = "
                             f"{self.grpc_max_message_bytes}); raise it or lower those")

    @property
    def max_media_bytes(self) -> int:
        """The most that one request's images and videos may hold."""
        return self.max_images_per_request * self.max_image_bytes + self.max_videos_per_request * self.max_video_bytes

    @property
    def grpc_max_message_bytes(self) -> int:
        # The largest GenerateRequest: every image and video at its limit plus text no longer than the HTTP body.
        return self.max_media_bytes + self.max_request_bytes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="OpenAI-compatible HTTP gateway in front of the InternVL language service (llm_svc). It "
                    "validates requests, loads image bytes, forwards one gRPC Generate per request (round-robin "
                    "over the llm_svc replicas) and streams the tokens back as SSE or JSON.",
        formatter_class=HelpFormatter)
    d = GatewayConfig
    parser.add_argument("--llm", required=True,
                        help="llm_svc replicas, comma-separated: HOST:PORT, dns:///HOST:PORT or ipv4:IP:PORT. Every "
                             "address a name resolves to (a headless Service: one per ready pod) is a replica; "
                             "names are resolved again every 30 s and after a failure. Requests are balanced "
                             "round-robin and retried once on another replica when one is down or full")
    parser.add_argument("--host", default=d.host, help="HTTP listen address")
    parser.add_argument("--port", type=int, default=d.port, help="HTTP listen port")
    api_key = parser.add_mutually_exclusive_group()
    api_key.add_argument("--api-key", metavar="KEY", default=None,
                         help="require 'Authorization: Bearer KEY' on /v1/* (else 401). Every user of the machine "
                              "sees it in `ps`: prefer --api-key-file, or the environment variable "
                              f"{API_KEY_ENV}, which is read when neither flag is given. With no key from any of "
                              "the three, /v1/* is open")
    api_key.add_argument("--api-key-file", metavar="PATH", type=pathlib.Path, default=None,
                         help="read the API key from this file once at startup (surrounding whitespace, such as "
                              "a trailing newline, is stripped); an unreadable or empty file stops the gateway")
    parser.add_argument("--served-model-name", default=None,
                        help="model name clients use; default: the name llm_svc reports in GetModelInfo")
    parser.add_argument("--allowed-local-media-path", type=pathlib.Path, default=None,
                        help="directory from which file:// image URLs may be read (resolved paths must stay "
                             "inside it); file:// URLs are refused when unset")
    parser.add_argument("--allow-private-image-urls", action="store_true",
                        help="allow http(s) image URLs that resolve to private, loopback, link-local or reserved "
                             "addresses (refused by default, against server-side request forgery)")
    parser.add_argument("--max-image-bytes", type=int, default=d.max_image_bytes,
                        help="largest encoded image accepted, in bytes (413 above it)")
    parser.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request,
                        help="most images in one request (400 above it)")
    parser.add_argument("--max-video-bytes", type=int, default=d.max_video_bytes,
                        help="largest encoded video_url accepted, in bytes (413 above it); fetched like images")
    parser.add_argument("--max-videos-per-request", type=int, default=d.max_videos_per_request,
                        help="most videos in one request (400 above it)")
    parser.add_argument("--image-fetch-timeout-s", type=float, default=d.image_fetch_timeout_s,
                        help="time limit for downloading one image URL, redirects included")
    parser.add_argument("--max-redirects", type=int, default=d.max_redirects,
                        help="most HTTP redirects followed when downloading an image")
    parser.add_argument("--request-timeout-s", type=float, default=d.request_timeout_s,
                        help="deadline of the gRPC Generate call (504 when it passes)")
    parser.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                        help="largest HTTP request body, in bytes (413 above it)")
    parser.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                        help="largest max_tokens a request may ask for (400 above it); requests that do not set "
                             "it are bounded by the model's context length, or by llm_svc's "
                             "--override-generation-config '{\"max_new_tokens\": N}'")
    parser.add_argument("--max-requests-in-flight", type=int, default=d.max_requests_in_flight,
                        help="most chat and completion requests served at once, streams included; beyond it a "
                             "request gets 429 with Retry-After at once")
    parser.add_argument("--max-bytes-in-flight", type=int, default=d.max_bytes_in_flight,
                        help="most bytes of request bodies and images held at once by the requests being served "
                             "(each holds them until its call to llm_svc is sent); a request that would pass it "
                             "gets 429 with Retry-After, and a body is taken only while it leaves room for the "
                             "most images and videos one request may bring. At least what one request may hold: "
                             "--max-request-bytes plus --max-images-per-request x --max-image-bytes plus "
                             "--max-videos-per-request x --max-video-bytes")
    parser.add_argument("--unavailable-cooldown-s", type=float, default=d.unavailable_cooldown_s,
                        help="how long a replica that answered UNAVAILABLE (down, or found silent by keepalive pings) "
                             "goes last in the balancer's order; after that, until its connection is back")
    parser.add_argument("--multiplex-llm-calls", action=argparse.BooleanOptionalAction, default=d.multiplex_llm_calls,
                        help="carry the requests to each llm_svc replica on one GenerateStream, so that the tokens "
                             "of requests that arrive together cost one gRPC message; --no-multiplex-llm-calls: "
                             "one Generate call per request (replicas without GenerateStream get that anyway)")
    parser.add_argument("--health-timeout-s", type=float, default=d.health_timeout_s,
                        help="time limit of the gRPC health checks behind GET /health and of GetModelInfo")
    parser.add_argument("--shutdown-grace-s", type=float, default=d.shutdown_grace_s,
                        help="on SIGTERM, time in-flight requests get to finish before they are cut")
    parser.add_argument("--keep-alive-timeout-s", type=float, default=d.keep_alive_timeout_s,
                        help="how long an idle HTTP keep-alive connection stays open. Keep it above the idle "
                             "timeout of the clients' connection pools (httpx and the openai SDK: 5 s, aiohttp: "
                             "15 s) and of any load balancer in front (often 60 s): a connection the gateway closes "
                             "just as a client reuses it costs that client a connection reset")
    parser.add_argument("--log-level", default=d.log_level, help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument("--log-json", action="store_true", help="write logs as one JSON object per line")
    add_security_flags(parser.add_argument_group("security of the gRPC hop to llm_svc"), serves_grpc=False,
                       peer="llm")
    add_tracing_flag(parser)
    return parser


def config_from_args(argv: list[str] | None = None) -> GatewayConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        security = pop_security_args(args, peer="llm")
    except ValueError as error:
        parser.error(str(error))
    return GatewayConfig(
        llm_targets=tuple(t.strip() for t in args.llm.split(",") if t.strip()),
        host=args.host, port=args.port, api_key=api_key_from(args, parser), served_model_name=args.served_model_name,
        allowed_local_media_path=args.allowed_local_media_path,
        allow_private_image_urls=args.allow_private_image_urls, max_image_bytes=args.max_image_bytes,
        max_images_per_request=args.max_images_per_request, max_video_bytes=args.max_video_bytes,
        max_videos_per_request=args.max_videos_per_request, image_fetch_timeout_s=args.image_fetch_timeout_s,
        max_redirects=args.max_redirects, request_timeout_s=args.request_timeout_s,
        max_request_bytes=args.max_request_bytes, max_tokens_limit=args.max_tokens_limit,
        max_requests_in_flight=args.max_requests_in_flight, max_bytes_in_flight=args.max_bytes_in_flight,
        unavailable_cooldown_s=args.unavailable_cooldown_s, multiplex_llm_calls=args.multiplex_llm_calls,
        health_timeout_s=args.health_timeout_s, shutdown_grace_s=args.shutdown_grace_s,
        keep_alive_timeout_s=args.keep_alive_timeout_s, log_level=args.log_level, log_json=args.log_json,
        otlp_traces_endpoint=args.otlp_traces_endpoint, **security)


def api_key_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> str | None:
    """--api-key or --api-key-file (argparse keeps them exclusive), else $GATEWAY_API_KEY, else None (no key)."""
    if args.api_key_file is not None:
        source = f"--api-key-file {args.api_key_file}"
        try:
            key = args.api_key_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            parser.error(f"{source}: cannot read the API key ({getattr(error, 'strerror', None) or error})")
    elif args.api_key is not None:
        source, key = "--api-key", args.api_key
    elif API_KEY_ENV in os.environ:
        source, key = API_KEY_ENV, os.environ[API_KEY_ENV]
    else:
        return None
    # Stripped from every source alike: an HTTP header cannot carry surrounding whitespace, so such a key could
    # never match; and an empty key would lock nobody out while looking like protection.
    key = key.strip()
    if not key:
        parser.error(f"{source}: the API key is empty")
    return key
