"""Distributed tracing shared by the stages: OpenTelemetry set up from a flag and the standard `OTEL_*` variables,
and the W3C trace context carried from hop to hop (HTTP headers into the gateway, gRPC metadata between stages).

Off unless asked for (`--otlp-traces-endpoint`, or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT):
then no SDK is even imported, and every helper here returns a shared no-op after reading one global, so the hot
paths pay nothing measurable. Callers build span attributes only under `span.is_recording()`.

Only the W3C trace context (`traceparent`, `tracestate`) crosses a hop: baggage a client sends is not taken in.
Spans are exported over OTLP (gRPC, or HTTP with OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL=http/protobuf) in batches
(OTEL_BSP_* tune them); the sampler is the SDK's, from OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG (default:
follow the caller's decision, sample every trace that starts here).
"""

import contextlib
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping

from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

FLAG = "--otlp-traces-endpoint"
TRACE_KEYS = ("traceparent", "tracestate")
_TRACE_HEADER_KEYS = tuple(key.encode() for key in TRACE_KEYS)
PROTOCOLS = ("grpc", "http/protobuf")

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_NO_SPAN = contextlib.nullcontext(trace.INVALID_SPAN)  # reusable: what every helper gives while tracing is off
_tracer: trace.Tracer | None = None


@dataclasses.dataclass(frozen=True)
class TracingSettings:
    endpoint: str  # the OTLP traces endpoint: HOST:PORT or a URL
    protocol: str  # grpc or http/protobuf
    service_name: str


def add_tracing_flag(parser) -> None:
    """The flag of the gateway and vision_svc; llm_svc has vLLM's engine flag of the same name and meaning."""
    parser.add_argument(FLAG, metavar="URL", default=None,
                        help="export OpenTelemetry traces over OTLP to this endpoint (HOST:PORT, or a URL; gRPC "
                             "unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf). Also turned on by "
                             "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT; off by default")


