"""Prometheus metrics of the gateway, in a registry of their own (one per app, so tests can build many)."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from protos.work_limits import WorkLimit

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class GatewayMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("gateway_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("gateway_request_latency_seconds", "Time from request to last byte sent",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("gateway_requests_in_flight", "Requests being served", ["endpoint"], registry=r)
        self.ttft = Histogram("gateway_time_to_first_token_seconds",
                              "Time from request to the first message of llm_svc", ["endpoint"],
                              buckets=_TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("gateway_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("gateway_completion_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.image_bytes = Counter("gateway_image_bytes", "Encoded image bytes forwarded to llm_svc", registry=r)

    def watch_work_limit(self, limit: WorkLimit) -> None:
        Gauge("gateway_admitted_requests", "Generation requests admitted and not yet finished",
              registry=self.registry).set_function(lambda: limit.requests)
        Gauge("gateway_admitted_bytes", "Bytes of request bodies and images held by admitted requests",
              registry=self.registry).set_function(lambda: limit.bytes)
