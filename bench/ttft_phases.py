"""Where an image request's time to first token goes: this stack's phases, from its spans, against vLLM's server.

    python -m bench.ttft_phases            # ~5 minutes on 2 shared cores
    python -m bench.ttft_phases --quick    # ~3 minutes: fewer requests per case

This stack (gateway, llm_svc, vision_svc) and vLLM's own OpenAI server serve the tiny checkpoint with the same
engine flags, both traced over OTLP into a receiver in this process (deploy.trace_collector). Requests go one at
a time (concurrency 1), the two systems alternating, each a streamed chat with one image and a few output tokens:
a 448x448 image (1 tile) and an 896x896 one (4 tiles + thumbnail), fresh per request so that no cache hides the
encoder, and one 896x896 image repeated in every request, where the caches hit. Each request carries a
`traceparent` of its own, so its spans in either system are found by its trace id.

The client's TTFT (send to first content chunk) is split for this stack into phases from its spans: each phase
takes the time of its spans that no phase above it in the table took, within the request's TTFT; `rest` is what
no span covers. For vLLM's server, its own `llm_request` span gives the arrival at its renderer, the engine queue
and the prefill (where its image encoder runs); the rest is its HTTP handling, image preprocessing, tokenization
and the hand-offs. The table gives medians per phase (which need not add up to the median TTFT), each phase's
counterpart inside vLLM's server, or that the split added it.
"""

import argparse
import dataclasses
import json
import os
import pathlib
import secrets
import time

import httpx

from bench import e2e, stage_runs
from bench.common import image_size, markdown_table, median, photo_like_jpeg, ratio
from bench.e2e import chat_body, engine_flags, random_texts, stop
from deploy.local import Stage, free_port, gateway_stage, llm_stage, vision_stage
from deploy.trace_collector import ReceivedSpan, TraceCollector

OURS, VLLM = "DvD (gateway)", "vLLM monolithic"
ROOT_SPAN = "POST /v1/chat/completions"
# A request of ours is complete once each stage's spans have come: every case sends an image, so vision_svc's too.
OUR_SPANS = {ROOT_SPAN, "VisionEncoder/Encode", "prefill"}
VLLM_SPAN = "llm_request"  # vLLM's own span of a request, made by its output processor
CLIENT = "client"  # a made-up span from the client's send to its first content chunk
Interval = tuple[int, int]  # [start_ns, end_ns)


@dataclasses.dataclass(frozen=True)
class Phase:
    label: str
    in_vllm: str  # where the same work happens inside vLLM's monolithic server, or that the split added it
    spans: tuple[str, ...] = ()  # spans whose time (not taken by a phase above) is this phase's
    between: tuple[tuple[str, str], tuple[str, str]] | None = None  # (span, "start"|"end") to (span, edge)


SPLIT = "added by the split"
# In claiming order: the narrower spans first, so that their parents (vision_wait, the gateway's request span)
# keep only what no narrower span explains.
PHASES = (
    Phase("gateway: body parse, data-URL decode", "HTTP body parse (API server)", ("parse", "image_fetch")),
    Phase("llm_svc: chat template", "chat template (API server)", ("render",)),
    Phase("vision_svc: JPEG decode", "image load (API server)", ("image_decode",)),
    Phase("vision_svc: resize, tile, normalize", "image processor (API server)", ("preprocess",)),
    Phase("vision_svc: batch wait", SPLIT + " (--batch-wait-ms)", ("batch_wait",)),
    Phase("vision_svc: encoder", "encoder, inside prefill", ("encode",)),
    Phase("vision_svc: embeddings transfer", SPLIT, ("stream",)),
    Phase("llm_svc: admission check", "render, tokenize, validation (API server)", ("admission",)),
    Phase("llm_svc: call to vision_svc", SPLIT, between=(("vision_wait", "start"), ("VisionEncoder/Encode", "start"))),
    Phase("vision_svc: cache lookup, answer back", SPLIT, ("vision_wait", "VisionEncoder/Encode")),
    Phase("llm_svc: engine input (render, tokenize, hand-off)", "render, tokenize, hand-off (API server)",
          between=(("vision_wait", "end"), ("engine_queue", "start"))),
    Phase("engine: queue", "engine queue", ("engine_queue",)),
    Phase("engine: prefill (LM only)", "prefill (encoder + LM)", ("prefill",)),
    Phase("first token back (llm_svc, gateway, SSE)", "output processor, SSE (API server); gRPC hop: " + SPLIT,
          between=(("prefill", "end"), (CLIENT, "end"))),
    Phase("gateway: request in, call to llm_svc", "HTTP in; gRPC hop: " + SPLIT,
          between=((CLIENT, "start"), ("LanguageModel/Generate", "start"))),
)
REST = "rest (no span)"
VLLM_PHASES = ("vLLM: HTTP in, request parse", "vLLM: engine queue", "vLLM: prefill (encoder + LM)",
               "vLLM: render, image processor, tokenize, hand-offs, token back")


