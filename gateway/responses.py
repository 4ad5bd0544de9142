"""Renders the messages of one Generate call as OpenAI's answer: SSE events (`data: {...}`, ending with
`data: [DONE]`) or one JSON body, recording the token counts on the way."""

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable, Callable

import msgspec

from gateway import translate
from gateway.client_watch import ClientWatch
from gateway.errors import http_error
from gateway.metrics import GatewayMetrics
from protos import llm_pb2
from protos.errors import Cancelled, ServingError

log = logging.getLogger(__name__)

RenderChunk = Callable[[llm_pb2.GenerateResponse], dict | None]
# One call's TokenStream, or the merged calls of several prompts (gateway/fanout.py).
Messages = AsyncIterable[llm_pb2.GenerateResponse]


def record_usage(message: llm_pb2.GenerateResponse, metrics: GatewayMetrics) -> None:
    metrics.prompt_tokens.inc(message.usage.prompt_tokens)
    metrics.completion_tokens.inc(message.usage.completion_tokens)


async def collect(stream: Messages, metrics: GatewayMetrics) -> list[llm_pb2.GenerateResponse]:
    messages = [message async for message in stream]
    record_usage(messages[-1], metrics)
    return messages


def completion_renderer(meta: translate.ResponseMeta, logprobs: int | None, echo: bool = False,
                        n: int = 1) -> RenderChunk:
    """Chunks of each choice, with its tokens' offsets in its whole text; with `echo`, each choice's first chunk
    starts with its prompt (which the first message of that prompt's call carries; choice i answers prompt i // n)."""
    offsets: dict[int, int] = {}  # choice index -> where its next token starts
    prompts: dict[int, translate.PromptEcho] = {}  # prompt index -> what echo shows of it

    def render(message: llm_pb2.GenerateResponse) -> dict | None:
        prompt = None
        if echo:
            if message.index // n not in prompts:
                prompts[message.index // n] = translate.PromptEcho.of(message, logprobs)
            prompt = prompts[message.index // n]
        first = message.index not in offsets
        chunk = translate.completion_chunk(message, meta, logprobs is not None, offsets.get(message.index, 0),
                                           prompt if first else None)
        if chunk is not None:
            shown = chunk["choices"][0]["logprobs"]
            if shown and shown["tokens"]:
                offsets[message.index] = shown["text_offset"][-1] + len(shown["tokens"][-1])
            else:
                offsets.setdefault(message.index, 0)
        return chunk
    return render


# Every streamed token is an event: msgspec encodes one in a tenth of the time of the json module (0.3 against 3.5 us).
# The same JSON as `json.dumps(ensure_ascii=False)` but for how floats are spelled (1e16 and 0.00001 for 1e+16 and
# 1e-05: the same numbers to any parser; vLLM's server spells them its own way too), and NaN, which no JSON has, is
# written as null.
_to_json = msgspec.json.Encoder().encode


def sse(payload: dict) -> bytes:
    return b"data: " + _to_json(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"


async def sse_events(stream: Messages, render: RenderChunk, first_chunks: list[dict], meta: translate.ResponseMeta,
                     obj: str, include_usage: bool, metrics: GatewayMetrics,
                     continuous_usage: bool = False) -> AsyncIterator[bytes]:
    """The events that are ready together, in one string each: those of a message (with `first_chunks`, which go
    before the first message's), and at the end the usage chunk and `data: [DONE]`, always last. With
    `continuous_usage` every chunk carries its choice's usage so far, which each message brings
    (GenerateResponse.choice_usage)."""
    chat = obj == "chat.completion.chunk"
    # A client that disconnects cancels this generator inside `stream`, which cancels the gRPC call.
    try:
        last = None
        async for message in stream:
            events = []
            if last is None:
                for chunk in first_chunks:
                    if continuous_usage:
                        chunk["usage"] = translate.running_usage_json(message.choice_usage, chat, before_tokens=True)
                    events.append(sse(chunk))
            last = message
            if (chunk := render(message)) is not None:
                if continuous_usage:
                    chunk["usage"] = translate.running_usage_json(message.choice_usage, chat)
                events.append(sse(chunk))
            if events:
                yield b"".join(events)
        record_usage(last, metrics)
        ending = sse(translate.usage_chunk(meta, obj, last.usage)) if include_usage else b""
    except ServingError as error:
        log.warning("stream failed after it started: %s", error)
        ending = sse(http_error(error)[1])
    yield ending + DONE


class EventStream:
    """The SSE answer (an ASGI app), sent under the request's `ClientWatch`: a client that disconnects cancels the
    sending, and closing `events` then cancels the call (as does `on_close`, for a client gone before the first
    event). Starlette's StreamingResponse would watch the client with a task group of its own."""

    HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]

    def __init__(self, events: AsyncGenerator[bytes, None], client: ClientWatch,
                 on_close: Callable[[], Awaitable[None]]):
        self._events = events
        self._client = client
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            with self._client.guarded():
                # Sent from a task of its own: each token then resumes this task's few coroutines, not the ~20 of
                # the request's middleware and routing (~1.3 us of CPU a token, bench.gateway_cost). Cancelling the
                # request's task cancels this one.
                await asyncio.get_running_loop().create_task(self._send_all(send))
        except Cancelled:
            pass  # the client left: no one to tell
        finally:
            await self._events.aclose()
            await self._on_close()

    async def _send_all(self, send) -> None:
        """Each string of events in one write (at one token a request, half the writes of one an event: each is a
        system call and five layers of ASGI `send`); the one that ends with `data: [DONE]` ends the answer."""
        await send({"type": "http.response.start", "status": 200, "headers": self.HEADERS})
        async for events in self._events:
            last = events.endswith(DONE)
            await send({"type": "http.response.body", "body": events, "more_body": not last})
            if last:
                return
        await send({"type": "http.response.body", "body": b"", "more_body": False})
