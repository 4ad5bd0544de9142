"""A small OTLP trace receiver (gRPC `opentelemetry.proto.collector.trace.v1.TraceService`) inside one process.

`deploy.local --trace` starts one and prints each span the stages export as one line, for a look at where a
request's time goes without running a collector; the tests and the tracing bench read the spans it keeps. It
is no collector: spans are held in memory (the newest `max_spans`) and go nowhere else.
"""

import collections
import concurrent.futures
import dataclasses
import threading
from collections.abc import Callable

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

MAX_SPANS = 100_000
MAX_MESSAGE_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str  # 16 hex digits, "" for a root span
    start_ns: int
    end_ns: int
    attributes: dict

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def spans_of(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        resource = attributes_of(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(ReceivedSpan(str(resource.get("service.name", "")), span.name, span.trace_id.hex(),
                                          span.span_id.hex(), span.parent_span_id.hex(), span.start_time_unix_nano,
                                          span.end_time_unix_nano, attributes_of(span.attributes)))
    return spans


def attributes_of(pairs) -> dict:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: common_pb2.AnyValue):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind in (None, "kvlist_value"):
        return None
    return getattr(value, kind)


class TraceCollector(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps the spans it receives; `on_spans` (if given) sees each export's new spans as they arrive. An exporter
    whose call timed out sends the batch again: a span already held is not taken twice."""

    def __init__(self, on_spans: Callable[[list[ReceivedSpan]], None] | None = None, max_spans: int = MAX_SPANS):
        self._spans: collections.OrderedDict[tuple[str, str], ReceivedSpan] = collections.OrderedDict()
        self._max_spans = max_spans
        self._lock = threading.Lock()
        self._on_spans = on_spans
        self._server: grpc.Server | None = None
        self.address: str | None = None

    def Export(self, request, context):
        with self._lock:
            spans = [s for s in spans_of(request) if (s.trace_id, s.span_id) not in self._spans]
            self._spans.update(((s.trace_id, s.span_id), s) for s in spans)
            while len(self._spans) > self._max_spans:
                self._spans.popitem(last=False)
        if self._on_spans is not None:
            self._on_spans(spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serves on `host:port` (0: a free port); returns the HOST:PORT that --otlp-traces-endpoint takes."""
        self._server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=4),
                                   options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)])
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        bound = self._server.add_insecure_port(f"{host}:{port}")
        self._server.start()
        self.address = f"{host}:{bound}"
        return self.address

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(0)

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self._spans.values() if trace_id is None or s.trace_id == trace_id]

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()


def span_line(span: ReceivedSpan) -> str:
    """One span for a terminal: its trace, service, name, duration and attributes."""
    attributes = " ".join(f"{k}={v}" for k, v in span.attributes.items())
    return f"trace {span.trace_id[:12]} {span.service:<10} {span.name:<28} {span.duration_ms:9.2f} ms  {attributes}"
