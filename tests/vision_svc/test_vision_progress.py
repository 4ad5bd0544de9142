"""Progress watches: how long work has waited with none of it finishing, in the preprocessing pool and the encoder,
and the stall watch that acts on it."""

import asyncio
import threading

import torch

from vision_svc.encoder_runner import EncoderRunner
from vision_svc.preprocess import PreprocessPool
from vision_svc.progress import ProgressWatch, StallWatch


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_stalled_for_as_long_as_work_is_in_hand_and_none_finishes():
    clock = Clock()
    watch = ProgressWatch(clock)
    clock.now += 50
    assert watch.stalled_s() == 0  # idle is not stalled, however long
    watch.started()
    clock.now += 5
    assert watch.stalled_s() == 5
    watch.started()
    clock.now += 5
    assert watch.stalled_s() == 10  # more work does not restart the clock
    watch.finished()
    assert watch.stalled_s() == 0  # one finished: work moves
    clock.now += 3
    watch.finished(moved=False)  # withdrawn
    assert watch.stalled_s() == 0
    watch.started()
    watch.started()
    clock.now += 7
    watch.finished(moved=False)  # a request withdrawn from a stuck worker's queue is no progress
    assert watch.stalled_s() == 7


def blocked(gate: threading.Event, value: int) -> int:
    gate.wait(30)
    return value


async def test_the_pool_counts_a_task_until_it_returns_and_a_withdrawn_one_as_no_progress():
    gate = threading.Event()
    with PreprocessPool(workers=0) as pool:  # one thread: the second task waits behind the first
        first = asyncio.ensure_future(pool.in_worker(blocked, gate, 1))
        second = asyncio.ensure_future(pool.in_worker(blocked, gate, 2))
        await asyncio.sleep(0.3)
        second.cancel()
        await asyncio.sleep(0.2)
        assert pool.progress.stalled_s() >= 0.45  # the cancelled task did not count as the pool moving
        gate.set()
        assert await asyncio.wait_for(first, 30) == 1
        assert pool.progress.stalled_s() == 0


async def test_unwatched_work_does_not_count():
    """A video's decoding may rightly run longer than the stall timeout."""
    gate = threading.Event()
    with PreprocessPool(workers=0) as pool:
        video = asyncio.ensure_future(pool.in_worker(blocked, gate, 1, watched=False))
        await asyncio.sleep(0.3)
        assert pool.progress.stalled_s() == 0
        gate.set()
        assert await asyncio.wait_for(video, 30) == 1


async def test_the_encoder_counts_a_pass_until_it_returns():
    gate = threading.Event()

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        gate.wait(30)
        return torch.zeros(len(pixels), 1, 2)

    runner = EncoderRunner(encode, torch.device("cpu"), torch.float32, max_batch_tiles=8, batch_wait_s=0,
                           max_queue_tiles=64)
    try:
        job = asyncio.ensure_future(runner.encode(torch.ones(2, 3, 4, 4)))
        await asyncio.sleep(0.5)
        assert runner.progress.stalled_s() >= 0.4
        gate.set()
        assert (await asyncio.wait_for(job, 30)).shape == (2, 2)
        for _ in range(50):  # the pass resolves its jobs' futures just before it counts itself finished
            if runner.progress.stalled_s() == 0:
                break
            await asyncio.sleep(0.1)
        assert runner.progress.stalled_s() == 0
    finally:
        gate.set()
        runner.stop()


async def test_a_stall_past_the_timeout_is_reported_once_and_so_is_the_recovery():
    clock = Clock()
    pool, encoder = ProgressWatch(clock), ProgressWatch(clock)
    events = []

    async def on_stall(reason: str) -> None:
        events.append(reason)

    async def on_recovery() -> None:
        events.append("moving")

    watch = StallWatch({"preprocessing": pool, "encoder": encoder}, 60, on_stall, on_recovery)
    encoder.started()
    clock.now += 59
    await watch.check()
    assert events == [] and not watch.stalled
    clock.now += 2
    await watch.check()
    await watch.check()
    assert events == ["no progress for 61 s in encoder (--stall-timeout-s 60)"] and watch.stalled
    encoder.finished()
    await watch.check()
    await watch.check()
    assert events[1:] == ["moving"] and not watch.stalled
