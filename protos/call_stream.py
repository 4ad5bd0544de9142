"""GenerateStream: many Generate calls on one gRPC stream (see `llm.proto`), both ends.

Each streamed token of a Generate call costs a gRPC message on each side, and grpcio's asyncio layer spends tens of
microseconds of CPU on every message; with many requests in flight the engine's every step becomes as many messages.
On one GenerateStream the deltas of all the calls that are ready together travel as one message, and so do the
starts (and cancels) that are ready together: a write holds the caller's event loop ~0.6 ms on a busy host
(bench/RESULTS.md), so calls that arrive while one is written go out together in the next.

Server (`serve_calls`): each call runs as its own task, exactly as Generate runs it (the servicer's own `Generate`,
given a context whose metadata is the call's trace context), and its events go to the stream's outbox, which the
stream writes as one message whenever gRPC takes the next. A call puts its next delta in the outbox only once its
previous one was handed to gRPC, so at most one delta of a call waits: meanwhile vLLM merges the request's outputs,
and a slow stream means fewer, larger messages, not a queue. It waits at the next delta, not after each write: a call
whose previous delta has gone by the time the engine has another is not woken in between (a task step per token).
A call its caller has paused takes the engine's output once every `PAUSED_TAKE_S` only, merged, until resumed. The
end of the stream cancels every call.

Client (`CallStream`): one stream per replica; `start` sends a call's request and returns a `StreamedCall`, read
like grpcio's UnaryStreamCall (`read()` gives messages, then EOF; a failed status raises the typed error of
`protos.errors`). Cancelling a call cancels its request in llm_svc, and so in the engine. The stream must be read for
all its calls, so a call whose reader falls behind (its HTTP client reads slowly) is paused instead, and resumed once
its reader has caught up: the engine merges its tokens meanwhile, as vLLM's server has it do for a slow client, and
what waits here for a slow reader stays small. A stream takes new calls for `NEW_CALLS_S` only, then ends once its
calls have: servers recycle connections (`protos.server`) and cut the streams still open on one after a grace, so a
stream must not outlive the calls it took.
"""

import asyncio
import collections
import contextlib
import itertools
import logging
from collections.abc import AsyncIterator, Callable, Iterator

import grpc

from protos import llm_pb2
from protos.errors import Cancelled, DeadlineExceeded, ServingError, Unavailable, from_rpc_error, from_status, status_of

log = logging.getLogger(__name__)

METHOD = "LanguageModel/GenerateStream"
# A message of the stream holds the events (or the starts) that are ready together up to this size (a longer one
# travels alone): far below any message limit.
MAX_SHARED_BYTES = 1 << 20
# The server's initial metadata has this key: it takes a message's `more` actions (an older one would drop them).
TAKES_MORE = "generate-stream-more"
# How long a client's stream takes new calls; the server's connection grace must cover this plus a call's deadline.
NEW_CALLS_S = 60.0
# A call whose reader has this many of its messages unread is paused (the engine merges its tokens meanwhile), and
# resumed once its reader is down to RESUME_AT: a reader that keeps up has one or none waiting.
PAUSE_AT = 16
RESUME_AT = 4
# A paused call still takes the engine's output (all of it merged) this often, so that it ends within this much of its
# engine request (and with it its deadline on the caller's side), its answer then held by the caller as without pauses.
PAUSED_TAKE_S = 1.0

_STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}

Generate = Callable[[llm_pb2.GenerateRequest, object], AsyncIterator[llm_pb2.GenerateResponse]]


class _CallContext:
    """What a Generate handler is given for a streamed call: the stream's context, with the call's trace context
    as its invocation metadata."""

    def __init__(self, stream_context, trace_context: dict[str, str]):
        self._stream_context = stream_context
        self._metadata = tuple(trace_context.items())

    def invocation_metadata(self):
        return self._metadata

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata=()):
        """Ends this call, not the stream, with the status."""
        raise from_status(code, details, trailing_metadata, peer="")

    def __getattr__(self, name):
        return getattr(self._stream_context, name)


