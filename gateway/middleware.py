"""Per-request context around every HTTP request: the request id (logs, response header) and the metrics."""

import re
import time
import uuid

from gateway.metrics import GatewayMetrics
from protos.logs import request_id_var

# Client ids are echoed in headers and logs: keep them short and plain.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics"}


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"x-request-id":
            candidate = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(candidate):
                return candidate
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware), so streamed responses and client disconnects pass through untouched."""

    def __init__(self, app, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_from(scope["headers"])
        started = time.perf_counter()
        # Starlette exposes scope["state"] as request.state.
        scope.setdefault("state", {}).update(request_id=request_id, started=started)
        endpoint = scope["path"] if scope["path"] in _ENDPOINTS else "other"
        status = 500

        async def send_with_request_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        token = request_id_var.set(request_id)
        self.metrics.in_flight.labels(endpoint).inc()
        try:
            await self.app(scope, receive, send_with_request_id)
        finally:
            self.metrics.in_flight.labels(endpoint).dec()
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
            request_id_var.reset(token)
