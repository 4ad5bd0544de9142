"""Prometheus metrics of the language stage; vLLM's own engine metrics share the same registry."""

from prometheus_client import Counter, Gauge, Histogram

from protos.work_limits import WorkLimit

REQUESTS = Counter("llm_svc_requests", "Generate requests by final status code", ["code"])
RUNNING = Gauge("llm_svc_running_requests", "Generate requests in flight")
ADMITTED_REQUESTS = Gauge("llm_svc_admitted_requests",
                          "Generate requests holding a slot of --max-requests-in-flight")
HELD_BYTES = Gauge("llm_svc_held_bytes", "Bytes held by the requests being served (messages, embeddings received), "
                                         "counted against --max-bytes-in-flight")
TTFT_SECONDS = Histogram("llm_svc_time_to_first_token_seconds", "Request arrival to first token, vision included",
                         buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
VISION_SECONDS = Histogram("llm_svc_vision_seconds", "Time spent waiting for the vision stage per request",
                           buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
PROMPT_TOKENS = Counter("llm_svc_prompt_tokens", "Prompt tokens processed")
COMPLETION_TOKENS = Counter("llm_svc_completion_tokens", "Tokens generated, counted as each request ends")


def watch_work_limit(limit: WorkLimit) -> None:
    """The gauges read `limit` whenever they are scraped, so they never drift from it."""
    ADMITTED_REQUESTS.set_function(lambda: limit.requests)
    HELD_BYTES.set_function(lambda: limit.bytes)