class _Outbox:
    """The stream's next messages, each event built where it travels (a call's message is copied once, not into an
    event and then into a message), and the future that says they were handed to gRPC."""

    def __init__(self):
        self._messages = [llm_pb2.GenerateStreamResponse()]
        self._size = 0  # of the last message's calls' messages
        self._sent = asyncio.get_running_loop().create_future()
        self._ready = asyncio.Event()
        self.closed = False

    def put(self, call_id: int, message: llm_pb2.GenerateResponse | None = None,
            status: llm_pb2.CallStatus | None = None) -> asyncio.Future:
        """A call's next message, or its status."""
        size = message.ByteSize() if message is not None else 0
        if self._size and self._size + size > MAX_SHARED_BYTES:
            self._messages.append(llm_pb2.GenerateStreamResponse())
            self._size = 0
        if message is not None:
            self._messages[-1].events.add(call_id=call_id, message=message)
        else:
            self._messages[-1].events.add(call_id=call_id, status=status)
        self._size += size
        self._ready.set()
        return self._sent

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def take(self) -> tuple[list[llm_pb2.GenerateStreamResponse], asyncio.Future]:
        """The messages filled (waiting for an event first), and the future to resolve once they are written; none
        once closed and empty."""
        await self._ready.wait()
        self._ready.clear()
        messages, sent = self._messages, self._sent
        self._messages, self._size, self._sent = [llm_pb2.GenerateStreamResponse()], 0, \
            asyncio.get_running_loop().create_future()
        return [message for message in messages if message.events], sent


async def serve_calls(requests: AsyncIterator[llm_pb2.GenerateStreamRequest], context,
                      generate: Generate) -> AsyncIterator[llm_pb2.GenerateStreamResponse]:
    """The messages of one GenerateStream whose calls `generate` (a servicer's Generate) serves."""
    outbox = _Outbox()
    calls: dict[int, asyncio.Task] = {}
    flowing: dict[int, asyncio.Event] = {}  # a call's is clear while its caller has paused it

    async def run(call_id: int, request: llm_pb2.GenerateRequest, trace_context: dict[str, str]) -> None:
        flow = flowing[call_id]
        try:
            # Closed at once however the call ends: a cancelled call's engine request is aborted now, not whenever
            # the generator is collected.
            async with contextlib.aclosing(generate(request, _CallContext(context, trace_context))) as responses:
                written = None  # the previous delta's message handed to gRPC
                async for response in responses:
                    if written is not None and not written.done():
                        await written
                    written = outbox.put(call_id, message=response)
                    if not flow.is_set():
                        with contextlib.suppress(TimeoutError):  # the engine merges the call's outputs meanwhile
                            async with asyncio.timeout(PAUSED_TAKE_S):
                                await flow.wait()
            status = llm_pb2.CallStatus(code=grpc.StatusCode.OK.value[0])
        except asyncio.CancelledError:
            return  # cancelled by the caller, or the stream ended: nobody waits for its status
        except Exception as error:  # noqa: BLE001 - every error becomes the call's status, as on Generate
            code, details, metadata = status_of(error, METHOD)
            status = llm_pb2.CallStatus(code=code.value[0], details=details,
                                        metadata=[llm_pb2.MetadataEntry(key=k, value=v) for k, v in metadata])
        finally:
            calls.pop(call_id, None)
            flowing.pop(call_id, None)
            if outbox.closed and not calls:
                outbox.close()  # wakes the writer to end the stream
        outbox.put(call_id, status=status)

    def act(message: llm_pb2.GenerateStreamRequest) -> None:
        action = message.WhichOneof("action")
        if action == "start":
            if message.call_id in calls:
                log.warning("%s: call %d started twice; the second is ignored", METHOD, message.call_id)
                return
            flowing[message.call_id] = asyncio.Event()
            flowing[message.call_id].set()
            calls[message.call_id] = asyncio.create_task(
                run(message.call_id, message.start, dict(message.trace_context)))
        elif action == "cancel" and (task := calls.get(message.call_id)) is not None:
            task.cancel()
        elif action == "pause" and (flow := flowing.get(message.call_id)) is not None:
            flow.clear()
        elif action == "resume" and (flow := flowing.get(message.call_id)) is not None:
            flow.set()

    async def read() -> None:
        try:
            async for message in requests:
                act(message)
                for more in message.more:
                    act(more)
        finally:
            outbox.close()  # the caller sends no more: the stream ends once its calls have

    reader = asyncio.create_task(read())
    try:
        while True:
            messages, sent = await outbox.take()
            for message in messages:
                yield message
            sent.set_result(None)
            if reader.done() and (reader.exception() is not None or not calls):
                break
        reader.result()  # a failure to read the requests fails the stream
    finally:
        reader.cancel()
        for task in list(calls.values()):
            task.cancel()


