"""protos.tracing: settings from the flag and OTEL_*, the no-op while off, the W3C context across a hop, and the
OTLP export itself (to the receiver of deploy.trace_collector)."""

import time

import pytest

from deploy.trace_collector import TraceCollector
from protos import tracing

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.mark.parametrize("flag, environ, expected", [
    (None, {}, None),
    ("127.0.0.1:4317", {}, ("127.0.0.1:4317", "grpc", "svc")),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, ("http://c:4317", "grpc", "svc")),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ("http://c:4317", "grpc", "svc")),
    # Over HTTP the generic endpoint is a base URL; the traces endpoint is used as given.
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
     ("http://c:4318/v1/traces", "http/protobuf", "svc")),
    (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/t", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL":
            "http/protobuf", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, ("http://c:4318/t", "http/protobuf", "svc")),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SERVICE_NAME": "mine"},
     ("http://c:4317", "grpc", "mine")),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"}, None),
    (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_TRACES_EXPORTER": "none"}, None),
])
def test_settings_from_the_flag_and_the_environment(flag, environ, expected):
    settings = tracing.settings_from(flag, "svc", environ)
    assert (settings and (settings.endpoint, settings.protocol, settings.service_name)) == expected


def test_an_unknown_protocol_is_refused_by_name():
    with pytest.raises(ValueError, match="'http/json'"):
        tracing.settings_from("c:4317", "svc", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})


def test_off_everything_is_the_shared_no_op():
    assert not tracing.enabled()
    with tracing.span("x") as span, tracing.http_server_span("y", [(b"traceparent", TRACEPARENT.encode())]) as server:
        assert not span.is_recording() and not server.is_recording()
    assert tracing.span("x") is tracing.span("y")  # nothing made per call
    assert tracing.outgoing_metadata() is None and tracing.trace_headers() is None
    assert not tracing.current_span().is_recording()
    tracing.record_span("z", 1, 2)  # nothing to record into, and no error


class _Context:
    """What a grpc.aio servicer context gives a servicer: the call's metadata."""

    def __init__(self, metadata):
        self._metadata = metadata

    def invocation_metadata(self):
        return self._metadata


def test_the_context_goes_out_as_metadata_and_comes_back_as_the_parent(recorded):
    with tracing.span("client side") as client:
        metadata = tracing.outgoing_metadata()
    assert dict(metadata)["traceparent"].split("-")[2] == format(client.get_span_context().span_id, "016x")
    with tracing.grpc_server_span("Service/Call", _Context((("authorization", "Bearer x"), *metadata))) as server:
        with tracing.span("phase"):
            pass
    by_name = {span.name: span for span in recorded.get_finished_spans()}
    client_span, server_span, phase = by_name["client side"], by_name["Service/Call"], by_name["phase"]
    assert server_span.parent.span_id == client_span.context.span_id
    assert server_span.context.trace_id == client_span.context.trace_id
    assert phase.parent.span_id == server.get_span_context().span_id


def test_a_callers_traceparent_header_is_the_parent_and_baggage_stays_out(recorded):
    headers = [(b"traceparent", TRACEPARENT.encode()), (b"baggage", b"user=alice")]
    with tracing.http_server_span("POST /v1/chat/completions", headers):
        headers_out = tracing.trace_headers()
    (span,) = recorded.get_finished_spans()
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert format(span.parent.span_id, "016x") == PARENT_ID
    assert set(headers_out) == {"traceparent"}


@pytest.mark.parametrize("traceparent", ["garbage", "00-" + "0" * 32 + "-" + PARENT_ID + "-01", "x" * 10_000])
def test_a_malformed_traceparent_starts_a_new_trace(recorded, traceparent):
    with tracing.http_server_span("GET /health", [(b"traceparent", traceparent.encode("latin-1"))]):
        pass
    (span,) = recorded.get_finished_spans()
    assert span.parent is None


def test_recorded_spans_keep_the_times_given(recorded):
    with tracing.span("parent") as parent:
        tracing.record_span("phase", 1_000, 5_000, {"tiles": 3})
        tracing.record_span("backwards", 9_000, 8_000)  # clocks that disagree give an empty span, not an error
    phase, backwards, _ = recorded.get_finished_spans()
    assert (phase.start_time, phase.end_time, phase.attributes["tiles"]) == (1_000, 5_000, 3)
    assert phase.parent.span_id == parent.get_span_context().span_id
    assert backwards.end_time == backwards.start_time


def test_wall_ns_converts_monotonic_readings():
    now_ns = time.time_ns()
    assert abs(tracing.wall_ns(time.monotonic() - 2.0) - (now_ns - 2_000_000_000)) < 50_000_000


class _Exporter:
    def __init__(self):
        self.exported = []

    def export(self, spans):
        self.exported.append(spans)

    def force_flush(self, timeout_millis=0):
        return True

    def shutdown(self):
        pass


def test_a_forked_copy_of_the_exporter_sends_nothing():
    inner = _Exporter()
    exporter = tracing.ThisProcessOnly(inner)
    exporter.export(["a"])
    exporter._pid = -1  # as seen from a forked child
    exporter.export(["b"])
    assert inner.exported == [["a"]]


@pytest.mark.parametrize("scheme", ["", "http://"])
def test_spans_reach_an_otlp_receiver_over_grpc(scheme):
    collector = TraceCollector()
    endpoint = collector.start()
    provider = tracing.make_provider(tracing.TracingSettings(scheme + endpoint, "grpc", "test_svc"))
    tracing.use_provider(provider)
    try:
        with tracing.span("outer"):
            tracing.record_span("inner", 10, 20, {"bytes": 7})
    finally:
        tracing.use_provider(None)
        provider.shutdown()  # flushes the batch
        collector.stop()
    inner, outer = sorted(collector.spans(), key=lambda s: s.name)
    assert (inner.service, inner.attributes, inner.parent_span_id) == ("test_svc", {"bytes": 7}, outer.span_id)
    assert (inner.start_ns, inner.end_ns) == (10, 20)


def test_the_receiver_takes_a_batch_sent_again_once():
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    request = trace_service_pb2.ExportTraceServiceRequest(resource_spans=[trace_pb2.ResourceSpans(scope_spans=[
        trace_pb2.ScopeSpans(spans=[trace_pb2.Span(trace_id=bytes(range(16)), span_id=bytes(range(8)), name="s")])])])
    seen = []
    collector = TraceCollector(on_spans=seen.extend)
    collector.Export(request, None)
    collector.Export(request, None)  # the exporter's retry after its call timed out
    assert [s.name for s in collector.spans()] == [s.name for s in seen] == ["s"]
