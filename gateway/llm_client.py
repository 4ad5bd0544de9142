"""The gateway's gRPC client of llm_svc: round-robin over the replicas, one Generate call per request.

The calls to a replica share one GenerateStream (`protos.call_stream`), so that the tokens that requests receive
together cost one gRPC message, not one each; with `multiplex=False`, or against a replica without GenerateStream,
each request is a Generate call of its own.

Every address the targets resolve to is a replica of its own (`protos.endpoints`), re-resolved as DNS changes.

A replica that answers UNAVAILABLE is skipped for a cooldown; a call that fails UNAVAILABLE (replica down) or
RESOURCE_EXHAUSTED (replica full) before its first message is retried once on another replica (nothing reached
the client yet, so the retry is invisible).
Errors leave this module as the typed errors of `protos.errors`.
"""

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import llm_pb2, llm_pb2_grpc, tracing
from protos.call_stream import CallStream, StreamedCall
from protos.endpoints import (DEFAULT_REFRESH_S, DEFAULT_RETIRE_S, Address, Endpoint, EndpointSet, certificate_name,
                              down_last)
from protos.errors import FAILED_STAGE_KEY, InternalError, ServingError, Unavailable, from_rpc_error
from protos.security import TlsFiles, open_channel
from protos.server import channel_options, channel_state

log = logging.getLogger(__name__)

LANGUAGE_SERVICE = "internvl.llm.v1.LanguageModel"
# Failures of one replica, not of the request: another replica may serve it.
_RETRIED_ELSEWHERE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclasses.dataclass
class Replica:
    """The connection to one llm_svc replica."""

    channel: grpc.aio.Channel
    stub: llm_pb2_grpc.LanguageModelStub
    health: health_pb2_grpc.HealthStub
    multiplexed: bool = True  # its calls go on `calls` (until it turns out not to have GenerateStream)
    calls: CallStream | None = None

    def call_stream(self, target: str) -> CallStream:
        if self.calls is None or not self.calls.open_for_calls:
            self.calls = CallStream(self.stub, target)
        return self.calls


class TokenStream:
    """One running Generate call whose first message has arrived; iterating yields every message."""

    def __init__(self, call: grpc.aio.UnaryStreamCall | StreamedCall, first: llm_pb2.GenerateResponse, target: str):
        self._call = call
        self._first = first
        self.target = target

    async def __aiter__(self) -> AsyncIterator[llm_pb2.GenerateResponse]:
        # Leaving the loop early (client gone, task cancelled) cancels the call, so llm_svc aborts the request.
        try:
            yield self._first
            while (message := await self._call.read()) is not grpc.aio.EOF:
                yield message
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error, self.target) from None
        finally:
            self._call.cancel()

    async def close(self) -> None:
        """Cancels the call if it is still running (a no-op once it has ended)."""
        self._call.cancel()


async def _first_of(call: grpc.aio.UnaryStreamCall | StreamedCall, target: str) -> llm_pb2.GenerateResponse:
    try:
        first = await call.read()
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error, target) from None
    except BaseException:
        call.cancel()
        raise
    if first is grpc.aio.EOF:
        raise InternalError(f"{target}: Generate ended without a message")
    return first


def _failed_behind(error: ServingError) -> bool:
    return any(key == FAILED_STAGE_KEY for key, _ in error.metadata)


