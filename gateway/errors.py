"""The one mapping from typed errors (and the gRPC status they carry) to OpenAI-style HTTP errors.

Errors raised in the gateway and errors received from llm_svc (turned back into types by
`protos.errors.from_rpc_error`) both end here, so a status code means the same thing whoever raised it.
A 5xx body says only what kind of failure it was and the request id: peer addresses and exception text are
for the operator, in the log line carrying that id, not for whoever sent the request.
"""

from collections.abc import AsyncIterator, Callable

import grpc

from protos.errors import FAILED_STAGE_KEY, InvalidInput, ServingError
from protos.logs import request_id_var

# gRPC status -> (HTTP status, OpenAI error type), following vLLM's server for the type names.
HTTP_BY_GRPC_CODE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "BadRequestError"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "BadRequestError"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "BadRequestError"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "AuthenticationError"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "PermissionDeniedError"),
    grpc.StatusCode.NOT_FOUND: (404, "NotFoundError"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "RateLimitError"),
    grpc.StatusCode.CANCELLED: (499, "ClientClosedRequest"),
    grpc.StatusCode.UNAVAILABLE: (503, "ServiceUnavailableError"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "GatewayTimeoutError"),
    grpc.StatusCode.INTERNAL: (500, "InternalServerError"),
}
_FALLBACK = (500, "InternalServerError")


class Unauthenticated(ServingError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PayloadTooLarge(InvalidInput):
    """A body or image over its byte limit: bad input, but HTTP has a status of its own for it (413)."""

    http_status = 413
    error_type = "PayloadTooLargeError"


def hold_any(nbytes: int) -> None:
    """The `hold` of a read whose bytes count against no limit but its own."""


async def read_capped(chunks: AsyncIterator[bytes], declared_length: str | None, limit: int, what: str,
                      hold: Callable[[int], None] = hold_any) -> bytes:
    """The bytes of a body or download, refused as soon as it is known to exceed `limit`: from the declared
    Content-Length before reading, else while reading, so an oversized payload is never held whole. `hold` is
    told of the bytes kept (a declared length at once, before reading) and may refuse them by raising."""
    declared = int(declared_length) if declared_length is not None and declared_length.isdigit() else None
    if declared is not None:
        if declared > limit:
            raise PayloadTooLarge(f"{what} of {declared} bytes is above the limit of {limit}")
        hold(declared)
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} is above the limit of {limit} bytes")
        if declared is None:  # else held already: HTTP framing ends a body at its Content-Length
            hold(len(chunk))
        parts.append(chunk)
    return b"".join(parts)


def http_error(error: ServingError, param: str | None = None) -> tuple[int, dict]:
    """The HTTP status and the OpenAI error body for a typed error, raised while serving the request whose id
    `request_id_var` holds."""
    status, error_type = HTTP_BY_GRPC_CODE.get(error.code, _FALLBACK)
    status = getattr(error, "http_status", status)
    error_type = getattr(error, "error_type", error_type)
    message = client_message(error, status, request_id_var.get())
    return status, {"error": {"message": message, "type": error_type, "param": param, "code": status}}


def client_message(error: ServingError, status: int, request_id: str) -> str:
    """What the client reads: a bad request's own message; for a server failure, its kind and the request id
    under which the log has the rest."""
    if status < 500:
        return str(error)
    if status == 503:
        stage = dict(error.metadata).get(FAILED_STAGE_KEY, "llm_svc")
        return f"Service unavailable ({stage} down), retry later; request id {request_id}"
    if status == 504:
        return f"Deadline exceeded: the request did not finish in time; request id {request_id}"
    return f"Internal server error; the server's log has the details under request id {request_id}"
