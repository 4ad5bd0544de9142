"""llm_svc.engine_spans: the engine's queue, prefill and decode as spans from vLLM's per-request timestamps."""

import dataclasses
import time

from llm_svc.engine_spans import record_engine_phases


@dataclasses.dataclass
class Stats:
    """The fields of vLLM's RequestStateStats that the spans read (engine-process monotonic seconds)."""
    queued_ts: float = 0.0
    scheduled_ts: float = 0.0
    first_token_ts: float = 0.0
    last_token_ts: float = 0.0


def test_queue_prefill_and_decode_follow_each_other(recorded):
    now = time.monotonic()
    record_engine_phases(Stats(now - 1.0, now - 0.75, now - 0.5, now), prompt_tokens=300, cached_tokens=16,
                         completion_tokens=9)
    queue, prefill, decode = recorded.get_finished_spans()
    assert (queue.name, prefill.name, decode.name) == ("engine_queue", "prefill", "decode")
    assert queue.end_time == prefill.start_time and prefill.end_time == decode.start_time
    assert abs((queue.end_time - queue.start_time) - 250_000_000) < 1_000_000
    assert abs(decode.end_time - time.time_ns()) < 100_000_000  # on the wall clock
    assert dict(prefill.attributes) == {"prompt_tokens": 300, "cached_tokens": 16}
    assert dict(decode.attributes) == {"completion_tokens": 9}


def test_phases_the_request_never_reached_are_left_out(recorded):
    now = time.monotonic()
    record_engine_phases(Stats(now - 1.0, now - 0.5), 10, 0, 0)  # aborted before its first token
    record_engine_phases(Stats(now - 1.0), 10, 0, 0)  # aborted in the queue
    record_engine_phases(None, 10, 0, 0)  # vLLM's stats turned off
    assert [span.name for span in recorded.get_finished_spans()] == ["engine_queue"]


def test_off_nothing_is_read():
    record_engine_phases(object(), 1, 0, 1)  # not even the attributes of the stats
