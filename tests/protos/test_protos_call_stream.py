"""GenerateStream (protos/call_stream.py): both ends over a real gRPC server on loopback, with a scripted Generate."""

import asyncio

import grpc
import pytest

from protos import call_stream, errors, llm_pb2, llm_pb2_grpc
from protos.call_stream import CallStream, ServesCallStreams, serve_calls
from protos.server import GrpcServer


class ScriptedLanguageModel(ServesCallStreams, llm_pb2_grpc.LanguageModelServicer):
    """The prompt picks a behaviour: 'count N' streams N tokens, 'slow' one every 50 ms for ever, 'full' fails
    RESOURCE_EXHAUSTED with a retry-after, 'bug' raises a RuntimeError after one token."""

    def __init__(self):
        self.cancelled: list[str] = []
        self.metadata: list[tuple] = []
        self.yielded: dict[str, int] = {}  # request id -> messages taken from its Generate

    async def Generate(self, request, context):
        self.metadata.append(tuple(context.invocation_metadata()))
        try:
            if request.prompt.startswith("count"):
                for i in range(int(request.prompt.split()[1])):
                    await asyncio.sleep(0)
                    yield llm_pb2.GenerateResponse(request_id=request.request_id, text=str(i))
                    self.yielded[request.request_id] = i + 1
            elif request.prompt == "slow":
                while True:
                    yield llm_pb2.GenerateResponse(request_id=request.request_id, text="x")
                    await asyncio.sleep(0.05)
            elif request.prompt == "full":
                raise errors.Overloaded("replica full", retry_after_s=7)
            elif request.prompt == "bug":
                yield llm_pb2.GenerateResponse(request_id=request.request_id, text="a")
                raise RuntimeError("engine crashed")
        except (asyncio.CancelledError, GeneratorExit):  # GeneratorExit: closed while it waited at a yield
            self.cancelled.append(request.request_id)
            raise


@pytest.fixture
async def replica():
    servicer = ScriptedLanguageModel()
    server = GrpcServer("127.0.0.1", 0, max_message_bytes=64 << 20, grace_s=0.1, announce_s=0)
    server.add_service(llm_pb2_grpc.add_LanguageModelServicer_to_server, servicer, "internvl.llm.v1.LanguageModel")
    port = await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    calls = CallStream(llm_pb2_grpc.LanguageModelStub(channel), f"127.0.0.1:{port}")
    yield servicer, calls, server
    await calls.close()
    await channel.close()
    await server.drain()


def generate(prompt: str, request_id: str = "") -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(request_id=request_id or prompt, prompt=prompt)