class LlmClient:
    """Generate, Tokenize, Detokenize, GetModelInfo, GetVersion and health over every llm_svc replica the targets
    name (see `protos.endpoints`); `start` must be awaited before the first call."""

    def __init__(self, targets: tuple[str, ...], max_message_bytes: int, unavailable_cooldown_s: float, *,
                 tls: TlsFiles = TlsFiles(), server_name: str | None = None, token: str | None = None,
                 refresh_s: float = DEFAULT_REFRESH_S, retire_s: float = DEFAULT_RETIRE_S, multiplex: bool = True):
        options = channel_options(max_message_bytes)

        def connect(address: Address) -> Replica:
            channel = open_channel(address.target, options, tls, server_name or certificate_name(address), token)
            return Replica(channel, llm_pb2_grpc.LanguageModelStub(channel), health_pb2_grpc.HealthStub(channel),
                           multiplexed=multiplex)

        async def close(replica: Replica) -> None:
            if replica.calls is not None:
                await replica.calls.close()
            await replica.channel.close()

        self._endpoints = EndpointSet(list(targets), connect, close, refresh_s=refresh_s, retire_s=retire_s)
        self._turn = itertools.count()
        self._cooldown_s = unavailable_cooldown_s

    async def start(self) -> None:
        await self._endpoints.start()

    async def close(self) -> None:
        await self._endpoints.close()

    async def generate(self, request: llm_pb2.GenerateRequest, timeout_s: float) -> TokenStream:
        """Starts Generate and waits for its first message, so that errors before any token raise here."""
        candidates = await self._pick()
        for attempt, endpoint in enumerate(candidates[:2]):
            target = endpoint.address.target
            try:
                call, first = await self._first_message(endpoint.connection, target, request, timeout_s)
            except ServingError as error:
                # A stage behind llm_svc failing says nothing about this replica, and every replica shares that
                # stage: no cooldown, no retry.
                if error.code not in _RETRIED_ELSEWHERE or _failed_behind(error):
                    raise
                if error.code == grpc.StatusCode.UNAVAILABLE:
                    endpoint.down_until = time.monotonic() + self._cooldown_s
                    self._endpoints.refresh_soon()
                if attempt == 0 and len(candidates) > 1:
                    log.warning("%s answered %s (%s); retrying on %s", target, error.code.name, error,
                                candidates[1].address.target)
                    continue
                raise
            endpoint.down_until = 0.0
            return TokenStream(call, first, target)
        raise Unavailable("no language service replica")

    async def _first_message(self, replica: Replica, target: str, request: llm_pb2.GenerateRequest,
                             timeout_s: float) -> tuple[grpc.aio.UnaryStreamCall | StreamedCall,
                                                        llm_pb2.GenerateResponse]:
        """A call on the replica's GenerateStream (or a Generate call of its own), once its first message came."""
        if not replica.multiplexed:
            call = replica.stub.Generate(request, timeout=timeout_s, metadata=tracing.outgoing_metadata())
            return call, await _first_of(call, target)
        calls = replica.call_stream(target)
        try:
            call = await calls.start(request, timeout_s, tracing.trace_headers())
            return call, await _first_of(call, target)
        except ServingError:
            if not calls.unimplemented:
                raise
        log.warning("%s has no GenerateStream (an older llm_svc): one Generate call per request", target)
        replica.multiplexed = False
        return await self._first_message(replica, target, request, timeout_s)

    async def model_info(self, timeout_s: float) -> llm_pb2.GetModelInfoResponse:
        last_error: ServingError = Unavailable("no language service replica answered GetModelInfo")
        for endpoint in await self._pick():
            try:
                return await endpoint.connection.stub.GetModelInfo(llm_pb2.GetModelInfoRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError as error:
                last_error = from_rpc_error(error, endpoint.address.target)
        raise last_error

    async def tokenize(self, request: llm_pb2.TokenizeRequest, timeout_s: float) -> llm_pb2.TokenizeResponse:
        return await self._unary("Tokenize", request, timeout_s)

    async def detokenize(self, request: llm_pb2.DetokenizeRequest, timeout_s: float) -> llm_pb2.DetokenizeResponse:
        return await self._unary("Detokenize", request, timeout_s)

    async def version(self, timeout_s: float) -> llm_pb2.GetVersionResponse:
        return await self._unary("GetVersion", llm_pb2.GetVersionRequest(), timeout_s)

    async def _unary(self, method: str, request, timeout_s: float):
        """One unary call, retried once on another replica where the first is down or full."""
        candidates = (await self._pick())[:2]
        for attempt, endpoint in enumerate(candidates):
            try:
                answer = await getattr(endpoint.connection.stub, method)(request, timeout=timeout_s)
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error, endpoint.address.target)
                if error.code not in _RETRIED_ELSEWHERE or _failed_behind(error) or attempt == len(candidates) - 1:
                    raise error from None
                if error.code == grpc.StatusCode.UNAVAILABLE:
                    endpoint.down_until = time.monotonic() + self._cooldown_s
                    self._endpoints.refresh_soon()
                continue
            endpoint.down_until = 0.0
            return answer
        raise Unavailable("no language service replica")

    async def healthy_replicas(self, timeout_s: float) -> list[str]:
        """The addresses whose gRPC health check says SERVING for the language service."""
        async def serving(replica: Replica) -> bool:
            try:
                answer = await replica.health.Check(health_pb2.HealthCheckRequest(service=LANGUAGE_SERVICE),
                                                    timeout=timeout_s)
            except grpc.aio.AioRpcError:
                return False
            return answer.status == health_pb2.HealthCheckResponse.SERVING

        endpoints = await self._endpoints.ensure_some()
        states = await asyncio.gather(*(serving(e.connection) for e in endpoints))
        return [e.address.target for e, ok in zip(endpoints, states) if ok]

    async def _pick(self) -> list[Endpoint[Replica]]:
        """Every replica, starting at the next in turn; those that are down (`down_last`) go last."""
        endpoints = await self._endpoints.ensure_some()
        if not endpoints:
            return []
        start = next(self._turn) % len(endpoints)
        return down_last(endpoints[start:] + endpoints[:start], lambda replica: channel_state(replica.channel))
