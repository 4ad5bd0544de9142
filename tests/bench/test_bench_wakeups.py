"""bench.wakeups: each case runs its wake-ups and ends, and CPU time per wake-up is what it reports."""

import time

from bench.wakeups import measure, per_call_us, thread_hand_overs


def test_every_case_runs_and_reports_cpu_microseconds_per_call():
    rows = measure(repeats=5, interval_s=0.001)
    assert [row[0] for row in rows] == ["time.sleep(1 ms)", "asyncio.sleep(1 ms)",
                                        "woken by another thread every 1 ms", "a system call (getppid)"]
    assert all(us >= 0 for _, us in rows)


def test_per_call_is_cpu_time_not_wall_time():
    assert per_call_us(lambda n: time.sleep(0.05 * n), 2) < 10_000  # 50 ms asleep per call, far less CPU


def test_hand_overs_wait_for_the_other_thread():
    started = time.perf_counter()
    thread_hand_overs(10, 0.002)
    assert time.perf_counter() - started >= 10 * 0.002