async def eventually(condition, timeout_s: float = 2.0) -> None:
    """Returns once `condition()` holds, checked every 50 ms, or after `timeout_s` (the caller asserts)."""
    for _ in range(int(timeout_s / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)


async def settled(value, step_s: float = 0.2):
    """`value()` once two readings `step_s` apart agree (at most 4 s)."""
    last = value()
    for _ in range(int(4 / step_s)):
        await asyncio.sleep(step_s)
        if (now := value()) == last:
            return now
        last = now
    return last


async def read_all(call) -> list[str]:
    texts = []
    while (message := await call.read()) is not grpc.aio.EOF:
        texts.append(message.text)
    return texts


async def test_concurrent_calls_each_get_their_own_messages_in_order(replica):
    servicer, calls, _ = replica
    started = [await calls.start(generate(f"count {n}", f"r{n}"), 10, {"traceparent": f"t{n}"}) for n in range(1, 9)]
    answers = await asyncio.gather(*(read_all(call) for call in started))
    assert answers == [[str(i) for i in range(n)] for n in range(1, 9)]
    assert sorted(servicer.metadata) == sorted((("traceparent", f"t{n}"),) for n in range(1, 9))


async def test_an_error_ends_the_call_with_its_status_and_metadata_and_leaves_the_others(replica):
    _, calls, _ = replica
    full, bug, fine = [await calls.start(generate(p), 10, None) for p in ("full", "bug", "count 3")]
    with pytest.raises(errors.Overloaded, match="replica full") as overloaded:
        await full.read()
    assert overloaded.value.retry_after_s == 7
    assert (await bug.read()).text == "a"
    with pytest.raises(errors.InternalError, match="RuntimeError: engine crashed"):
        await bug.read()
    assert await read_all(fine) == ["0", "1", "2"]


async def test_a_call_whose_reader_falls_behind_is_paused_until_it_catches_up_and_loses_nothing(replica, monkeypatch):
    monkeypatch.setattr(call_stream, "PAUSED_TAKE_S", 60)
    servicer, calls, _ = replica
    behind, reading = await calls.start(generate("count 400", "behind"), 10, None), \
        await calls.start(generate("count 400", "reading"), 10, None)
    assert await read_all(reading) == [str(i) for i in range(400)]  # the other call on the stream is not held up
    assert behind.paused
    held = await settled(lambda: servicer.yielded["behind"])
    await asyncio.sleep(0.3)
    # Its Generate is not advanced while it is paused (the engine would merge meanwhile).
    assert servicer.yielded["behind"] == held < 400
    assert await read_all(behind) == [str(i) for i in range(400)]
    assert not behind.paused


async def test_a_paused_call_still_takes_an_output_every_so_often(replica, monkeypatch):
    monkeypatch.setattr(call_stream, "PAUSED_TAKE_S", 0.1)
    servicer, calls, _ = replica
    call = await calls.start(generate("count 400"), 10, None)
    await eventually(lambda: call.paused)
    held = await settled(lambda: servicer.yielded["count 400"], 0.05)
    await asyncio.sleep(1)
    # About one take per PAUSED_TAKE_S (each would carry all the engine made meanwhile), not one per output.
    assert 1 <= servicer.yielded["count 400"] - held <= 15
    call.cancel()


async def test_a_paused_call_is_still_cancelled(replica):
    servicer, calls, _ = replica
    call = await calls.start(generate("count 400"), 10, None)
    await eventually(lambda: call.paused)
    assert call.paused
    call.cancel()
    await eventually(lambda: servicer.cancelled)
    assert servicer.cancelled == ["count 400"]


async def test_cancelling_a_call_cancels_its_generate_and_no_other(replica):
    servicer, calls, _ = replica
    slow, other = await calls.start(generate("slow"), 10, None), await calls.start(generate("slow", "other"), 10, None)
    await slow.read()
    slow.cancel()
    await eventually(lambda: servicer.cancelled, 1)
    assert servicer.cancelled == ["slow"]
    assert (await other.read()).text == "x"
    other.cancel()


async def test_a_call_past_its_deadline_fails_and_its_generate_is_cancelled(replica):
    servicer, calls, _ = replica
    call = await calls.start(generate("slow"), 0.2, None)
    with pytest.raises(errors.DeadlineExceeded):
        await read_all(call)
    await eventually(lambda: servicer.cancelled, 1)
    assert servicer.cancelled == ["slow"]


async def test_a_stream_whose_server_goes_fails_its_calls_unavailable(replica):
    servicer, calls, server = replica
    call = await calls.start(generate("slow"), 10, None)
    await call.read()
    await server.drain()
    with pytest.raises((errors.Unavailable, errors.Cancelled)):
        await read_all(call)
    assert calls.failed is not None
    with pytest.raises(errors.ServingError):
        await calls.start(generate("count 1"), 10, None)


async def test_a_replica_without_the_method_says_unimplemented():
    server = GrpcServer("127.0.0.1", 0, max_message_bytes=1 << 20, grace_s=0.1, announce_s=0)
    server.add_service(llm_pb2_grpc.add_LanguageModelServicer_to_server, llm_pb2_grpc.LanguageModelServicer(),
                       "internvl.llm.v1.LanguageModel")
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        calls = CallStream(llm_pb2_grpc.LanguageModelStub(channel), "old")
        with pytest.raises(errors.ServingError):  # from the start's write or the first read: whichever sees it
            call = await calls.start(generate("count 1"), 10, None)
            await call.read()
        assert calls.unimplemented
    await server.drain()


class _EndedStream:
    """A GenerateStream that the server ended as UNIMPLEMENTED, whose write fails before its read has said so."""

    @staticmethod
    def _error() -> grpc.aio.AioRpcError:
        return grpc.aio.AioRpcError(grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                    "Method not implemented!")

    async def initial_metadata(self):
        return grpc.aio.Metadata()

    async def write(self, message):
        raise self._error()

    async def read(self):
        await asyncio.sleep(0.05)
        raise self._error()

    def cancel(self):
        pass


async def test_a_start_that_fails_first_still_says_the_replica_is_unimplemented_not_down():
    class Stub:
        GenerateStream = _EndedStream

    calls = CallStream(Stub(), "old")
    with pytest.raises(errors.ServingError):
        await calls.start(generate("count 1"), 10, None)
    assert calls.unimplemented  # which the gateway falls back on (a Generate call of its own), not a replica down


async def test_calls_ready_together_share_a_message_and_none_puts_a_second_before_its_first_is_written():
    progress = []

    async def generate_tokens(request, context):
        for i in range(3):
            yield llm_pb2.GenerateResponse(request_id=request.request_id, text=str(i))
            progress.append((request.request_id, i))  # resumed: token i went to the outbox

    async def requests():
        for call_id in range(1, 5):
            yield llm_pb2.GenerateStreamRequest(call_id=call_id, start=generate("x", f"r{call_id}"))
        await asyncio.Event().wait()  # the caller keeps the stream open

    messages = serve_calls(requests(), None, generate_tokens)
    first = await anext(messages)
    await asyncio.sleep(0.05)  # time for every call to run as far as it may
    assert len(first.events) == 4 and {e.message.text for e in first.events} == {"0"}
    # Each call may have taken its second token from its generator, but none put it in a message before its first
    # was written: no call resumed past its second yield.
    assert len(progress) <= 4
    events, count = list(first.events), 1
    while sum(e.HasField("status") for e in events) < 4:
        events += (await anext(messages)).events
        count += 1
    await messages.aclose()
    for call_id in range(1, 5):
        own = [e for e in events if e.call_id == call_id]
        assert [e.message.text for e in own[:3]] == ["0", "1", "2"] and own[3].status.code == 0
    assert count <= 5  # 16 events; one message per call and token would be 16


async def test_calls_messages_share_a_stream_message_up_to_its_size_and_a_larger_one_travels_alone(monkeypatch):
    monkeypatch.setattr(call_stream, "MAX_SHARED_BYTES", 1000)
    sizes = {"r1": 300, "r2": 300, "r3": 2000, "r4": 300}

    async def generate_text(request, context):
        yield llm_pb2.GenerateResponse(request_id=request.request_id, text="x" * sizes[request.request_id])

    async def requests():
        for call_id in range(1, 5):
            yield llm_pb2.GenerateStreamRequest(call_id=call_id, start=generate("x", f"r{call_id}"))
        await asyncio.Event().wait()

    stream = serve_calls(requests(), None, generate_text)
    batches = []
    while sum(kind == "status" for batch in batches for _, kind, _ in batch) < 4:
        batches.append([(e.call_id, e.message.request_id, len(e.message.text)) if e.HasField("message") else
                        (e.call_id, "status", e.status.code) for e in (await anext(stream)).events])
    await stream.aclose()
    # The four calls' messages were ready together: as many as fit in 1000 bytes share one, the 2000 goes alone.
    messages = [[event for event in batch if event[1] != "status"] for batch in batches]
    assert [batch for batch in messages if batch] == [[(1, "r1", 300), (2, "r2", 300)], [(3, "r3", 2000)],
                                                      [(4, "r4", 300)]]
    assert sorted(event for batch in batches for event in batch if event[1] == "status") == [
        (n, "status", 0) for n in range(1, 5)]


async def test_a_stream_past_its_time_for_new_calls_ends_once_its_calls_have(replica):
    servicer, _, server = replica
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        calls = CallStream(llm_pb2_grpc.LanguageModelStub(channel), "replica", new_calls_s=0.2)
        slow, quick = await calls.start(generate("slow"), 10, None), await calls.start(generate("count 2"), 10, None)
        await asyncio.sleep(0.3)
        assert not calls.open_for_calls and calls.failed is None
        assert await read_all(quick) == ["0", "1"]
        await slow.read()
        slow.cancel()  # the last call: its cancel goes out, then the stream ends
        for _ in range(40):
            if calls.failed is not None:
                break
            await asyncio.sleep(0.05)
        assert isinstance(calls.failed, errors.Unavailable) and servicer.cancelled == ["slow"]


async def test_a_call_s_inbox_gives_its_reader_every_item_in_order_waiting_for_the_next():
    inbox = call_stream._Inbox()
    inbox.put("a")
    reader = asyncio.create_task(asyncio.wait_for(inbox.get(), 5))
    assert await reader == "a" and len(inbox) == 0
    waiting = asyncio.create_task(inbox.get())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    inbox.put("b")
    inbox.put("c")
    assert await waiting == "b" and len(inbox) == 1 and await inbox.get() == "c"
    waiting = asyncio.create_task(inbox.get())
    await asyncio.sleep(0.01)
    waiting.cancel()  # a reader cancelled while waiting leaves the inbox usable
    inbox.put("d")
    assert await inbox.get() == "d"


class CountingLanguageModel(ScriptedLanguageModel):
    """Keeps every message of its streams' requests; `takes_more` False serves GenerateStream as an llm_svc from
    before `more` did (no initial metadata saying so)."""

    def __init__(self, takes_more: bool):
        super().__init__()
        self.takes_more = takes_more
        self.received: list[llm_pb2.GenerateStreamRequest] = []

    async def GenerateStream(self, request_iterator, context):
        async def kept():
            async for message in request_iterator:
                self.received.append(message)
                yield message
        if self.takes_more:
            await context.send_initial_metadata(((call_stream.TAKES_MORE, "1"),))
        async for message in serve_calls(kept(), context, self.Generate):
            yield message


@pytest.mark.parametrize("takes_more", [True, False])
async def test_starts_ready_together_share_a_message_where_the_server_takes_them(takes_more):
    servicer = CountingLanguageModel(takes_more)
    server = GrpcServer("127.0.0.1", 0, max_message_bytes=1 << 20, grace_s=0.1, announce_s=0)
    server.add_service(llm_pb2_grpc.add_LanguageModelServicer_to_server, servicer, "internvl.llm.v1.LanguageModel")
    port = await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        calls = CallStream(llm_pb2_grpc.LanguageModelStub(channel), "replica")
        assert await read_all(await calls.start(generate("count 1", "first"), 10, None)) == ["0"]
        started = await asyncio.gather(*(calls.start(generate(f"count {n}", f"r{n}"), 10, {"traceparent": f"t{n}"})
                                         for n in range(1, 9)))
        answers = await asyncio.gather(*(read_all(call) for call in started))
        await calls.close()
    await server.drain()
    assert answers == [[str(i) for i in range(n)] for n in range(1, 9)]
    assert sorted(servicer.metadata[1:]) == sorted((("traceparent", f"t{n}"),) for n in range(1, 9))
    later = servicer.received[1:]
    if takes_more:  # the first was written at once, the seven started meanwhile together after it
        assert [m.start.request_id for m in later[:1]] == ["r1"] and len(later) == 2
        assert [m.start.request_id for m in later[1].more] == [f"r{n}" for n in range(2, 9)]
    else:
        assert [m.start.request_id for m in later] == [f"r{n}" for n in range(1, 9)] and not any(m.more for m in later)


class _HeldStream:
    """A GenerateStream whose server takes `more` and whose writes each wait until `release` is set."""

    def __init__(self):
        self.written: list[llm_pb2.GenerateStreamRequest] = []
        self.writing = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def initial_metadata(self):
        return grpc.aio.Metadata((call_stream.TAKES_MORE, "1"))

    async def write(self, message):
        self.written.append(message)
        self.writing.set()
        await self.release.wait()
        self.release.clear()

    async def read(self):
        await self.cancelled.wait()
        raise asyncio.CancelledError

    def cancel(self):
        self.cancelled.set()


def _actions(message: llm_pb2.GenerateStreamRequest) -> list[tuple[int, str]]:
    return [(m.call_id, m.WhichOneof("action")) for m in ([message] if message.WhichOneof("action") else message.more)]


async def test_what_is_queued_while_a_message_is_written_goes_in_the_next_in_order_and_up_to_its_size(monkeypatch):
    monkeypatch.setattr(call_stream, "MAX_SHARED_BYTES", 1000)
    stream = _HeldStream()

    class Stub:
        def GenerateStream(self):
            return stream

    calls = CallStream(Stub(), "replica")
    await asyncio.sleep(0)  # its reader has the initial metadata
    first = asyncio.create_task(calls.start(generate("a"), 10, None))
    await stream.writing.wait()
    queued = [asyncio.create_task(calls.start(generate(prompt), 10, None)) for prompt in ("b", "c", "x" * 2000, "d")]
    await asyncio.sleep(0.01)
    queued[1].cancel()  # given up while queued: its start does not go out, its cancel does
    for _ in range(100):
        if all(task.done() for task in (first, *queued)):
            break
        stream.release.set()
        await asyncio.sleep(0.01)
    assert queued[1].cancelled() and all(task.result().call_id == n for task, n in zip([first, *queued], range(1, 6))
                                         if not task.cancelled())
    # b alone (the 2000-byte start after it does not fit), the 2000 alone, then d with c's cancel.
    assert [_actions(message) for message in stream.written] == [
        [(1, "start")], [(2, "start")], [(4, "start")], [(5, "start"), (3, "cancel")]]
    assert stream.written[3].more[0].start.prompt == "d"
    await calls.close()
