"""The start-up heap kept out of the garbage collector's way, as vLLM's own server does (`freeze_gc_heap`).

A stage's libraries (Starlette, pydantic and gRPC; vLLM and torch) and its server leave hundreds of thousands of
objects that live as long as the process. CPython's collection of its oldest generation walks every one of them, and
it comes whenever enough objects have outlived the younger collections, which streams that last seconds do: the event
loop stops for that long, and every stream with it (~90 ms in the gateway, ~0.5 s in llm_svc on a CPU machine,
`bench/RESULTS.md`). Frozen once the stage is up, they are left out of every collection; what is created later is
collected as before.
"""

import dataclasses
import gc
import logging
import time

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FrozenHeap:
    objects: int  # left out of collections from now on
    full_collection_ms: float  # CPU time a full collection took before the freeze


def freeze_startup_heap() -> FrozenHeap:
    """Collects what start-up left behind, then freezes the rest; call it once the stage is ready to serve."""
    started = time.thread_time()  # this thread's: what the collection costs, not the time other threads run meanwhile
    gc.collect()
    collection_ms = (time.thread_time() - started) * 1e3
    gc.freeze()
    frozen = FrozenHeap(gc.get_freeze_count(), collection_ms)
    log.info("start-up heap frozen: %d objects left out of garbage collection (a full collection took %.0f ms)",
             frozen.objects, frozen.full_collection_ms)
    return frozen
