"""What llm_svc picks on vLLM's CPU backend for the engine flags a user leaves out.

vLLM's defaults are made for accelerators. On a CPU they reserve `--gpu-memory-utilization` (0.92) of the
memory node for the engine and refuse to start when that much is not free, compile the model for most of a
minute, and bind each rank's OpenMP threads to a NUMA node of its own, which a one-node machine does not
have for a second rank. Each pick below is made only for a flag the user did not give, and comes with one
log line that names the flag that changes it. The choice functions are pure; `read_cpu_machine` reads
their inputs.

Layouts that vLLM's CPU backend cannot serve are refused at start. Experts split over ranks
(`--enable-expert-parallel`): vLLM's CPU MoE kernel (`cpu_fused_moe`, called by `CPUUnquantizedExperts.apply`)
takes no expert map, so a rank that holds half of the experts indexes its weights with the global ids of all
of them and dies with SIGSEGV. Data parallelism (`--data-parallel-size`): the MoE layers of each rank gather
the tokens of all ranks with `all_gatherv`, which `CpuCommunicator` does not implement (NotImplementedError).
Ray (`--distributed-executor-backend ray`): vLLM's CPU platform names no Ray resource for its workers.
"""

import dataclasses
import logging
import os
import pathlib
from collections.abc import Mapping

from vllm.engine.arg_utils import AsyncEngineArgs

MiB, GiB = 1 << 20, 1 << 30

# A quarter of the free memory: the weights, the vision stage (deploy.local runs it on the same machine) and
# the rest of the host need the other three quarters. At least 256 MiB: 2,300 tokens of InternVL3.5-1B's
# language model (112 KiB a token in bf16), 260,000 of the tiny test models'. At most 16 GiB (116,000 tokens
# of an 8B Qwen3), beyond which a CPU's decode speed, not its cache, limits how many sequences it serves.
KV_CACHE_FRACTION = 4
KV_CACHE_MIN = 256 * MiB
KV_CACHE_MAX = 16 * GiB
THREADS_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
# vLLM's legacy KV cache size, GiB: it overrides --kv-cache-memory-bytes, so it is the user's choice too.
KV_CACHE_ENV = "VLLM_CPU_KVCACHE_SPACE"
# Options whose presence means the user chose the KV cache size, or whether to compile.
KV_CACHE_OPTIONS = {"kv_cache_memory_bytes", "gpu_memory_utilization"}
COMPILE_OPTIONS = {"enforce_eager", "compilation_config", "optimization_level"}
# oneDNN keeps each matmul primitive it builds, one per (layer shape, number of tokens), up to 1024 of them, and
# on a CPU a primitive holds up to megabytes: prefills of ever new lengths grew vLLM's worker by 10% in a
# 10-minute soak (bench/RESULTS.md). Decoding reuses one per layer shape and batch size, so 8 per sequence slot
# keeps it fast (a primitive rebuilt costs milliseconds) and bounds the memory; with vLLM's default slots
# (128 per rank) that is oneDNN's own 1024.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
ONEDNN_CACHE_PER_SEQUENCE = 8
ONEDNN_CACHE_DEFAULT = 1024
# protos.malloc fixes glibc's mmap threshold at 128 KiB for llm_svc's own process, and its environment passes that
# on to vLLM's engine processes (started with spawn on a CPU). There the model computes in host memory: every
# activation over 128 KiB (a 1,500-token prefill's are megabytes) is then mapped, zero-filled page by page and
# unmapped again, layer after layer: a 1,650-token text prefill of the tiny checkpoint took 1.6x as long as in
# vLLM's own server (125 ms, not 78 ms; vLLM's server given the same variable: 149 ms, not 102 ms). Left out of the
# engine's environment, glibc's adaptive threshold keeps such blocks in its heap. Its two arenas cost nothing
# measured there, and stay.
MMAP_THRESHOLD_ENV = "MALLOC_MMAP_THRESHOLD_"


