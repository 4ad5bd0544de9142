"""What tracing costs a request: the same stack with tracing off and on, measured in the same run.

    python -m bench.tracing_overhead                 # ~4 minutes on 2 quiet cores
    python -m bench.tracing_overhead --rounds 10     # quicker, noisier

Two copies of the stack (vision_svc, llm_svc, gateway) serve the tiny checkpoint side by side: one without
tracing, one exporting every span over OTLP to a receiver in this process (deploy.trace_collector; the export is
real gRPC, the receiver keeps the spans in memory). Requests go one at a time, alternating between the two in
rounds (the order flips every round), so that the load of the machine falls on both alike. Each request is a
chat with a distinct 1280x720 JPEG (9 tiles) and a fixed output of 16 tokens. Reported per system: median and
p90 of the time to the whole answer and to the first token (streamed), and the traced stack over the plain one.
Then the price of the helpers that the hot paths call while tracing is off, per call.
"""

import argparse
import os
import pathlib
import time
import timeit

import httpx

from bench import stage_runs
from bench.common import jpeg_data_url, markdown_table, median, percentile, photo_like_jpeg, ratio
from bench.e2e import CPU_ENGINE_FLAGS
from deploy.local import Stage, free_port, gateway_stage, llm_stage, vision_stage
from deploy.trace_collector import TraceCollector
from protos import tracing

OUTPUT_TOKENS = 16
IMAGE_SIZE = (1280, 720)


def start_stack(model: pathlib.Path, logs: pathlib.Path, name: str, extra: list[str]) -> list[Stage]:
    stages = [vision_stage(model, free_port(), ["--preprocess-workers", "1", *extra], logs / f"{name}-vision.log")]
    stages[0].wait_ready()
    stages.append(llm_stage(model, stages[:1], free_port(), [*CPU_ENGINE_FLAGS, *extra], logs / f"{name}-llm.log"))
    stages[1].wait_ready()
    stages.append(gateway_stage(stages[1:2], "127.0.0.1", free_port(), extra, logs / f"{name}-gateway.log"))
    stages[2].wait_ready()
    return stages


def timed_chat(client: httpx.Client, model: str, seed: int) -> tuple[float, float]:
    """(seconds to the first token, seconds to the end) of one streamed chat with a distinct image."""
    body = {"model": model, "max_tokens": OUTPUT_TOKENS, "ignore_eos": True, "stream": True, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": jpeg_data_url(
            photo_like_jpeg(*IMAGE_SIZE, seed=seed))}}, {"type": "text", "text": "Describe the picture."}]}]}
    first = None
    started = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if first is None and line.startswith("data: ") and '"content"' in line:
                first = time.perf_counter() - started
    return first if first is not None else float("nan"), time.perf_counter() - started


def helper_cost_ns(calls: int = 200_000) -> list[list]:
    """ns per call of each helper the hot paths call, with tracing off (as every stage runs by default)."""
    assert not tracing.enabled()
    cases = [("tracing.span(name) entered and left", "with span('x'): pass"),
             ("tracing.outgoing_metadata()", "outgoing_metadata()"),
             ("tracing.current_span().is_recording()", "current_span().is_recording()")]
    rows = []
    for label, statement in cases:
        seconds = min(timeit.repeat(statement, globals=vars(tracing), number=calls, repeat=5))
        rows.append([label, seconds / calls * 1e9])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30, help="requests per system (after one warm-up each)")
    parser.add_argument("--model", type=pathlib.Path, default=None, help="checkpoint (default: the tiny one)")
    parser.add_argument("--work-dir", default=None, help="where the tiny checkpoint and the logs go")
    args = parser.parse_args()
    logs, model = stage_runs.prepare(args, "tracing")
    collector = TraceCollector(max_spans=10_000)
    endpoint = collector.start()
    stacks: dict[str, list[Stage]] = {}
    try:
        stacks["off"] = start_stack(model, logs, "off", [])
        stacks["on"] = start_stack(model, logs, "on", ["--otlp-traces-endpoint", endpoint])
        name = model.resolve().name
        times: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
        clients = {key: httpx.Client(base_url=f"http://{stages[2].address}", timeout=600)
                   for key, stages in stacks.items()}
        for n in range(args.rounds + 1):
            for key in (("off", "on") if n % 2 == 0 else ("on", "off")):
                timing = timed_chat(clients[key], name, seed=1000 * n + (key == "on"))
                if n > 0:  # the first round warms both up
                    times[key].append(timing)
        traced_spans = len(collector.spans())
    finally:
        for stages in stacks.values():
            for stage in reversed(stages):
                stage.stop()
        collector.stop()
    print_results(times, traced_spans, args.rounds + 1)
    print("\nwith tracing off, per call:\n")
    print(markdown_table(["helper", "ns per call"], helper_cost_ns()))
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def print_results(times: dict[str, list[tuple[float, float]]], traced_spans: int, traced_requests: int) -> None:
    rows = []
    for key, label in (("off", "tracing off"), ("on", "tracing on, OTLP export")):
        ttft, total = [t[0] * 1000 for t in times[key]], [t[1] * 1000 for t in times[key]]
        rows.append([label, len(total), median(ttft), percentile(ttft, 90), median(total), percentile(total, 90)])
    on, off = rows[1], rows[0]
    rows.append(["on / off", "", ratio(on[2], off[2]), ratio(on[3], off[3]), ratio(on[4], off[4]),
                 ratio(on[5], off[5])])
    print(markdown_table(["stack", "requests", "TTFT p50 ms", "TTFT p90 ms", "total p50 ms", "total p90 ms"], rows))
    print(f"\nspans received from the traced stack: {traced_spans} ({traced_spans / traced_requests:.1f} per "
          f"request, warm-up included; start-up spans too)")


if __name__ == "__main__":
    stage_runs.run(main)
