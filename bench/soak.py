"""Soak: mixed traffic for a long while on one replica of each stage; memory must stay flat and nothing may fail.

    python -m bench.soak                                     # 600 s of traffic, plus ~1 min to start the stages
    python -m bench.soak --duration-s 60 --warm-up-s 20 --json soak.json

Starts vision_svc, llm_svc and the gateway (tiny checkpoint) and sends chat completions at concurrency 8 for
--duration-s (`bench.traffic`: text and image, new and repeated images, streamed and not). Every --sample-s it
reads from /proc the resident memory of each stage's process tree: the stage and everything below it (llm_svc's
engine core and worker, vision_svc's preprocessing workers, each stage's orphan guard). A stage's memory after
the warm-up is the median of the three samples from --warm-up-s on, at the end the median of the last three, both
taken while traffic runs; its growth is the change between the two.

Caches: vision_svc's embedding cache (bytes held against its bound, hits, misses, from its metrics), vLLM's
multimodal processor cache in llm_svc (which keeps the embeddings llm_svc hands the engine: hits) and vLLM's KV
cache (usage, prefix-cache hits). Both embedding caches get small bounds (--cache-bytes 32 MiB, about 40 images
here; --mm-processor-cache-gb 0.05) so that they are full before the warm-up ends and evict for the rest of the
run. With the stages' defaults they would still be filling after ten minutes (vision_svc's 2 GiB; vLLM's 4 GiB,
which grew llm_svc's engine core by about 1.3 MiB/s here), and their filling would read as growth.

Exit status 1 when a stage grew by more than --max-growth-percent, a request failed or hung, or a cache held more
than its bound.
"""

from deploy import fork_safe_grpc  # noqa: F401  (first: before anything imports grpc)

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import statistics
import time

from bench import stage_runs
from bench.common import markdown_table
from bench.stage_probes import scrape_or_empty, tree_resident
from bench.traffic import HUNG, RequestMix, Traffic, latency_summary
from deploy.local import Stage, free_port, gateway_stage, llm_stage, vision_stage

MiB = 1 << 20
HANG_MARGIN_S = 10.0
START_TIMEOUT_S = 300.0
ENGINE_FLAGS = ["--kv-cache-memory-bytes", str(256 * MiB), "--max-model-len", "4096", "--max-num-seqs", "8"]
WINDOW = 3  # samples per median


@dataclasses.dataclass
class StageUnderSoak:
    name: str
    stage: Stage
    metrics_address: str | None
    # (seconds, resident bytes by process label, how many processes)
    samples: list[tuple[float, dict[str, int], int]] = dataclasses.field(default_factory=list)

    def sample(self, at: float) -> None:
        self.samples.append((at, *tree_resident(self.stage.proc.pid)))

    def resident(self, sample, label: str | None = None) -> int:
        return sample[1].get(label, 0) if label else sum(sample[1].values())

    def resident_after(self, moment: float, label: str | None = None) -> float:
        """Median of the WINDOW samples from `moment` on (fewer when the run is short)."""
        later = [s for s in self.samples if s[0] >= moment][:WINDOW] or self.samples[-1:]
        return statistics.median(self.resident(s, label) for s in later)

    def resident_at_end(self, label: str | None = None) -> float:
        return statistics.median(self.resident(s, label) for s in self.samples[-WINDOW:])

    def growth_percent(self, warm_up_s: float) -> float:
        return (self.resident_at_end() / self.resident_after(warm_up_s) - 1) * 100


def start_stages(args, model: pathlib.Path, logs: pathlib.Path, stages: list[StageUnderSoak]) -> None:
    """Appends each stage as it starts, so that the caller stops whatever did start."""
    vision_metrics, llm_metrics = free_port(), free_port()
    vision = vision_stage(model, free_port(), ["--metrics-port", str(vision_metrics), "--cache-bytes",
                                               str(args.cache_bytes), "--grace-s", "2",
                                               *shlex.split(args.vision_args)], logs / "vision.log")
    stages.append(StageUnderSoak("vision_svc", vision, f"127.0.0.1:{vision_metrics}"))
    vision.wait_ready(START_TIMEOUT_S)
    llm = llm_stage(model, [vision], free_port(), [*ENGINE_FLAGS, "--metrics-port", str(llm_metrics), "--grace-s", "2",
                                                   "--mm-processor-cache-gb", str(args.mm_processor_cache_gb),
                                                   *shlex.split(args.llm_args)], logs / "llm.log")
    stages.append(StageUnderSoak("llm_svc", llm, f"127.0.0.1:{llm_metrics}"))
    llm.wait_ready(START_TIMEOUT_S)
    gateway = gateway_stage([llm], "127.0.0.1", free_port(), ["--request-timeout-s", str(args.request_timeout_s),
                                                              "--shutdown-grace-s", "2"], logs / "gateway.log")
    stages.append(StageUnderSoak("gateway", gateway, None))
    gateway.wait_ready(START_TIMEOUT_S)