def merged(intervals: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for start, end in sorted(i for i in intervals if i[1] > i[0]):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def covered_ns(intervals: list[Interval]) -> int:
    return sum(end - start for start, end in merged(intervals))


def phase_intervals(phase: Phase, spans: list[ReceivedSpan]) -> list[Interval]:
    if phase.between is None:
        return [(s.start_ns, s.end_ns) for s in spans if s.name in phase.spans]
    (first, first_edge), (second, second_edge) = phase.between
    starts = [getattr(s, f"{first_edge}_ns") for s in spans if s.name == first]
    ends = [getattr(s, f"{second_edge}_ns") for s in spans if s.name == second]
    return [(max(starts), min(ends))] if starts and ends else []


def client_span(sent_ns: int, first_token_ns: int) -> ReceivedSpan:
    return ReceivedSpan("client", CLIENT, "", "", "", sent_ns, first_token_ns, {})


def our_phases(spans: list[ReceivedSpan], sent_ns: int, first_token_ns: int) -> dict[str, float]:
    """ms per phase of one request's TTFT (send to first token, wall clock of this host), each phase's spans
    clipped to it and less what a phase above took; REST is what no phase took, and "TTFT" the whole."""
    spans = [*spans, client_span(sent_ns, first_token_ns)]
    taken: list[Interval] = []
    times = {}
    for phase in PHASES:
        clipped = [(max(s, sent_ns), min(e, first_token_ns)) for s, e in phase_intervals(phase, spans)]
        before = covered_ns(taken)
        taken = merged(taken + clipped)
        times[phase.label] = (covered_ns(taken) - before) / 1e6
    times[REST] = (first_token_ns - sent_ns - covered_ns(taken)) / 1e6
    times["TTFT"] = (first_token_ns - sent_ns) / 1e6
    return times


def vllm_phases(request: ReceivedSpan, sent_ns: int, first_token_ns: int) -> dict[str, float]:
    """ms per phase of vLLM's server, from its `llm_request` span: it starts at the renderer's arrival time and
    holds the engine's queue and prefill times (s) as attributes."""
    ttft = (first_token_ns - sent_ns) / 1e6
    arrival = (request.start_ns - sent_ns) / 1e6
    queue = request.attributes.get("gen_ai.latency.time_in_queue", 0.0) * 1e3
    prefill = request.attributes.get("gen_ai.latency.time_in_model_prefill", 0.0) * 1e3
    return dict(zip(VLLM_PHASES, (arrival, queue, prefill, ttft - arrival - queue - prefill)), TTFT=ttft)


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: median([row[key] for row in rows]) for key in rows[0]} if rows else {}


@dataclasses.dataclass(frozen=True)
class Case:
    label: str
    size: tuple[int, int]
    fresh: bool  # a new image per request; else one image for every request of the case


@dataclasses.dataclass
class Sent:
    """One timed request: its trace and the client's wall-clock times."""
    system: str
    case: str
    trace_id: str
    sent_ns: int
    first_token_ns: int


