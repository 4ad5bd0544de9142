"""Whether the stage's work is moving: a stuck encoder or preprocessing worker (a hung device, a worker that
never returns) leaves the process answering pings and health checks while every image sent to it waits out its
deadline. `ProgressWatch` says how long work has waited with none of it finishing; `StallWatch` calls the stage
past `--stall-timeout-s` (vision_svc.server turns its health NOT_SERVING, so that the clients' channels send new
images to the other replicas at once and a liveness probe restarts the stuck one, and sends the work in hand
back to their callers) and again once work moves (SERVING).
"""

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

from protos.errors import Unavailable

CHECK_INTERVAL_S = 1.0


class ProgressWatch:
    """Work in hand and when it last moved; safe from any thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._in_hand = 0
        self._moved = clock()

    def started(self) -> None:
        with self._lock:
            if not self._in_hand:
                self._moved = self._clock()
            self._in_hand += 1

    def finished(self, moved: bool = True) -> None:
        """One piece of work is over; `moved=False` for work withdrawn before it ran (a cancelled request), which
        says nothing of whether the rest is moving."""
        with self._lock:
            self._in_hand -= 1
            if moved:
                self._moved = self._clock()

    def stalled_s(self) -> float:
        """How long work has been in hand with none of it finishing; 0 with none in hand."""
        with self._lock:
            return self._clock() - self._moved if self._in_hand else 0.0


class StallWatch:
    """Checks the watches every second: past `timeout_s` without progress, `on_stall(reason)`; once every watch
    moves again, `on_recovery()`."""

    def __init__(self, watches: dict[str, ProgressWatch], timeout_s: float,
                 on_stall: Callable[[str], Awaitable[None]], on_recovery: Callable[[], Awaitable[None]]):
        self._watches = watches
        self._timeout_s = timeout_s
        self._on_stall = on_stall
        self._on_recovery = on_recovery
        self.stalled = False

    async def check(self) -> None:
        stuck = {part: s for part, watch in self._watches.items() if (s := watch.stalled_s()) >= self._timeout_s}
        if stuck and not self.stalled:
            self.stalled = True
            await self._on_stall("no progress for " + ", ".join(f"{s:.0f} s in {part}" for part, s in stuck.items())
                                 + f" (--stall-timeout-s {self._timeout_s:g})")
        elif not stuck and self.stalled:
            self.stalled = False
            await self._on_recovery()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(CHECK_INTERVAL_S)
            await self.check()


class InHand:
    """The work a stage holds for its callers (an image's or a video's encoding), so that a stuck stage sends it
    back: `send_back` cancels each piece, whose waiter then raises `error()` (UNAVAILABLE, for its caller to retry
    on another replica instead of waiting out its deadline here), and `refuse_if_stuck` turns new work away the same
    way until `moving_again`."""

    def __init__(self):
        self.stuck: str | None = None  # why the work is stuck, while it is
        self._work: set[asyncio.Future] = set()

    def refuse_if_stuck(self) -> None:
        if self.stuck is not None:
            raise self.error()

    def hold(self, work: asyncio.Future) -> None:
        self._work.add(work)
        work.add_done_callback(self._work.discard)

    def send_back(self, reason: str) -> int:
        """Cancels the work in hand; returns how many pieces there were."""
        self.stuck = reason
        work = list(self._work)
        for piece in work:
            piece.cancel()
        return len(work)

    def moving_again(self) -> None:
        self.stuck = None

    def raise_if_sent_back(self, work: asyncio.Future) -> None:
        """For a waiter that got CancelledError from `work`: `error()` if the work itself was cancelled (sent back,
        as nothing else cancels work that has a waiter), not the waiter."""
        if work.cancelled() and not asyncio.current_task().cancelling():
            raise self.error() from None

    def error(self) -> Unavailable:
        return Unavailable(f"this replica's image work is stuck ({self.stuck or 'no progress'}); retry on another "
                           "replica")