def metric(samples: dict[str, float], name: str) -> float | None:
    """The sum of every sample called `name`, whatever its labels; None when there is none."""
    values = [v for key, v in samples.items() if key.split("{", 1)[0] == name]
    return sum(values) if values else None


def cache_rows(args, vision: dict[str, float], llm: dict[str, float]) -> list[list]:
    held = metric(vision, "vision_cache_bytes")
    hits, misses = metric(vision, "vision_cache_hits_total"), metric(vision, "vision_cache_misses_total")
    usage = metric(llm, "vllm:kv_cache_usage_perc")
    queries, prefix_hits = metric(llm, "vllm:prefix_cache_queries_total"), metric(llm, "vllm:prefix_cache_hits_total")
    mm_queries, mm_hits = metric(llm, "vllm:mm_cache_queries_total"), metric(llm, "vllm:mm_cache_hits_total")
    return [
        ["vision_svc embedding cache", "-" if held is None else f"{held / MiB:.1f} MiB",
         f"{args.cache_bytes / MiB:.0f} MiB (--cache-bytes)", f"{hits:.0f} hits, {misses:.0f} misses"
         if hits is not None and misses is not None else "-"],
        ["vLLM multimodal processor cache (llm_svc)", "- (no size metric)",
         f"{args.mm_processor_cache_gb:g} GiB (--mm-processor-cache-gb)",
         f"{mm_hits:.0f} hits of {mm_queries:.0f}" if mm_queries is not None and mm_hits is not None else "-"],
        ["vLLM KV cache (llm_svc)", "-" if usage is None else f"{usage:.1%} used", "100%",
         f"prefix cache: {prefix_hits:.0f} of {queries:.0f} tokens hit" if queries else "-"],
    ]


def check(args, stages: list[StageUnderSoak], outcomes, vision: dict[str, float], llm: dict[str, float]
          ) -> list[tuple[str, bool, str]]:
    checks = []
    for s in stages:
        growth = s.growth_percent(args.warm_up_s)
        checks.append((f"{s.name}: memory grows by at most {args.max_growth_percent:g}% after the warm-up",
                       growth <= args.max_growth_percent, f"{growth:+.1f}%"))
    failed = [o for o in outcomes if not o.ok]
    checks.append(("no request failed or hung", not failed, f"{len(failed)} of {len(outcomes)}" + "".join(
        f"; {o.request_id}: {o.result}: {o.message[:80]}" for o in failed[:3])))
    held = metric(vision, "vision_cache_bytes")
    checks.append(("the embedding cache holds at most its bound", held is not None and held <= args.cache_bytes,
                   "no metric" if held is None else f"{held / MiB:.1f} of {args.cache_bytes / MiB:.0f} MiB"))
    usage = metric(llm, "vllm:kv_cache_usage_perc")
    checks.append(("the KV cache holds at most its size", usage is None or usage <= 1.0,
                   "no metric" if usage is None else f"{usage:.1%}"))
    return checks