@dataclasses.dataclass(frozen=True)
class CpuMachine:
    available_memory: int  # bytes free on the memory node that vLLM's CPU worker allocates from
    memory_node: int
    cpus: tuple[int, ...]  # the CPUs this process may run on
    env: Mapping[str, str]  # as the user started llm_svc, without what llm_svc has set since


@dataclasses.dataclass(frozen=True)
class CpuDefaults:
    """The picks: engine arguments to set, environment for vLLM's workers (and what to leave out of it), one log
    line each."""
    engine_args: dict[str, object]
    env: dict[str, str]
    notes: tuple[str, ...]
    env_removed: tuple[str, ...] = ()

    def apply(self, log: logging.Logger, environ=os.environ) -> None:
        """Once logging is configured, before the engine starts: its worker processes inherit the environment."""
        environ.update(self.env)
        for name in self.env_removed:
            environ.pop(name, None)
        for note in self.notes:
            log.info("%s", note)


def read_cpu_machine() -> CpuMachine:
    # The figure vLLM's CPUWorker checks the KV cache size against: its NUMA node's free memory, within the
    # cgroup's limit. It can be far below psutil's whole-machine figure (6-10 GiB here, against 23 GiB).
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    node = get_allowed_cpu_list()[0].numa_node
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    return CpuMachine(get_memory_node_info(node).available_memory, node, tuple(sorted(cpus)), started_environment())


def started_environment() -> dict[str, str]:
    """The environment this process was started with: /proc keeps it as exec gave it, whatever the process has set
    since (protos.malloc's settings among them). os.environ where there is no /proc."""
    try:
        raw = pathlib.Path("/proc/self/environ").read_bytes()
    except OSError:
        return dict(os.environ)
    pairs = (entry.split("=", 1) for entry in os.fsdecode(raw).split("\0") if "=" in entry)
    return {name: value for name, value in pairs}


def kv_cache_bytes(available_memory: int, ranks: int) -> int:
    """Per worker: each CPU rank allocates its own `--kv-cache-memory-bytes`."""
    share = available_memory // KV_CACHE_FRACTION // ranks
    return min(max(share, KV_CACHE_MIN), KV_CACHE_MAX) // MiB * MiB


def threads_bind(cpus: tuple[int, ...], ranks: int) -> str:
    """One contiguous group of CPUs per rank, `|`-separated as VLLM_CPU_OMP_THREADS_BIND wants: `0-3|4-7`."""
    if len(cpus) < ranks:
        raise ValueError(f"{ranks} CPU workers (tensor x pipeline parallel size) need at least {ranks} CPUs, "
                         f"and this process may run on {len(cpus)}; bind them yourself with {THREADS_BIND_ENV}")
    per_rank, extra = divmod(len(cpus), ranks)
    groups, start = [], 0
    for rank in range(ranks):
        end = start + per_rank + (rank < extra)
        groups.append(_id_list(cpus[start:end]))
        start = end
    return "|".join(groups)


