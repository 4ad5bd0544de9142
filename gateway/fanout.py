"""Several prompts in one completions request, as vLLM's server answers them: one Generate call per prompt, all
started at once, their messages merged into one stream as they arrive.

The merged stream numbers the choices as vLLM does (choice j of prompt p is p * n + j) and carries the request's
usage, summed over the prompts, on its last message; so the renderers of one call render it unchanged. Any call
failing fails the whole request, and leaving the stream early cancels every call (llm_svc aborts each engine request).
"""

import asyncio
from collections.abc import AsyncIterator

from gateway.llm_client import LlmClient, TokenStream
from protos import llm_pb2


async def generate_all(llm: LlmClient, requests: list[llm_pb2.GenerateRequest],
                       timeout_s: float) -> list[TokenStream]:
    """Starts every call and waits for each one's first message; the first failure (or a cancel) cancels the rest."""
    calls = [asyncio.ensure_future(llm.generate(request, timeout_s)) for request in requests]
    try:
        return list(await asyncio.gather(*calls))
    except BaseException:
        for call in calls:
            call.cancel()
        started = await asyncio.gather(*calls, return_exceptions=True)
        for stream in started:
            if isinstance(stream, TokenStream):
                await stream.close()
        raise


class MergedTokenStream:
    """The calls of several prompts as one TokenStream: messages in arrival order, renumbered, usage summed."""

    def __init__(self, streams: list[TokenStream], n: int):
        self._streams = streams
        self._n = n

    async def __aiter__(self) -> AsyncIterator[llm_pb2.GenerateResponse]:
        usages: dict[int, llm_pb2.Usage] = {}  # prompt index -> its latest usage
        iterators = [aiter(stream) for stream in self._streams]
        pending = {asyncio.ensure_future(anext(it)): p for p, it in enumerate(iterators)}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    prompt = pending.pop(task)
                    try:
                        message = task.result()
                    except StopAsyncIteration:
                        continue
                    pending[asyncio.ensure_future(anext(iterators[prompt]))] = prompt
                    yield self._renumbered(message, prompt, usages)
        finally:
            for task in pending:
                task.cancel()
            await self.close()

    def _renumbered(self, message: llm_pb2.GenerateResponse, prompt: int,
                    usages: dict[int, llm_pb2.Usage]) -> llm_pb2.GenerateResponse:
        message.index += prompt * self._n
        if message.HasField("usage"):
            # Each call's last message has its usage: the request's last message, after every call's, has the sum.
            usages[prompt] = llm_pb2.Usage()
            usages[prompt].CopyFrom(message.usage)
            message.usage.CopyFrom(summed(list(usages.values())))
        return message

    async def close(self) -> None:
        for stream in self._streams:
            await stream.close()


def summed(usages: list[llm_pb2.Usage]) -> llm_pb2.Usage:
    """The usage of several prompts: vLLM's server sums the prompt and completion tokens (and this gateway the cached
    ones, which vLLM's takes from the last prompt only)."""
    total = llm_pb2.Usage(prompt_tokens=sum(u.prompt_tokens for u in usages),
                          completion_tokens=sum(u.completion_tokens for u in usages),
                          cached_tokens=sum(u.cached_tokens for u in usages))
    if any(u.HasField("reasoning_tokens") for u in usages):
        total.reasoning_tokens = sum(u.reasoning_tokens for u in usages)
    return total