def report(args, stages: list[StageUnderSoak], outcomes, seconds: float, caches: list[list], checks) -> str:
    memory = [[s.name, s.samples[-1][2], s.resident_after(args.warm_up_s) / MiB, s.resident_at_end() / MiB,
               f"{s.growth_percent(args.warm_up_s):+.1f}%", max(s.resident(x) for x in s.samples) / MiB]
              for s in stages]
    processes = [[s.name, label, s.resident_after(args.warm_up_s, label) / MiB, s.resident_at_end(label) / MiB,
                  f"{(s.resident_at_end(label) - s.resident_after(args.warm_up_s, label)) / MiB:+.1f}"]
                 for s in stages for label in s.samples[-1][1]]
    p50, longest = latency_summary(outcomes)
    failed = [o for o in outcomes if not o.ok]
    kinds = sorted({o.result for o in failed})
    return "\n".join([
        f"{seconds:.0f} s of traffic at concurrency {args.concurrency}, {args.max_tokens} tokens out each; memory "
        f"sampled every {args.sample_s:g} s, warm-up {args.warm_up_s:g} s",
        "", markdown_table(["stage", "processes", "MiB after warm-up", "MiB at the end", "growth", "MiB at most"],
                           memory),
        "", markdown_table(["stage", "process", "MiB after warm-up", "MiB at the end", "change MiB"], processes),
        "", markdown_table(["requests", "completed", "failed", "hung", "req/s", "p50 s", "max s", "failures"],
                           [[len(outcomes), len(outcomes) - len(failed), len(failed),
                             sum(o.result == HUNG for o in outcomes), len(outcomes) / seconds, p50, longest,
                             ", ".join(kinds) or "-"]]),
        "", markdown_table(["cache", "at the end", "bound", "use"], caches),
        "", markdown_table(["expected", "holds", "seen"], [[c, "yes" if ok else "**NO**", d] for c, ok, d in checks]),
    ])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration-s", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--warm-up-s", type=float, default=60.0,
                        help="memory is compared from this point on (caches full, every code path run)")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--max-growth-percent", type=float, default=5.0, help="largest growth that passes")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request (ignore_eos)")
    parser.add_argument("--cache-bytes", type=int, default=32 * MiB, help="vision_svc's --cache-bytes")
    parser.add_argument("--mm-processor-cache-gb", type=float, default=0.05,
                        help="llm_svc's (vLLM's) --mm-processor-cache-gb: the engine's cache of the embeddings it "
                             "was given")
    parser.add_argument("--request-timeout-s", type=float, default=60.0, help="the gateway's --request-timeout-s")
    parser.add_argument("--vision-args", default="", help="more flags for vision_svc, one quoted string")
    parser.add_argument("--llm-args", default="", help="more flags for llm_svc (vLLM engine flags), one string")
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="checkpoint directory (default: build the tiny checkpoint, original layout)")
    parser.add_argument("--work-dir", default=None, help="where the tiny checkpoint and the logs go")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here, as JSON")
    args = parser.parse_args(argv)
    if args.warm_up_s >= args.duration_s:
        parser.error("--warm-up-s must be shorter than --duration-s")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs, model = stage_runs.prepare(args, "soak")
    stages: list[StageUnderSoak] = []
    traffic = None
    try:
        start_stages(args, model, logs, stages)
        print(f"stages ready; logs in {logs}", flush=True)
        traffic = Traffic(f"http://{stages[-1].stage.address}", RequestMix(model.resolve().name, args.max_tokens),
                          args.concurrency, args.request_timeout_s + HANG_MARGIN_S, "soak").start()
        while (now := traffic.now()) < args.duration_s:
            for s in stages:
                s.sample(now)
            print(f"{now:6.0f} s  {len(traffic.outcomes)} requests, "
                  + ", ".join(f"{s.name} {s.resident(s.samples[-1]) / MiB:.0f} MiB" for s in stages)
                  + f", load average {os.getloadavg()[0]:.1f}", flush=True)
            time.sleep(min(args.sample_s, max(0.0, args.duration_s - traffic.now())))
        for s in stages:
            s.sample(traffic.now())
        vision, llm = (scrape_or_empty(s.metrics_address) for s in stages[:2])
        seconds = traffic.now()
        traffic.stop()
    finally:
        if traffic is not None:
            traffic.stop(wait=False)
        for s in reversed(stages):
            s.stage.stop(15)
        if traffic is not None:
            traffic.stop()
    checks = check(args, stages, traffic.outcomes, vision, llm)
    print("\n" + report(args, stages, traffic.outcomes, seconds, cache_rows(args, vision, llm), checks))
    if args.json:
        args.json.write_text(json.dumps({
            "memory": {s.name: s.samples for s in stages},
            "outcomes": [dataclasses.asdict(o) for o in traffic.outcomes],
            "checks": [{"expected": c, "holds": ok, "seen": d} for c, ok, d in checks]}, indent=1))
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    stage_runs.run(main)
