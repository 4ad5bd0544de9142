"""Bounds on the work a stage holds at once: the requests it is serving and the bytes they keep in memory.

Past either bound a new request is refused at once with `Overloaded` (RESOURCE_EXHAUSTED, HTTP 429, with a
retry hint) instead of waiting in memory: a flood of large requests gets refusals, never an out-of-memory kill.
A request is admitted first (one slot), then holds bytes as it learns their size (a body's Content-Length, each
downloaded chunk, each embedding); everything it holds returns when it is released.
"""

from protos.errors import Overloaded


class WorkLimit:
    """The requests and bytes one stage may hold; `stage` names it in refusals."""

    def __init__(self, stage: str, max_requests: int, max_bytes: int):
        if max_requests < 1 or max_bytes < 1:
            raise ValueError(f"{stage}: the limits on requests and bytes in flight must be at least 1")
        self.stage = stage
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0

    def admit(self, holding: int = 0, leaving: int = 0) -> "AdmittedWork":
        """A slot for one request that holds `holding` bytes already (with `leaving` to spare, as `hold` has it), or
        Overloaded (holding nothing)."""
        if self.requests >= self.max_requests:
            raise Overloaded(f"{self.stage} is serving {self.requests} requests, its limit; retry later")
        self.requests += 1
        work = AdmittedWork(self)
        try:
            work.hold(holding, leaving)
        except Overloaded:
            work.release()
            raise
        return work


class AdmittedWork:
    """One admitted request's share of a `WorkLimit`; a context manager that releases it on exit."""

    def __init__(self, limit: WorkLimit):
        self._limit = limit
        self.bytes = 0
        self._released = False

    def hold(self, nbytes: int, leaving: int = 0) -> None:
        """Counts `nbytes` more against the limit, or raises Overloaded (holding nothing more) when they do not
        fit beside what every request holds now with `leaving` bytes to spare.

        A request's first bytes (its body) leave room for the most it may hold next (its images): else a flood of
        requests could each hold a body, none find room for its images, and every one be refused. With that room
        kept, the first of them to hold its images finds it, so a flood always gets some answers."""
        limit = self._limit
        if limit.bytes + nbytes + leaving > limit.max_bytes:
            room = f" and room for {leaving} more it may need" if leaving else ""
            raise Overloaded(f"{limit.stage} holds {limit.bytes} bytes of requests in flight; {nbytes} more{room} "
                             f"would pass its limit of {limit.max_bytes}; retry later")
        limit.bytes += nbytes
        self.bytes += nbytes

    def release_bytes(self) -> None:
        """Returns the bytes held so far (the request no longer keeps them) while keeping its slot."""
        self._limit.bytes -= self.bytes
        self.bytes = 0

    def release(self) -> None:
        """Returns the slot and every byte; calling it again does nothing."""
        if self._released:
            return
        self._released = True
        self.release_bytes()
        self._limit.requests -= 1

    def __enter__(self) -> "AdmittedWork":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
