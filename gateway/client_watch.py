"""Watching a generation request's HTTP client for its disconnect, from once its body is read until its answer is
sent: nobody would read the answer, so what the request is waiting for (its images, the start of its call, the
next token of a streamed answer) is cancelled, which cancels its call in llm_svc and so its engine request.

One watcher task per request, and the request's own task is what it cancels, as `asyncio.timeout` does: Starlette's
StreamingResponse would watch with a task group of its own, and wrapping each awaited step in a task to race it
against the client would cost two tasks a step (together ~0.2 ms of gateway CPU per request, bench/RESULTS.md).
"""

import asyncio
import contextlib
from collections.abc import Iterator

from protos.errors import Cancelled


class ClientWatch:
    """Watches from the first `guarded()` on, which must come after the request's body was read: the watcher reads
    the ASGI `receive` channel that the body comes from. `close` ends the watching, once the answer is sent."""

    def __init__(self, receive):
        self._receive = receive
        self._watcher: asyncio.Task | None = None
        self._guarded: asyncio.Task | None = None
        self.gone = False

    @contextlib.contextmanager
    def guarded(self) -> Iterator[None]:
        """Raises `Cancelled` from the block if the client disconnects before the block ends (or did already)."""
        if self.gone:
            raise Cancelled("client disconnected")
        if self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        task = asyncio.current_task()
        cancelling = task.cancelling()
        self._guarded = task
        try:
            yield
        except asyncio.CancelledError:
            # Ours only if no one else (a server shutting down) asked the task to stop too.
            if self.gone and task.uncancel() <= cancelling:
                raise Cancelled("client disconnected") from None
            raise
        finally:
            self._guarded = None

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        if self._guarded is not None:
            self._guarded.cancel()

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