def streamed_chat(client: httpx.Client, body: dict, trace_id: str) -> tuple[int, int]:
    """(send, first content chunk) in wall-clock ns, the clock the spans carry."""
    headers = {"traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01", "x-request-id": trace_id[:16]}
    sent = time.time_ns()
    first = None
    with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if first is None and line.startswith("data: {") and any(
                    c["delta"].get("content") for c in json.loads(line[6:])["choices"]):
                first = time.time_ns()
    if first is None:
        raise RuntimeError("the stream ended without content")
    return sent, first


def start_ours(args, model: pathlib.Path, logs: pathlib.Path, endpoint: str) -> list[Stage]:
    trace = ["--otlp-traces-endpoint", endpoint]
    stages: list[Stage] = []
    try:
        stages.append(vision_stage(model, free_port(), ["--dtype", args.dtype, *trace], logs / "vision.log"))
        stages[0].wait_ready()
        stages.append(llm_stage(model, stages[:1], free_port(), [*engine_flags(args), *trace], logs / "llm.log"))
        stages[1].wait_ready()
        stages.append(gateway_stage(stages[1:2], "127.0.0.1", free_port(), trace, logs / "gateway.log"))
        stages[2].wait_ready()
        return stages
    except BaseException:
        stop(stages)
        raise


def start_vllm(args, model: pathlib.Path, logs: pathlib.Path, endpoint: str) -> list[Stage]:
    """vLLM's OpenAI server as bench.e2e starts it, traced too (its `llm_request` span per request)."""
    return e2e.start_vllm(args, model, logs, ("--otlp-traces-endpoint", endpoint))


def case_bodies(args, model: pathlib.Path, case: Case, count: int, seed: int) -> list[dict]:
    """`count` bodies of distinct texts; each system gets the same ones."""
    width, height = case.size
    texts = random_texts(model, count, args.input_len, seed)
    images = [photo_like_jpeg(width, height, seed * 1000 + n if case.fresh else 2**31) for n in range(count)]
    return [chat_body(model.name, text, image, args.output_len) for text, image in zip(texts, images)]


def run_requests(args, model: pathlib.Path, urls: dict[str, str]) -> list[Sent]:
    """One request at a time; per case and round both systems get the same body, in an order that flips."""
    sent: list[Sent] = []
    clients = {system: httpx.Client(base_url=url, timeout=600) for system, url in urls.items()}
    for number, case in enumerate(args.cases):
        bodies = case_bodies(args, model, case, args.requests + 1, seed=number + 1)
        for n, body in enumerate(bodies):  # the first warms both systems up for the case
            for system in (list(urls) if n % 2 == 0 else list(urls)[::-1]):
                trace_id = secrets.token_hex(16)
                start, first = streamed_chat(clients[system], body, trace_id)
                if n > 0:
                    sent.append(Sent(system, case.label, trace_id, start, first))
        print(f"{case.label}: done, load average {os.getloadavg()[0]:.1f}", flush=True)
    return sent


