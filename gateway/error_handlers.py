"""How an exception escaping a route becomes the HTTP answer: typed errors by their kind, anything else a 500.

Both log the whole error (peer and details) under the request id; the body a client reads names only what it
may know (`gateway.errors.http_error`). A 429 carries Retry-After, which the OpenAI SDKs honour.
"""

import logging

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse

from gateway.errors import http_error
from protos.errors import InternalError, Overloaded, ServingError
from protos.logs import request_id_var

log = logging.getLogger(__name__)


def error_response(error: ServingError) -> JSONResponse:
    """The OpenAI error body for `error`, with Retry-After when it says to come back later."""
    status, body = http_error(error)
    headers = {"retry-after": str(error.retry_after_s)} if isinstance(error, Overloaded) else None
    return JSONResponse(body, status_code=status, headers=headers)


async def serving_error(request: Request, error: ServingError) -> JSONResponse:
    response = error_response(error)
    log.log(logging.WARNING if response.status_code >= 500 else logging.INFO, "%s %s -> %d: %s", request.method,
            request.url.path, response.status_code, error.for_log())
    return response


async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
    # Starlette runs this handler outside every middleware, after RequestContextMiddleware has reset the request
    # id and without its response header: both are put back here, for the log line and the client.
    request_id = getattr(request.state, "request_id", "-")
    token = request_id_var.set(request_id)
    try:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=error)
        status, body = http_error(InternalError("unexpected error"))
    finally:
        request_id_var.reset(token)
    return JSONResponse(body, status_code=status, headers={"x-request-id": request_id})


async def http_exception(request: Request, error: HTTPException) -> JSONResponse:
    """Starlette's own refusals (no such path, method not allowed), in the body vLLM's server gives them."""
    return JSONResponse({"detail": error.detail}, status_code=error.status_code, headers=error.headers)


def install_error_handlers(app: Starlette) -> None:
    app.add_exception_handler(HTTPException, http_exception)
    app.add_exception_handler(ServingError, serving_error)
    app.add_exception_handler(Exception, unexpected_error)
