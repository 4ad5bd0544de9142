"""`EventStream` and `sse_events`: which SSE events go out in one write, and that the answer ends with its last."""

import asyncio
import json

from gateway import translate
from gateway.client_watch import ClientWatch
from gateway.metrics import GatewayMetrics
from gateway.responses import EventStream, sse_events
from protos import llm_pb2
from protos.errors import Unavailable

META = translate.ResponseMeta("chatcmpl-1", 0, "m")


def token(text: str, last: bool = False) -> llm_pb2.GenerateResponse:
    return llm_pb2.GenerateResponse(
        text=text, token_ids=[1],
        finish_reason=llm_pb2.FINISH_REASON_LENGTH if last else llm_pb2.FINISH_REASON_UNSPECIFIED,
        usage=llm_pb2.Usage(prompt_tokens=3, completion_tokens=2) if last else None)


async def messages(*items: llm_pb2.GenerateResponse | Exception):
    for item in items:
        await asyncio.sleep(0)
        if isinstance(item, Exception):
            raise item
        yield item


async def writes(*items: llm_pb2.GenerateResponse | Exception, include_usage: bool = True) -> list[dict]:
    """The ASGI messages that a streamed chat answer sends for `items`."""
    events = sse_events(messages(*items), lambda m: translate.chat_chunk(m, META, False),
                        translate.chat_first_chunks(META, 1, "assistant", ""), META, "chat.completion.chunk",
                        include_usage, GatewayMetrics())
    never = asyncio.Event()

    async def receive():
        await never.wait()

    async def on_close():
        pass

    sent = []

    async def send(message):
        sent.append(message)

    watch = ClientWatch(receive)
    await EventStream(events, watch, on_close)({"type": "http"}, receive, send)
    watch.close()
    return sent


def events_of(body: bytes) -> list:
    assert body.endswith(b"\n\n")
    return [json.loads(line.removeprefix(b"data: ")) if line != b"data: [DONE]" else "[DONE]"
            for line in body[:-2].split(b"\n\n")]


async def test_the_events_ready_together_go_in_one_write_and_the_last_ends_the_answer():
    start, first, second, end = await writes(token(" a"), token(" b", last=True))

    assert start["type"] == "http.response.start" and start["status"] == 200
    role, a = events_of(first["body"])  # the role chunk and the first token: one message's events
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert a["choices"][0]["delta"] == {"content": " a"} and first["more_body"]
    [b] = events_of(second["body"])
    usage, done = events_of(end["body"])
    assert b["choices"][0]["finish_reason"] == "length" and second["more_body"]
    assert usage["usage"]["completion_tokens"] == 2 and done == "[DONE]"
    assert end["more_body"] is False


async def test_a_stream_that_fails_ends_with_its_error_and_done_in_one_write():
    start, first, end = await writes(token(" a"), Unavailable("llm_svc down"), include_usage=False)

    assert len(events_of(first["body"])) == 2
    error, done = events_of(end["body"])
    assert "llm_svc down" in error["error"]["message"] and done == "[DONE]"
    assert end["more_body"] is False