def settings_from(endpoint: str | None, default_service: str,
                  environ: Mapping[str, str] = os.environ) -> TracingSettings | None:
    """What the flag's `endpoint` and the OTEL_* variables ask for; None: tracing off. Raises ValueError for an
    unknown protocol."""
    protocol = (environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc").strip().lower()  # grpc by default, as vLLM's --otlp-traces-endpoint
    if endpoint is None:
        if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or \
                environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
            return None
        endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        if not endpoint and (base := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
            # The generic endpoint is a base URL: OTLP over HTTP appends the signal's path to it.
            endpoint = base if protocol == "grpc" else base.rstrip("/") + "/v1/traces"
    if not endpoint:
        return None
    if protocol not in PROTOCOLS:
        raise ValueError(f"OTLP protocol {protocol!r} is not supported; use one of {', '.join(PROTOCOLS)}")
    return TracingSettings(endpoint.strip(), protocol, environ.get("OTEL_SERVICE_NAME") or default_service)


def start_tracing(endpoint: str | None, default_service: str) -> Callable[[], None]:
    """`configure` with the settings of the flag's `endpoint` and the environment; exits naming what is wrong."""
    try:
        settings = settings_from(endpoint, default_service)
    except ValueError as error:
        sys.exit(f"{default_service}: cannot start: {error}")
    return configure(settings)


def configure(settings: TracingSettings | None) -> Callable[[], None]:
    """Sets up the SDK for this process (the global tracer provider: vLLM's own spans go through it too) and
    returns the function that flushes and stops it, to call at exit. A no-op when `settings` is None."""
    if settings is None:
        return lambda: None
    provider = make_provider(settings)
    trace.set_tracer_provider(provider)
    use_provider(provider)
    log.info("tracing: spans of %s go to %s over OTLP (%s)", settings.service_name, settings.endpoint,
             settings.protocol)
    return provider.shutdown


def make_provider(settings: TracingSettings):
    """An SDK tracer provider exporting in batches over OTLP as `settings` say."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    # The sampler comes from OTEL_TRACES_SAMPLER(_ARG); resource attributes from OTEL_RESOURCE_ATTRIBUTES too.
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    provider.add_span_processor(BatchSpanProcessor(ThisProcessOnly(_otlp_exporter(settings))))
    return provider


def use_provider(provider: trace.TracerProvider | None) -> None:
    """Spans from here on go to `provider`; None turns tracing off. `configure` calls it; tests call it directly."""
    global _tracer
    _tracer = provider.get_tracer("internvl_dvd") if provider is not None else None


def _otlp_exporter(settings: TracingSettings):
    if settings.protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        # HOST:PORT without a scheme is a plaintext collector, as with vLLM's flag; https:// is TLS.
        insecure = True if "://" not in settings.endpoint else None
        return OTLPSpanExporter(endpoint=settings.endpoint, insecure=insecure)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    endpoint = settings.endpoint if "://" in settings.endpoint else f"http://{settings.endpoint}"
    return OTLPSpanExporter(endpoint=endpoint)


class ThisProcessOnly:
    """Exports only from the process that made it. Where vLLM forks a process from llm_svc, the copy of the
    exporter there would use gRPC across a fork, which gRPC does not support: spans made there are dropped.
    (Spawned engine and worker processes set up vLLM's own exporter, from the environment.)"""

    def __init__(self, exporter):
        self._exporter = exporter
        self._pid = os.getpid()

    def export(self, spans):
        from opentelemetry.sdk.trace.export import SpanExportResult
        if os.getpid() != self._pid:
            return SpanExportResult.SUCCESS
        return self._exporter.export(spans)

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return os.getpid() != self._pid or self._exporter.force_flush(timeout_millis)

    def shutdown(self) -> None:
        if os.getpid() == self._pid:
            self._exporter.shutdown()


def enabled() -> bool:
    return _tracer is not None


def current_span() -> trace.Span:
    """The span current here (a non-recording one while tracing is off)."""
    if _tracer is None:
        return trace.INVALID_SPAN
    return trace.get_current_span()


def span(name: str):
    """A span current for the block (the child of the current one); yields the span."""
    if _tracer is None:
        return _NO_SPAN
    return _tracer.start_as_current_span(name)


def grpc_server_span(name: str, context):
    """The span of one gRPC call being served, its parent the trace context in the call's metadata (`context` is
    the grpc.aio.ServicerContext); current for the block."""
    if _tracer is None:
        return _NO_SPAN
    return _server_span(name, context.invocation_metadata() or ())


def http_server_span(name: str, headers: Iterable[tuple[bytes, bytes]]):
    """The span of one HTTP request being served, its parent the caller's `traceparent` header (ASGI headers:
    lower-case byte pairs); current for the block."""
    if _tracer is None:
        return _NO_SPAN
    return _server_span(name, ((k.decode(), v.decode("latin-1")) for k, v in headers if k in _TRACE_HEADER_KEYS))


def _server_span(name: str, pairs: Iterable[tuple[str, str | bytes]]):
    carrier = {key: value for key, value in pairs if key in TRACE_KEYS and isinstance(value, str)}
    return _tracer.start_as_current_span(name, context=_PROPAGATOR.extract(carrier), kind=trace.SpanKind.SERVER)


def outgoing_metadata() -> tuple[tuple[str, str], ...] | None:
    """The current trace context as gRPC metadata for a call to the next stage; None while tracing is off."""
    headers = trace_headers()
    return tuple(headers.items()) if headers else None


def trace_headers() -> dict[str, str] | None:
    """The current trace context as W3C headers (what vLLM's engine takes as `trace_headers`); None while off."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier or None


def record_span(name: str, start_ns: int, end_ns: int, attributes: Mapping | None = None) -> None:
    """A finished span of the current one, with times measured elsewhere (another thread, the engine's clock)."""
    if _tracer is None:
        return
    child = _tracer.start_span(name, start_time=start_ns)
    if attributes:
        child.set_attributes(attributes)
    child.end(end_time=max(end_ns, start_ns))


def wall_ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as nanoseconds since the epoch, what spans are stamped with. The monotonic clock
    is one for every process of a host, so this converts the engine process's timestamps too."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)
