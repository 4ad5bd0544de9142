"""ASGI middleware: the per-request context (request id for logs and the response header, metrics) around every
request, the API key around the API's, and the work limit (with the client's watch) around each generation request."""

import hmac
import logging
import re
import time
import uuid

from gateway.client_watch import ClientWatch
from gateway.error_handlers import error_response
from gateway.errors import Unauthenticated
from gateway.metrics import GatewayMetrics
from protos import tracing
from protos.errors import Overloaded
from protos.logs import request_id_var
from protos.work_limits import WorkLimit

log = logging.getLogger(__name__)

# Client ids are echoed in headers and logs: keep them short and plain.
_VALID_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")


def request_id_from(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"x-request-id":
            candidate = value.decode("latin-1")
            if _VALID_REQUEST_ID.fullmatch(candidate):
                return candidate
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Plain ASGI (not BaseHTTPMiddleware), so streamed responses and client disconnects pass through untouched."""

    def __init__(self, app, metrics: GatewayMetrics, endpoints: set[str]):
        self.app = app
        self.metrics = metrics
        # Metrics are labelled by these paths; any other path is "other", so clients cannot mint labels.
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_from(scope["headers"])
        started = time.perf_counter()
        # Starlette exposes scope["state"] as request.state.
        scope.setdefault("state", {}).update(request_id=request_id, started=started)
        endpoint = scope["path"] if scope["path"] in self.endpoints else "other"
        status = 500

        async def send_with_request_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        token = request_id_var.set(request_id)
        self.metrics.in_flight.labels(endpoint).inc()
        # The request's trace: a child of the caller's `traceparent`, when it sends one.
        with tracing.http_server_span(f"{scope['method']} {endpoint}", scope["headers"]) as span:
            try:
                await self.app(scope, receive, send_with_request_id)
            finally:
                if span.is_recording():
                    span.set_attributes({"http.response.status_code": status, "request.id": request_id})
                self._done(endpoint, status, started)
                request_id_var.reset(token)

    def _done(self, endpoint: str, status: int, started: float) -> None:
        self.metrics.in_flight.labels(endpoint).dec()
        self.metrics.requests.labels(endpoint, str(status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


class ApiKeyMiddleware:
    """With `api_key` set, a request to `endpoints` without it (`Authorization: Bearer <key>`) is answered 401 before
    it is admitted or read."""

    def __init__(self, app, api_key: str | None, endpoints: set[str]):
        self.app = app
        self.api_key = None if api_key is None else api_key.encode()
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send):
        if self.api_key is not None and scope["type"] == "http" and scope["path"] in self.endpoints:
            if not self._brings_key(scope["headers"]):
                error = Unauthenticated("missing or wrong API key (send 'Authorization: Bearer <key>')")
                log.info("%s %s refused: %s", scope["method"], scope["path"], error)
                return await error_response(error)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _brings_key(self, headers: list[tuple[bytes, bytes]]) -> bool:
        for name, value in headers:
            if name.lower() == b"authorization":
                scheme, _, key = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(key, self.api_key)
        return False


class WorkLimitMiddleware:
    """Admits each request to `endpoints` against the gateway's work limit for its whole life, streamed answer
    included, and answers 429 with Retry-After past it. The admitted work is `request.state.work`, against which
    the route holds the request's bytes; `request.state.client` watches for the client's disconnect as long."""

    def __init__(self, app, limit: WorkLimit, endpoints: set[str]):
        self.app = app
        self.limit = limit
        self.endpoints = endpoints

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.endpoints:
            return await self.app(scope, receive, send)
        try:
            work = self.limit.admit()
        except Overloaded as error:
            log.info("%s refused: %s", scope["path"], error)
            return await error_response(error)(scope, receive, send)
        client = ClientWatch(receive)
        scope.setdefault("state", {}).update(work=work, client=client)
        try:
            with work:
                await self.app(scope, receive, send)
        finally:
            client.close()
