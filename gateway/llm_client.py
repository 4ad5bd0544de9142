"""The gateway's gRPC client of llm_svc: round-robin over replicas, one Generate call per request.

A replica that answers UNAVAILABLE is skipped for a cooldown; a call that fails UNAVAILABLE (replica down) or
RESOURCE_EXHAUSTED (replica full) before its first message is retried once on another replica (nothing reached
the client yet, so the retry is invisible).
Errors leave this module as the typed errors of `protos.errors`.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import llm_pb2, llm_pb2_grpc
from protos.errors import FAILED_STAGE_KEY, InternalError, ServingError, Unavailable, from_rpc_error
from protos.security import TlsFiles, open_channel
from protos.server import channel_options

log = logging.getLogger(__name__)

LANGUAGE_SERVICE = "internvl.llm.v1.LanguageModel"
# Failures of one replica, not of the request: another replica may serve it.
_RETRIED_ELSEWHERE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class Replica:
    def __init__(self, target: str, channel: grpc.aio.Channel):
        self.target = target
        self.channel = channel
        self.stub = llm_pb2_grpc.LanguageModelStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        # monotonic time before which the balancer prefers other replicas.
        self.down_until = 0.0


class TokenStream:
    """One running Generate call whose first message has arrived; iterating yields every message."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, first: llm_pb2.GenerateResponse, target: str):
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


def _failed_behind(error: grpc.aio.AioRpcError) -> bool:
    return any(key == FAILED_STAGE_KEY for key, _ in (error.trailing_metadata() or ()))


class LlmClient:
    def __init__(self, targets: tuple[str, ...], max_message_bytes: int, unavailable_cooldown_s: float, *,
                 tls: TlsFiles = TlsFiles(), server_name: str | None = None, token: str | None = None):
        options = channel_options(max_message_bytes)
        self._replicas = [Replica(t, open_channel(t, options, tls, server_name, token)) for t in targets]
        self._turn = itertools.count()
        self._cooldown_s = unavailable_cooldown_s

    async def close(self) -> None:
        await asyncio.gather(*(r.channel.close() for r in self._replicas))

    async def generate(self, request: llm_pb2.GenerateRequest, timeout_s: float) -> TokenStream:
        """Starts Generate and waits for its first message, so that errors before any token raise here."""
        candidates = self._pick()
        for attempt, replica in enumerate(candidates[:2]):
            call = replica.stub.Generate(request, timeout=timeout_s)
            try:
                first = await call.read()
            except grpc.aio.AioRpcError as error:
                # A stage behind llm_svc failing says nothing about this replica, and every replica shares that
                # stage: no cooldown, no retry.
                if error.code() not in _RETRIED_ELSEWHERE or _failed_behind(error):
                    raise from_rpc_error(error, replica.target) from None
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    replica.down_until = time.monotonic() + self._cooldown_s
                if attempt == 0 and len(candidates) > 1:
                    log.warning("%s answered %s (%s); retrying on %s", replica.target, error.code().name,
                                error.details(), candidates[1].target)
                    continue
                raise from_rpc_error(error, replica.target) from None
            except BaseException:
                call.cancel()
                raise
            if first is grpc.aio.EOF:
                raise InternalError(f"{replica.target}: Generate ended without a message")
            replica.down_until = 0.0
            return TokenStream(call, first, replica.target)
        raise Unavailable("no language service replica")

    async def model_info(self, timeout_s: float) -> llm_pb2.GetModelInfoResponse:
        last_error: ServingError = Unavailable("no language service replica answered GetModelInfo")
        for replica in self._pick():
            try:
                return await replica.stub.GetModelInfo(llm_pb2.GetModelInfoRequest(), timeout=timeout_s)
            except grpc.aio.AioRpcError as error:
                last_error = from_rpc_error(error, replica.target)
        raise last_error

    async def healthy_replicas(self, timeout_s: float) -> list[str]:
        """The targets whose gRPC health check says SERVING for the language service."""
        async def serving(replica: Replica) -> bool:
            try:
                answer = await replica.health.Check(health_pb2.HealthCheckRequest(service=LANGUAGE_SERVICE),
                                                    timeout=timeout_s)
            except grpc.aio.AioRpcError:
                return False
            return answer.status == health_pb2.HealthCheckResponse.SERVING

        states = await asyncio.gather(*(serving(r) for r in self._replicas))
        return [r.target for r, ok in zip(self._replicas, states) if ok]

    def _pick(self) -> list[Replica]:
        """Every replica, starting at the next in turn; those cooling down after UNAVAILABLE go last."""
        start = next(self._turn) % len(self._replicas)
        ordered = self._replicas[start:] + self._replicas[:start]
        now = time.monotonic()
        return sorted(ordered, key=lambda r: r.down_until > now)