class _Inbox:
    """A call's messages for its one reader: asyncio.Queue's work without its generality, a message each token
    (bench.gateway_cost)."""

    def __init__(self):
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item) -> None:
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get(self):
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class StreamedCall:
    """One call of a CallStream, read like grpcio's UnaryStreamCall."""

    def __init__(self, stream: "CallStream", call_id: int):
        self._stream = stream
        self.call_id = call_id
        self.events = _Inbox()  # GenerateResponse, then None (OK) or a ServingError
        self.ended = False
        self.paused = False
        self._deadline: asyncio.TimerHandle | None = None

    def set_timeout(self, timeout_s: float) -> None:
        self._deadline = asyncio.get_running_loop().call_later(timeout_s, self._expire)

    def deliver(self, message: llm_pb2.GenerateResponse) -> None:
        """Queues a message for `read`, pausing the call once its reader has fallen PAUSE_AT behind."""
        self.events.put(message)
        if not self.paused and len(self.events) >= PAUSE_AT:
            self.paused = True
            self._stream.send_flow(self.call_id, resume=False)

    async def read(self) -> llm_pb2.GenerateResponse | object:
        item = await self.events.get()
        if isinstance(item, llm_pb2.GenerateResponse):
            if self.paused and len(self.events) <= RESUME_AT:
                self.paused = False
                self._stream.send_flow(self.call_id, resume=True)
            return item
        if item is None:
            return grpc.aio.EOF
        self.end()
        raise item

    def cancel(self) -> None:
        """Stops the call in llm_svc; a no-op once it has ended."""
        if not self.ended:
            self.end()
            self._stream.send_cancel(self.call_id)

    def end(self) -> None:
        """Nothing more to send for the call: it ended, or failed here."""
        self.ended = True
        if self._deadline is not None:
            self._deadline.cancel()

    def _expire(self) -> None:
        self.events.put(DeadlineExceeded("Deadline Exceeded"))
        self.cancel()


