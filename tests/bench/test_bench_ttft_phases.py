"""bench.ttft_phases' span arithmetic, on span records shaped like the trace collector's; its figures are in
bench/RESULTS.md."""

import argparse

import pytest

from bench.ttft_phases import (OURS, REST, ROOT_SPAN, VLLM, VLLM_PHASES, VLLM_SPAN, Case, Sent, medians,
                               merged, our_phases, phase_table, phases_of, vllm_phases)
from deploy.trace_collector import ReceivedSpan

MS = 1_000_000  # ns


def span(name: str, start_ms: float, end_ms: float, trace_id: str = "t1", **attributes) -> ReceivedSpan:
    return ReceivedSpan("svc", name, trace_id, name[:16], "", int(start_ms * MS), int(end_ms * MS), attributes)


def image_request(trace_id: str = "t1") -> list[ReceivedSpan]:
    """One request with a fresh image, its first token at the client 100 ms after it was sent."""
    return [span(name, start, end, trace_id) for name, start, end in [
        (ROOT_SPAN, 2, 99), ("parse", 3, 5), ("image_fetch", 5, 6),
        ("LanguageModel/Generate", 8, 99), ("render", 9, 10), ("vision_wait", 10, 60), ("admission", 10, 13),
        ("VisionEncoder/Encode", 15, 55), ("preprocess", 16, 26), ("image_decode", 16, 20),
        ("batch_wait", 26, 27), ("encode", 27, 47), ("stream", 47, 53),
        ("engine_queue", 65, 66), ("prefill", 66, 90), ("decode", 90, 120), ("llm_request", 63, 121)]]


def test_each_phase_takes_its_spans_time_and_the_phases_add_up_to_the_ttft():
    times = our_phases(image_request(), 0, 100 * MS)
    assert times == pytest.approx({
        "gateway: body parse, data-URL decode": 3,
        "llm_svc: chat template": 1,
        "vision_svc: JPEG decode": 4,
        "vision_svc: resize, tile, normalize": 10 - 4,  # preprocess less image_decode, its child
        "vision_svc: batch wait": 1,
        "vision_svc: encoder": 20,
        "vision_svc: embeddings transfer": 6,
        "llm_svc: admission check": 3,
        "llm_svc: call to vision_svc": 15 - 10 - 3,  # vision_wait's start to vision_svc's span, less admission
        "vision_svc: cache lookup, answer back": 50 - 5 - 10 - 21 - 6,  # what is left of vision_wait
        "llm_svc: engine input (render, tokenize, hand-off)": 5,  # vision_wait's end to the engine's queue
        "engine: queue": 1,
        "engine: prefill (LM only)": 24,
        "first token back (llm_svc, gateway, SSE)": 10,  # prefill's end to the client's first chunk
        "gateway: request in, call to llm_svc": 8 - 3,  # send to llm_svc's span, less parse and fetch
        REST: 1,  # llm_svc before its render
        "TTFT": 100})
    assert sum(v for k, v in times.items() if k != "TTFT") == pytest.approx(100)


def test_spans_past_the_first_token_are_clipped_and_overlaps_count_once():
    spans = [span(ROOT_SPAN, 1, 300), span("parse", 2, 4),
             span("image_fetch", 3, 6), span("image_fetch", 5, 7),  # two images fetched at once
             span("LanguageModel/Generate", 8, 300), span("prefill", 40, 250)]
    times = our_phases(spans, 0, 50 * MS)
    assert times["gateway: body parse, data-URL decode"] == pytest.approx(5)  # 2..7
    assert times["engine: prefill (LM only)"] == pytest.approx(10)  # 40..50: the client saw a token at 50
    assert times["first token back (llm_svc, gateway, SSE)"] == 0  # prefill ends after the first token
    assert sum(v for k, v in times.items() if k != "TTFT") == pytest.approx(50)


def test_a_cached_image_has_no_preprocess_or_encode_and_a_phase_without_its_spans_is_zero():
    spans = [s for s in image_request() if s.name not in {"preprocess", "image_decode", "batch_wait", "encode",
                                                           "engine_queue"}]
    times = our_phases(spans, 0, 100 * MS)
    for phase in ("JPEG decode", "resize, tile, normalize", "batch wait", "encoder"):
        assert times[f"vision_svc: {phase}"] == 0
    assert times["engine: queue"] == 0
    assert times["llm_svc: engine input (render, tokenize, hand-off)"] == 0  # no engine_queue to end it
    assert times["vision_svc: cache lookup, answer back"] == pytest.approx(50 - 5 - 6)


def test_a_request_is_left_out_until_vision_svcs_spans_have_come_too():
    """Each process exports its spans in its own batches: without vision_svc's, its time would be the call's."""
    sent = Sent(OURS, "896x896, repeated", "t1", 0, 100 * MS)
    vision_svc_spans = {"VisionEncoder/Encode", "preprocess", "image_decode", "batch_wait", "encode", "stream"}
    assert phases_of(sent, {"t1": [s for s in image_request() if s.name not in vision_svc_spans]}) is None
    assert phases_of(sent, {"t1": image_request()}) == our_phases(image_request(), 0, 100 * MS)


def test_vllms_phases_come_from_its_request_span():
    request = span(VLLM_SPAN, 10, 200, **{"gen_ai.latency.time_in_queue": 0.002,
                                          "gen_ai.latency.time_in_model_prefill": 0.05})
    times = vllm_phases(request, 0, 100 * MS)
    assert [times[label] for label in VLLM_PHASES] == pytest.approx([10, 2, 50, 38])
    assert times["TTFT"] == pytest.approx(100)


def test_merged_joins_overlapping_and_touching_intervals_and_drops_empty_ones():
    assert merged([(5, 7), (1, 3), (3, 4), (6, 9), (10, 10)]) == [(1, 4), (5, 9)]


def test_medians_per_key():
    assert medians([{"a": 1.0, "b": 5.0}, {"a": 3.0, "b": 1.0}, {"a": 2.0, "b": 2.0}]) == {"a": 2.0, "b": 2.0}
    assert medians([{"a": 1.0}, {"a": 4.0}]) == {"a": 2.5}
    assert medians([]) == {}


def test_the_table_gives_each_system_and_their_ratio():
    case = Case("448x448, fresh", (448, 448), True)
    args = argparse.Namespace(cases=[case])
    traces = {"ours": image_request("ours"),
              "theirs": [span(VLLM_SPAN, 5, 90, "theirs", **{"gen_ai.latency.time_in_queue": 0.001,
                                                              "gen_ai.latency.time_in_model_prefill": 0.03})]}
    sent = [Sent(OURS, case.label, "ours", 0, 100 * MS), Sent(VLLM, case.label, "theirs", 0, 50 * MS)]
    table = phase_table(args, sent, traces)
    assert "| engine: prefill (LM only) | prefill (encoder + LM) | 24 |" in table
    assert f"| **{OURS}: TTFT** |  | 100 |" in table
    assert "| vLLM: prefill (encoder + LM) |  | 30 |" in table
    assert f"| **{VLLM}: TTFT** |  | 50 |" in table
    assert "| **ours / vLLM** |  | 2.00x |" in table
