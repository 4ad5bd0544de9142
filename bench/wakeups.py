"""What a wake-up costs on this machine: CPU time charged to a process that sleeps and wakes, against a system call.

    python -m bench.wakeups            # ~10 s

A streamed token costs each front process a few wake-ups (a message arrives, a write completes, a helper thread
hands over) and little work. Where a wake-up costs as much CPU as the work, the number of wake-ups per token is
what the front's CPU per token measures (bench.front_cost prints them). Each case runs with the other cores idle,
then with a busy loop on every core: on a virtual machine, waking a virtual CPU from idle can cost far more than
a wake-up on a busy one. CPU time is the process's user + system time (`time.process_time`).
"""

import argparse
import asyncio
import multiprocessing
import os
import threading
import time

from bench.common import markdown_table


def per_call_us(run, repeats: int) -> float:
    started = time.process_time()
    run(repeats)
    return 1e6 * (time.process_time() - started) / repeats


def sleeps(repeats: int, seconds: float) -> None:
    for _ in range(repeats):
        time.sleep(seconds)


def asyncio_sleeps(repeats: int, seconds: float) -> None:
    async def run():
        for _ in range(repeats):
            await asyncio.sleep(seconds)
    asyncio.run(run())


def thread_hand_overs(repeats: int, seconds: float) -> None:
    """Another thread wakes this one every `seconds`, as a completion-queue poller hands an event over."""
    ready, stop = threading.Event(), threading.Event()

    def waker():
        while not stop.wait(seconds):
            ready.set()
    thread = threading.Thread(target=waker)
    thread.start()
    for _ in range(repeats):
        ready.wait()
        ready.clear()
    stop.set()
    thread.join()


def system_calls(repeats: int) -> None:
    for _ in range(repeats):
        os.getppid()


def spin(stop) -> None:
    while not stop.is_set():
        pass


def measure(repeats: int, interval_s: float) -> list[list]:
    return [
        [f"time.sleep({interval_s * 1e3:g} ms)", per_call_us(lambda n: sleeps(n, interval_s), repeats)],
        [f"asyncio.sleep({interval_s * 1e3:g} ms)", per_call_us(lambda n: asyncio_sleeps(n, interval_s), repeats)],
        [f"woken by another thread every {interval_s * 1e3:g} ms",
         per_call_us(lambda n: thread_hand_overs(n, interval_s), repeats)],
        ["a system call (getppid)", per_call_us(system_calls, 100 * repeats)],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.wakeups", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=400, help="wake-ups per case")
    parser.add_argument("--interval-ms", type=float, default=4.0, help="time between wake-ups (an engine step)")
    args = parser.parse_args()
    interval_s = args.interval_ms / 1e3
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    idle = measure(args.repeats, interval_s)
    stop = multiprocessing.Event()
    spinners = [multiprocessing.Process(target=spin, args=(stop,)) for _ in range(os.cpu_count() or 1)]
    for spinner in spinners:
        spinner.start()
    try:
        busy = measure(args.repeats, interval_s)
    finally:
        stop.set()
        for spinner in spinners:
            spinner.join()
    rows = [[case, f"{idle_us:.1f}", f"{busy_us:.1f}"] for (case, idle_us), (_, busy_us) in zip(idle, busy)]
    print(markdown_table(["each", "CPU us, other cores idle", "CPU us, every core busy"], rows))


if __name__ == "__main__":
    main()