class CallStream:
    """One GenerateStream to a replica, carrying many calls; open another once it is not `open_for_calls`."""

    def __init__(self, stub, target: str, new_calls_s: float = NEW_CALLS_S):
        self.target = target
        self._call = stub.GenerateStream()
        self._calls: dict[int, StreamedCall] = {}
        self._ids = itertools.count(1)
        # The actions to write, each with the future it resolves once written (or None), and the task writing them;
        # a start with nothing else on its way is written by its caller (`_writing_start`).
        self._outgoing: list[tuple[asyncio.Future | None, int, dict]] = []
        self._writer: asyncio.Task | None = None
        self._writing_start = False
        self._takes_more = False  # the server's initial metadata says so
        self._done_when_written = False
        self.failed: ServingError | None = None
        self.unimplemented = False  # the replica has no GenerateStream (an older llm_svc)
        self._retire_at = asyncio.get_running_loop().time() + new_calls_s
        self._retired = False
        self._reader = asyncio.create_task(self._read())

    @property
    def open_for_calls(self) -> bool:
        if self.failed is None and not self._retired and asyncio.get_running_loop().time() >= self._retire_at:
            self._retired = True
            self._end_when_idle()
        return self.failed is None and not self._retired

    def _end_when_idle(self) -> None:
        """Once retired and without calls: tells the server no more calls come (after any cancel still on its way),
        which ends the stream."""
        if self._retired and not self._calls and self.failed is None and not self._done_when_written:
            self._done_when_written = True
            self._wake_writer()

    async def start(self, request: llm_pb2.GenerateRequest, timeout_s: float,
                    trace_context: dict[str, str] | None) -> StreamedCall:
        if self.failed is not None:
            raise self.failed
        call = StreamedCall(self, next(self._ids))
        self._calls[call.call_id] = call
        call.set_timeout(timeout_s)
        action = {"start": request, "trace_context": trace_context or {}}
        try:
            if self._nothing_on_its_way:  # no task, no future
                await self._write_start(llm_pb2.GenerateStreamRequest(call_id=call.call_id, **action))
            else:
                sent = asyncio.get_running_loop().create_future()
                self._post_write(sent, call.call_id, **action)
                await sent
        except BaseException:
            call.cancel()  # the start may have gone out before the write was interrupted
            raise
        return call

    def send_flow(self, call_id: int, *, resume: bool) -> None:
        """Pauses or resumes a running call."""
        if call_id in self._calls and self.failed is None:
            # Unacknowledged: should the stream end, the server cancels the call itself.
            self._post_write(None, call_id, **({"resume": True} if resume else {"pause": True}))

    def send_cancel(self, call_id: int) -> None:
        if self._calls.pop(call_id, None) is None or self.failed is not None:
            return
        self._post_write(None, call_id, cancel=True)
        self._end_when_idle()

    def _post_write(self, sent: asyncio.Future | None, call_id: int, **action) -> None:
        """Queues a call's action, in order; `sent`, if given, gets the outcome of its write."""
        self._outgoing.append((sent, call_id, action))
        self._wake_writer()

    @property
    def _nothing_on_its_way(self) -> bool:
        return self._writer is None and not self._writing_start

    def _wake_writer(self) -> None:
        """Starts the writer task unless a write is under way (whose end starts it)."""
        if self._nothing_on_its_way:
            self._writer = asyncio.create_task(self._write_outgoing())

    async def _write_start(self, message: llm_pb2.GenerateStreamRequest) -> None:
        """Writes a start in the caller's task; what is queued meanwhile goes after it, in the writer's."""
        self._writing_start = True
        try:
            error = await self._write(message)
        finally:
            self._writing_start = False
            if self._outgoing or self._done_when_written:
                self._wake_writer()
        if error is not None:
            raise error

    async def _write_outgoing(self) -> None:
        """Writes the actions queued; those queued while a message is written go together in the next."""
        try:
            while self._outgoing:
                actions, self._outgoing = self._outgoing, []
                for message, sents in self._messages(actions):
                    error = await self._write(message)
                    for sent in sents:
                        if sent is None or sent.done():
                            continue
                        if error is None:
                            sent.set_result(None)
                        else:
                            sent.set_exception(error)
        finally:
            self._writer = None
        if self._done_when_written:
            with contextlib.suppress(grpc.aio.AioRpcError, grpc.aio.UsageError, asyncio.InvalidStateError):
                await self._call.done_writing()

    def _messages(self, actions: list[tuple[asyncio.Future | None, int, dict]]) \
            -> Iterator[tuple[llm_pb2.GenerateStreamRequest, list[asyncio.Future | None]]]:
        """The messages that carry `actions` in order, each with its actions' futures: one each, or, to a server
        that takes `more`, together up to MAX_SHARED_BYTES of starts. A start given up before it went out is
        dropped (its cancel follows)."""
        group, size = [], 0
        for sent, call_id, action in actions:
            if sent is not None and sent.cancelled():
                continue
            if not self._takes_more:
                yield llm_pb2.GenerateStreamRequest(call_id=call_id, **action), [sent]
                continue
            action_size = action["start"].ByteSize() if "start" in action else 0
            if group and size + action_size > MAX_SHARED_BYTES:
                yield self._message_of(group), [sent for sent, _, _ in group]
                group, size = [], 0
            group.append((sent, call_id, action))
            size += action_size
        if group:
            yield self._message_of(group), [sent for sent, _, _ in group]

    @staticmethod
    def _message_of(group: list[tuple[asyncio.Future | None, int, dict]]) -> llm_pb2.GenerateStreamRequest:
        if len(group) == 1:
            _, call_id, action = group[0]
            return llm_pb2.GenerateStreamRequest(call_id=call_id, **action)
        message = llm_pb2.GenerateStreamRequest()
        for _, call_id, action in group:
            message.more.add(call_id=call_id, **action)
        return message

    async def _write(self, message: llm_pb2.GenerateStreamRequest) -> ServingError | None:
        """Writes a message: None, or the error that ended the stream."""
        try:
            await self._call.write(message)
        except grpc.aio.AioRpcError:
            # The stream is over, and its reader is about to say why: UNIMPLEMENTED from an older replica
            # (`unimplemented`, which the caller falls back on) must not pass for a replica that is down.
            await asyncio.wait({self._reader})
            return self.failed or Unavailable(f"{self.target}: the call stream ended")
        except (grpc.aio.UsageError, asyncio.InvalidStateError) as error:
            return self.failed or Unavailable(f"{self.target}: the call stream ended ({error})")
        return None

    async def _read(self) -> None:
        try:
            self._takes_more = any(key == TAKES_MORE for key, _ in await self._call.initial_metadata() or ())
            while (message := await self._call.read()) is not grpc.aio.EOF:
                for event in message.events:
                    call = self._calls.get(event.call_id)
                    if call is None:
                        continue  # cancelled here; its last events were on their way
                    if event.HasField("message"):
                        call.deliver(event.message)
                        continue
                    del self._calls[event.call_id]
                    self._end_when_idle()
                    call.end()
                    status = event.status
                    call.events.put(None if status.code == 0 else from_status(
                        _STATUS_CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.details,
                        [(entry.key, entry.value) for entry in status.metadata], self.target))
            error: ServingError = Unavailable(f"{self.target} ended the call stream")
        except grpc.aio.AioRpcError as rpc_error:
            self.unimplemented = rpc_error.code() == grpc.StatusCode.UNIMPLEMENTED
            error = from_rpc_error(rpc_error, self.target)
        except asyncio.CancelledError:
            error = Cancelled(f"{self.target}: the call stream was closed")
        self.failed = error
        for call in self._calls.values():
            call.end()
            call.events.put(error)
        self._calls.clear()

    async def close(self) -> None:
        self._call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


class ServesCallStreams:
    """For a LanguageModel servicer: GenerateStream, its calls served by the servicer's own Generate."""

    async def GenerateStream(self, request_iterator, context):
        await context.send_initial_metadata(((TAKES_MORE, "1"),))
        async for message in serve_calls(request_iterator, context, self.Generate):
            yield message