def spans_by_trace(collector: TraceCollector, sent: list[Sent], timeout_s: float = 60.0) -> dict[str, list]:
    """Each request's spans, once its last expected span has come (exports go in batches, every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while True:
        traces: dict[str, list] = {}
        for span in collector.spans():
            traces.setdefault(span.trace_id, []).append(span)
        missing = [s for s in sent if not (OUR_SPANS if s.system == OURS else {VLLM_SPAN})
                   <= {span.name for span in traces.get(s.trace_id, ())}]
        if not missing or time.monotonic() > deadline:
            if missing:
                print(f"{len(missing)} of {len(sent)} requests left out: their spans did not all come")
            return traces
        time.sleep(0.5)



def phases_of(request: Sent, traces: dict[str, list]) -> dict[str, float] | None:
    """ms per phase of one timed request; None when its spans did not all come."""
    spans = traces.get(request.trace_id, [])
    if request.system == OURS:
        return our_phases(spans, request.sent_ns, request.first_token_ns) if OUR_SPANS <= {
            s.name for s in spans} else None
    vllm_span = next((s for s in spans if s.name == VLLM_SPAN), None)
    return vllm_phases(vllm_span, request.sent_ns, request.first_token_ns) if vllm_span else None


def phase_table(args, sent: list[Sent], traces: dict[str, list]) -> str:
    ours, theirs = {}, {}
    for case in args.cases:
        for system, by_case in ((OURS, ours), (VLLM, theirs)):
            rows = [phases_of(s, traces) for s in sent if s.system == system and s.case == case.label]
            by_case[case.label] = medians([row for row in rows if row is not None])
    labels = [c.label for c in args.cases]
    rows = [[p.label, p.in_vllm, *(ours[c].get(p.label) for c in labels)] for p in PHASES]
    rows.append([REST, "", *(ours[c].get(REST) for c in labels)])
    rows.append([f"**{OURS}: TTFT**", "", *(ours[c].get("TTFT") for c in labels)])
    rows += [[label, "", *(theirs[c].get(label) for c in labels)] for label in VLLM_PHASES]
    rows.append([f"**{VLLM}: TTFT**", "", *(theirs[c].get("TTFT") for c in labels)])
    rows.append(["**ours / vLLM**", "", *(ratio(ours[c].get("TTFT", 0), theirs[c].get("TTFT", 0)) for c in labels)])
    return markdown_table(["phase (median ms)", "inside vLLM's server", *labels], rows)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.ttft_phases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 timed requests per case and system, not 20")
    parser.add_argument("--requests", type=int, default=None, help="timed requests per case and system")
    parser.add_argument("--image-sizes", type=image_size, nargs="+", default=[(448, 448), (896, 896)],
                        help="WIDTHxHEIGHT of the fresh images, a case each")
    parser.add_argument("--no-repeated", action="store_true", help="leave out the repeated-image case")
    parser.add_argument("--input-len", type=int, default=32, help="random text tokens per request")
    parser.add_argument("--output-len", type=int, default=4, help="generated tokens per request (ignore_eos)")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of both engines and of vision_svc")
    parser.add_argument("--model", type=pathlib.Path, default=None, help="checkpoint (default: the tiny one)")
    parser.add_argument("--work-dir", default=None, help="where the tiny checkpoint and the logs go")
    args = parser.parse_args()
    args.requests = args.requests or (6 if args.quick else 20)
    args.concurrency = [1]  # what bench.e2e's engine flags read
    args.cases = [Case(f"{w}x{h}, fresh", (w, h), True) for w, h in args.image_sizes]
    if not args.no_repeated:
        w, h = args.image_sizes[-1]
        args.cases.append(Case(f"{w}x{h}, repeated", (w, h), False))
    return args


def main() -> int:
    args = parse_args()
    logs, model = stage_runs.prepare(args, "ttft-phases")
    print(f"model {model}, logs in {logs}, load average {os.getloadavg()[0]:.1f}", flush=True)
    collector = TraceCollector()
    endpoint = collector.start()
    servers: dict[str, list[Stage]] = {}
    try:
        servers[OURS] = start_ours(args, model, logs, endpoint)
        servers[VLLM] = start_vllm(args, model, logs, endpoint)
        sent = run_requests(args, model, {system: f"http://{stages[-1].address}" for system, stages in servers.items()})
        traces = spans_by_trace(collector, sent)
    finally:
        for stages in servers.values():
            stop(stages)
        collector.stop()
    print(f"\n{args.requests} requests per case and system, concurrency 1, {args.input_len} random tokens and one "
          f"image in, {args.output_len} out, {args.dtype}\n")
    print(phase_table(args, sent, traces))
    with open(logs / "requests.jsonl", "w") as out:  # each request's phases, for a closer look
        for request in sent:
            out.write(json.dumps({**dataclasses.asdict(request), "phases_ms": phases_of(request, traces)}) + "\n")
    print(f"\neach request's phases: {logs / 'requests.jsonl'}")
    print(f"\nload average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    stage_runs.run(main)
