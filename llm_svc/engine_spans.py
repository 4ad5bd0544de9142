"""The engine's phases of one request as spans, from the timestamps vLLM keeps for it (`RequestOutput.metrics`,
vLLM's RequestStateStats): queued -> scheduled (engine queue) -> first token (prefill) -> last token (decode).

vLLM stamps them in its engine process with time.monotonic(), one clock for every process of the host, so they
convert to the wall-clock times spans carry. vLLM's own span of the request (`llm_request`, made when it has
`--otlp-traces-endpoint`) covers the same interval as one span, its phases as attributes.
"""

from protos import tracing


def record_engine_phases(stats, prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
    """Children of the current span; nothing while tracing is off or when vLLM kept no timestamps (stats off)."""
    if not tracing.enabled() or stats is None:
        return
    queued, scheduled, first, last = (getattr(stats, name, 0.0) or 0.0
                                      for name in ("queued_ts", "scheduled_ts", "first_token_ts", "last_token_ts"))
    if not (queued and scheduled):
        return  # never scheduled (aborted in the queue)
    zero_ns = tracing.wall_ns(0.0)  # read once, so that each phase ends exactly where the next begins

    def wall(ts: float) -> int:
        return zero_ns + int(ts * 1e9)

    tracing.record_span("engine_queue", wall(queued), wall(scheduled))
    if first:
        tracing.record_span("prefill", wall(scheduled), wall(first),
                            {"prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens})
    if first and last:
        tracing.record_span("decode", wall(first), wall(last), {"completion_tokens": completion_tokens})
