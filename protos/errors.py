"""Typed errors and their one mapping to gRPC status codes, on the server and back on the client.

Stages raise these; `ErrorInterceptor` turns them into statuses, and `from_rpc_error` turns a status
received from another stage back into the same type, so a vision error reaches the gateway unchanged.
"""

import inspect
import logging

import grpc

log = logging.getLogger(__name__)


class ServingError(Exception):
    """Base of every error a client may see; the subclass decides the status code."""

    code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, metadata: tuple[tuple[str, str], ...] = (), peer: str | None = None):
        super().__init__(message)
        # Sent as trailing metadata, for callers that act on details (e.g. which images to resend).
        self.metadata = metadata
        # The stage that answered with this error, when it came from another one: for logs, never for clients.
        self.peer = peer

    def for_log(self) -> str:
        return f"{self.peer}: {self}" if self.peer else str(self)


class InvalidInput(ServingError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServingError):
    code = grpc.StatusCode.NOT_FOUND


# Trailing-metadata key of an Overloaded error: whole seconds after which a retry may find room.
RETRY_AFTER_KEY = "retry-after-s"
DEFAULT_RETRY_AFTER_S = 1


class Overloaded(ServingError):
    """Too much work in flight now: the same request may succeed later, after `retry_after_s`."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, metadata: tuple[tuple[str, str], ...] = (), peer: str | None = None,
                 retry_after_s: int = DEFAULT_RETRY_AFTER_S):
        if not any(key == RETRY_AFTER_KEY for key, _ in metadata):
            metadata = (*metadata, (RETRY_AFTER_KEY, str(retry_after_s)))
        super().__init__(message, metadata, peer)

    @property
    def retry_after_s(self) -> int:
        value = dict(self.metadata).get(RETRY_AFTER_KEY, "")
        return int(value) if value.isdigit() else DEFAULT_RETRY_AFTER_S


class Unavailable(ServingError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServingError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(ServingError):
    code = grpc.StatusCode.CANCELLED


class InternalError(ServingError):
    code = grpc.StatusCode.INTERNAL


# Trailing-metadata key naming the stage an error came from, when a stage passes on another stage's error.
FAILED_STAGE_KEY = "failed-stage"

_BY_CODE = {cls.code: cls for cls in (InvalidInput, NotFound, Overloaded, Unavailable, DeadlineExceeded,
                                      Cancelled, InternalError)}


def from_rpc_error(error: grpc.aio.AioRpcError, peer: str, stage: str | None = None) -> ServingError:
    """The typed error for a status received from another stage, `peer` (kept for logs, out of the message that
    clients read); `stage`, when given, names the stage in the message and travels on as FAILED_STAGE_KEY
    metadata to whoever receives this error next."""
    return from_status(error.code(), error.details(), error.trailing_metadata() or (), peer, stage)


def from_status(code: grpc.StatusCode, details: str, metadata, peer: str, stage: str | None = None) -> ServingError:
    """`from_rpc_error` for a status that came as fields (a call of `protos.call_stream`)."""
    cls = _BY_CODE.get(code, InternalError)
    metadata = tuple((k, v) for k, v in metadata if isinstance(v, str))
    if stage is None:
        return cls(details, metadata, peer=peer)
    return cls(f"{stage}: {details}", (*metadata, (FAILED_STAGE_KEY, stage)), peer=peer)


def status_of(error: Exception, method: str) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """The status a call that failed with `error` ends with: a ServingError's own, anything else INTERNAL (logged
    with its traceback: a bug, not the caller's doing)."""
    if isinstance(error, ServingError):
        log.info("%s -> %s: %s", method, error.code.name, error.for_log())
        return error.code, str(error), error.metadata
    log.exception("%s failed with an unexpected error", method, exc_info=error)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}", ()


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a handler to a status: ServingError by its type, anything else INTERNAL; and
    bytes that do not parse as the request message to INVALID_ARGUMENT (grpc itself would answer UNKNOWN)."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _guard_unary(handler.unary_unary, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method),
                request_deserializer=_lenient(handler.request_deserializer),
                response_serializer=handler.response_serializer)
        return handler


class _Undecodable:
    """What `_lenient` passes on instead of raising, so that the guard can answer INVALID_ARGUMENT."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer):
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as error:  # noqa: BLE001 - whatever the parser says, the bytes were the client's
            return _Undecodable(error)
    return deserialize


def _check_decoded(request) -> None:
    if isinstance(request, _Undecodable):
        raise InvalidInput(f"the request does not parse as this method's message ({request.error})")


async def _abort(context: grpc.aio.ServicerContext, error: Exception, method: str):
    await context.abort(*status_of(error, method))


def _guard_unary(behavior, method):
    async def guarded(request, context):
        try:
            _check_decoded(request)
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            await _abort(context, error, method)
    return guarded


def _guard_stream(behavior, method):
    if not inspect.isasyncgenfunction(behavior):
        # A handler that streams with `context.write` (grpc's health Watch) is a plain coroutine.
        return _guard_unary(behavior, method)

    async def guarded(request, context):
        try:
            _check_decoded(request)
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:  # noqa: BLE001 - every error becomes a status
            await _abort(context, error, method)
    return guarded
