"""One trace per request across the real stages: the gateway, llm_svc (vLLM's engine) and vision_svc export
their spans over OTLP to a receiver in this process, and a chat request with an image comes back as one trace
with every stage's phases in the order the request went through them.

The package's shared stages are the traced ones (tests/gateway/conftest.py `stack`): vision_svc and the gateway
turned on by the flag, llm_svc by OTEL_EXPORTER_OTLP_ENDPOINT alone.
"""

import base64
import random
import time
import uuid

import pytest

from deploy.trace_collector import ReceivedSpan, TraceCollector
from tests.gateway.conftest import MODEL, png_bytes

GATEWAY_SPANS = {"POST /v1/chat/completions", "parse", "image_fetch"}
LLM_SPANS = {"LanguageModel/Generate", "render", "vision_wait", "admission", "engine_queue", "prefill", "decode",
             "llm_request"}
VISION_SPANS = {"VisionEncoder/Encode", "preprocess", "image_decode", "batch_wait", "encode", "stream"}
ALL_SPANS = GATEWAY_SPANS | LLM_SPANS | VISION_SPANS
# An image the vision stage holds already: no decoding or encoding.
CACHE_HIT_SPANS = GATEWAY_SPANS | LLM_SPANS | {"VisionEncoder/Encode", "stream"}


# An image no other test of the shared stages sends: the first request here must encode it.
COLOR = tuple(random.randrange(256) for _ in range(3))


@pytest.fixture(scope="module")
def traced(stack, client):
    return client, stack["traces"]


def chat_with_image(client, headers: dict):
    url = "data:image/png;base64," + base64.b64encode(png_bytes((72, 40), COLOR)).decode()
    return client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, extra_headers=headers, messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                     {"type": "text", "text": "Describe the image."}]}])


def trace_of(collector: TraceCollector, request_id: str, expected: set[str],
             timeout_s: float = 30.0) -> dict[str, ReceivedSpan]:
    """The spans of the trace whose gateway span carries `request_id`, by name, once the `expected` have arrived."""
    deadline = time.monotonic() + timeout_s
    while True:
        roots = [s for s in collector.spans() if s.attributes.get("request.id") == request_id
                 and s.service == "gateway"]
        spans = {s.name: s for s in collector.spans(roots[0].trace_id)} if roots else {}
        if expected <= spans.keys() or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


def test_one_trace_crosses_the_three_stages_in_order(traced):
    client, collector = traced
    request_id = f"traced-{uuid.uuid4().hex[:8]}"
    answer = chat_with_image(client, {"x-request-id": request_id})
    spans = trace_of(collector, request_id, ALL_SPANS)
    missing = ALL_SPANS - spans.keys()
    assert not missing, f"missing spans {missing}; got {sorted(spans)}"
    assert {s.service for s in spans.values()} == {"gateway", "llm_svc", "vision_svc"}

    def parent(name: str) -> str:
        return next(s.name for s in spans.values() if s.span_id == spans[name].parent_span_id)

    request = spans["POST /v1/chat/completions"]
    assert request.parent_span_id == ""  # no caller's context: the gateway starts the trace
    assert parent("parse") == parent("image_fetch") == parent("LanguageModel/Generate") == request.name
    for name in ("render", "vision_wait", "engine_queue", "prefill", "decode", "llm_request"):
        assert parent(name) == "LanguageModel/Generate", name
    assert parent("admission") == parent("VisionEncoder/Encode") == "vision_wait"
    for name in ("preprocess", "batch_wait", "encode", "stream"):
        assert parent(name) == "VisionEncoder/Encode", name
    assert parent("image_decode") == "preprocess"
    # The phases follow one another in time as the request went through them.
    order = ["parse", "image_fetch", "render", "vision_wait", "admission", "engine_queue", "prefill", "decode"]
    starts = [spans[name].start_ns for name in order]
    assert starts == sorted(starts), list(zip(order, starts))
    assert spans["preprocess"].end_ns <= spans["batch_wait"].end_ns <= spans["encode"].end_ns
    assert spans["admission"].end_ns <= spans["VisionEncoder/Encode"].start_ns  # refused before any encoding

    wait = spans["vision_wait"].attributes
    assert wait["images"] == 1 and wait["tiles"] >= 1 and wait["cache_hits"] == 0 and wait["bytes"] > 0
    assert wait["vision.replica"]
    assert spans["stream"].attributes["bytes"] == wait["bytes"]
    assert spans["encode"].attributes["tiles"] == wait["tiles"]
    assert spans["image_fetch"].attributes["bytes"] > 0
    assert spans["decode"].attributes["completion_tokens"] == answer.usage.completion_tokens
    assert spans["prefill"].attributes["prompt_tokens"] == answer.usage.prompt_tokens


def test_a_callers_traceparent_becomes_the_parent(traced):
    client, collector = traced
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    request_id = f"traced-{uuid.uuid4().hex[:8]}"
    chat_with_image(client, {"x-request-id": request_id, "traceparent": f"00-{trace_id}-{parent_id}-01"})
    spans = trace_of(collector, request_id, CACHE_HIT_SPANS)
    assert CACHE_HIT_SPANS <= spans.keys(), sorted(spans)
    assert spans["POST /v1/chat/completions"].trace_id == trace_id
    assert spans["POST /v1/chat/completions"].parent_span_id == parent_id
    assert {s.service for s in spans.values()} == {"gateway", "llm_svc", "vision_svc"}
    # The same image again: the vision stage answers from its cache, and the trace says so.
    assert spans["vision_wait"].attributes["cache_hits"] == 1