def _id_list(ids: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> '0-2,5'."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def check_parallel_layout(engine_args: AsyncEngineArgs) -> None:
    """ValueError for a layout that vLLM's CPU backend cannot serve. Checked when llm_svc starts on a CPU, not
    when its flags are parsed: parsing also reads the command lines of accelerator deployments."""
    engines = engine_args.data_parallel_size
    if engines > 1:
        raise ValueError(
            f"--data-parallel-size {engines} does not run on a CPU: an MoE model's layers gather the tokens of every "
            "data parallel rank (all_gatherv), which vLLM's CPU communicator does not implement, and a dense model's "
            f"data parallel ranks are independent engines. Start {engines} llm_svc replicas instead: the gateway "
            "balances over them")
    if engine_args.distributed_executor_backend == "ray":
        raise ValueError(
            "--distributed-executor-backend ray does not run on a CPU: vLLM's Ray executor places its workers on an "
            "accelerator resource, which vLLM's CPU platform does not name ('current platform cpu does not support "
            "ray'). Leave it out: the ranks then run as processes of this machine")
    # vLLM's expert parallel size, with data parallelism refused above.
    experts_over = engine_args.tensor_parallel_size * engine_args.prefill_context_parallel_size
    if engine_args.enable_expert_parallel and experts_over > 1:
        raise ValueError(
            f"--enable-expert-parallel over {experts_over} ranks does not run on a CPU: vLLM's CPU MoE kernel takes "
            "no expert map, so a rank holding part of the experts dies (SIGSEGV) on the first token. Leave it out: "
            "--tensor-parallel-size then splits every expert over the ranks")


def pick_cpu_defaults(engine_args: AsyncEngineArgs, given: set[str], machine: CpuMachine) -> CpuDefaults:
    """`given`: the option dests on the command line. ValueError when the ranks cannot be bound."""
    picked, env, notes = {}, {}, []
    ranks = engine_args.tensor_parallel_size * engine_args.pipeline_parallel_size
    if not given & KV_CACHE_OPTIONS and not machine.env.get(KV_CACHE_ENV):
        picked["kv_cache_memory_bytes"] = size = kv_cache_bytes(machine.available_memory, ranks)
        per_rank, split = (" per rank", f", split over {ranks} ranks") if ranks > 1 else ("", "")
        notes.append(f"CPU: KV cache {size / GiB:.1f} GiB{per_rank} (1/{KV_CACHE_FRACTION} of "
                     f"{machine.available_memory / GiB:.1f} GiB available on memory node {machine.memory_node}"
                     f"{split}, within {KV_CACHE_MIN // MiB} MiB..{KV_CACHE_MAX // GiB} GiB; "
                     f"--kv-cache-memory-bytes to change)")
    if "max_model_len" not in given:
        # vLLM's own fit (-1, 'auto'): the model's context length, or the longest one sequence the KV cache holds.
        picked["max_model_len"] = -1
        notes.append("CPU: max model len auto: the model's own, or the longest the KV cache holds for one "
                     "sequence (--max-model-len to change)")
    if not given & COMPILE_OPTIONS:
        # Measured on the tiny checkpoints, 2 cores: compiling makes a first start 2.5x as long (74 s, not
        # 28 s; 36 s once cached) and decodes 1.2-1.5x faster. The quick start is the default, compiling a flag.
        picked["enforce_eager"] = True
        notes.append("CPU: eager mode, the model is not compiled (--no-enforce-eager to compile: a slower "
                     "start, a faster decode)")
    local = engine_args.distributed_executor_backend in (None, "mp") and engine_args.nnodes == 1
    if ranks > 1 and local and THREADS_BIND_ENV not in machine.env:
        # vLLM's own binding ('auto') wants a NUMA node per rank.
        env[THREADS_BIND_ENV] = bind = threads_bind(machine.cpus, ranks)
        notes.append(f"CPU: OpenMP threads of {ranks} ranks bound to CPUs {bind} ({THREADS_BIND_ENV} to change)")
    seqs = engine_args.max_num_seqs
    if seqs and ONEDNN_CACHE_PER_SEQUENCE * seqs < ONEDNN_CACHE_DEFAULT and ONEDNN_CACHE_ENV not in machine.env:
        env[ONEDNN_CACHE_ENV] = capacity = str(ONEDNN_CACHE_PER_SEQUENCE * seqs)
        notes.append(f"CPU: oneDNN keeps {capacity} matmul primitives ({ONEDNN_CACHE_PER_SEQUENCE} per sequence of "
                     f"--max-num-seqs {seqs}; {ONEDNN_CACHE_ENV} to change)")
    removed = []
    if MMAP_THRESHOLD_ENV not in machine.env:
        removed.append(MMAP_THRESHOLD_ENV)
        notes.append(f"CPU: the engine's processes keep glibc's adaptive mmap threshold, not this process's fixed one "
                     f"({MMAP_THRESHOLD_ENV} to fix one for them too)")
    return CpuDefaults(picked, env, tuple(notes), tuple(removed))
