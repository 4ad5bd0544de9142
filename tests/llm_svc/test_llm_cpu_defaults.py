"""What llm_svc picks on vLLM's CPU backend for flags the user leaves out. The bare command serving with these picks
is `make serve`'s llm_svc (no KV cache size, context length, eager flag or thread binding):
tests/deploy/test_deploy_local.py::test_the_bare_llm_svc_of_make_serve_serves_the_model_s_own_context. Two ranks'
thread binding is checked where two ranks run anyway: test_llm_tensor_parallel.py."""

import logging
import os
import re
import types

import pytest

import llm_svc.config
from llm_svc.config import given_options, parse_config
from llm_svc.cpu_defaults import (GiB, MiB, CpuMachine, check_parallel_layout, kv_cache_bytes, started_environment,
                                  threads_bind)

BARE = ["--model", "m", "--vision", "h:1"]


@pytest.mark.parametrize("available, ranks, expected", [
    (6 * GiB, 1, 1536 * MiB),      # a quarter
    (6 * GiB, 2, 768 * MiB),       # the quarter shared by the ranks, each allocating its own
    (512 * MiB, 1, 256 * MiB),     # at least 256 MiB
    (128 * GiB, 1, 16 * GiB),      # at most 16 GiB
    (3 * GiB + 12345, 1, 768 * MiB),  # whole MiB
])
def test_kv_cache_is_a_quarter_of_the_free_memory_clamped(available, ranks, expected):
    assert kv_cache_bytes(available, ranks) == expected


@pytest.mark.parametrize("cpus, ranks, expected", [
    ((0, 1), 2, "0|1"),
    (tuple(range(8)), 2, "0-3|4-7"),
    (tuple(range(8)), 4, "0-1|2-3|4-5|6-7"),
    (tuple(range(5)), 2, "0-2|3-4"),
    ((0, 2, 4, 6), 2, "0,2|4,6"),
    ((0, 1, 2, 3, 8, 9, 10, 11), 2, "0-3|8-11"),
    ((4, 5, 6), 1, "4-6"),
])
def test_threads_bind_gives_each_rank_a_contiguous_group(cpus, ranks, expected):
    assert threads_bind(cpus, ranks) == expected


def test_threads_bind_refuses_fewer_cpus_than_ranks():
    with pytest.raises(ValueError, match="3 CPU workers .* need at least 3 CPUs, and this process may run on 2"):
        threads_bind((0, 1), 3)


@pytest.mark.parametrize("argv, dest", [
    (["--kv-cache-memory-bytes", "1"], "kv_cache_memory_bytes"),
    (["--kv-cache-memory-bytes=1"], "kv_cache_memory_bytes"),
    (["--kv_cache_memory_bytes", "1"], "kv_cache_memory_bytes"),
    (["--kv_cache_memory_bytes=1"], "kv_cache_memory_bytes"),
    (["--max-model-len", "4k"], "max_model_len"),
    (["--enforce-eager"], "enforce_eager"),
    (["--no-enforce-eager"], "enforce_eager"),
    (["-O0"], "optimization_level"),
    (["-cc.mode=none"], "compilation_config"),
    (["-tp", "2"], "tensor_parallel_size"),
])
def test_given_options_sees_every_spelling(argv, dest):
    assert given_options(BARE + argv) == {"model", "vision", dest}


def test_given_options_sees_no_default():
    assert given_options(BARE) == {"model", "vision"}


def machine(cpus=(0, 1), env=None) -> CpuMachine:
    return CpuMachine(available_memory=6 * GiB, memory_node=0, cpus=cpus, env=env or {})


def parse_on(monkeypatch, argv, platform_is_cpu=True, **machine_args):
    monkeypatch.setattr(llm_svc.config, "current_platform", types.SimpleNamespace(is_cpu=lambda: platform_is_cpu))
    monkeypatch.setattr(llm_svc.config, "read_cpu_machine", lambda: machine(**machine_args))
    return parse_config(BARE + argv)


@pytest.mark.parametrize("argv, env, kv, max_model_len, eager", [
    ([], {}, 1536 * MiB, -1, True),
    (["--kv-cache-memory-bytes", str(GiB)], {}, GiB, -1, True),
    (["--kv_cache_memory_bytes=1024"], {}, 1024, -1, True),
    (["--gpu-memory-utilization", "0.5"], {}, None, -1, True),
    ([], {"VLLM_CPU_KVCACHE_SPACE": "2"}, None, -1, True),
    (["--max-model-len", "8192"], {}, 1536 * MiB, 8192, True),
    (["--max_model_len=8k"], {}, 1536 * MiB, 8000, True),
    (["--enforce-eager"], {}, 1536 * MiB, -1, True),
    (["--no-enforce-eager"], {}, 1536 * MiB, -1, False),
    (["-O0"], {}, 1536 * MiB, -1, False),
    (["-tp", "2"], {}, 768 * MiB, -1, True),
])
def test_cpu_picks_only_what_the_user_left_out(monkeypatch, argv, env, kv, max_model_len, eager):
    _, engine_args = parse_on(monkeypatch, argv, env=env)
    assert (engine_args.kv_cache_memory_bytes, engine_args.max_model_len, engine_args.enforce_eager) == (
        kv, max_model_len, eager)


@pytest.mark.parametrize("argv, cpus, env, bind", [
    (["-tp", "2"], (0, 1), {}, "0|1"),
    (["--tensor-parallel-size=2", "--pipeline_parallel_size=2"], tuple(range(8)), {}, "0-1|2-3|4-5|6-7"),
    (["-tp", "2"], (0, 1), {"VLLM_CPU_OMP_THREADS_BIND": "1|0"}, None),
    (["-tp", "2", "--distributed-executor-backend", "ray"], (0, 1), {}, None),  # Ray places the ranks
    ([], (0, 1), {}, None),
])
def test_cpu_binds_the_threads_of_several_ranks(monkeypatch, argv, cpus, env, bind):
    config, _ = parse_on(monkeypatch, argv, cpus=cpus, env=env)
    assert config.cpu_defaults.env == ({"VLLM_CPU_OMP_THREADS_BIND": bind} if bind else {})


@pytest.mark.parametrize("argv, env, capacity", [
    (["--max-num-seqs", "8"], {}, "64"),
    (["--max-num-seqs", "8"], {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "512"}, None),  # the user's own
    (["--max-num-seqs", "128"], {}, None),  # 8 per sequence is oneDNN's own default
    ([], {}, None),  # vLLM's default slots: the same
])
def test_cpu_bounds_onednn_primitives_by_the_sequence_slots(monkeypatch, argv, env, capacity):
    config, _ = parse_on(monkeypatch, argv, env=env)
    assert config.cpu_defaults.env.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY") == capacity


def test_cpu_refuses_more_ranks_than_cpus(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        parse_on(monkeypatch, ["-tp", "4"], cpus=(0, 1))
    assert "4 CPU workers" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    # vLLM's CPU MoE kernel takes no expert map: a worker holding part of the experts would die with SIGSEGV.
    (["-tp", "2", "--enable-expert-parallel"], "--enable-expert-parallel over 2 ranks does not run on a CPU"),
    (["-tp", "4", "-ep"], "--enable-expert-parallel over 4 ranks does not run on a CPU"),
    # vLLM's CPU communicator has no all_gatherv, with which MoE layers gather the tokens of all ranks.
    (["--data-parallel-size", "2"], "--data-parallel-size 2 does not run on a CPU"),
    (["--data-parallel-size", "2", "--enable-expert-parallel"], "Start 2 llm_svc replicas instead"),
    # vLLM's CPU platform names no Ray resource to place workers on.
    (["-pp", "2", "--distributed-executor-backend", "ray"], "--distributed-executor-backend ray does not run on a CPU"),
])
def test_layouts_vllm_cannot_serve_on_a_cpu_are_refused(monkeypatch, argv, message):
    _, engine_args = parse_on(monkeypatch, argv, cpus=(0, 1, 2, 3))
    with pytest.raises(ValueError, match=re.escape(message)):
        check_parallel_layout(engine_args)


@pytest.mark.parametrize("argv", [[], ["--enable-expert-parallel"], ["-tp", "2"], ["-pp", "2"]])
def test_other_layouts_are_left_to_vllm(monkeypatch, argv):
    _, engine_args = parse_on(monkeypatch, argv)
    check_parallel_layout(engine_args)


def test_no_picks_off_the_cpu(monkeypatch):
    config, engine_args = parse_on(monkeypatch, ["-tp", "4"], platform_is_cpu=False)
    assert config.cpu_defaults is None
    assert (engine_args.kv_cache_memory_bytes, engine_args.max_model_len, engine_args.enforce_eager) == (
        None, None, False)


def test_apply_exports_the_environment_and_logs_each_pick_with_its_flag(monkeypatch, caplog):
    config, _ = parse_on(monkeypatch, ["-tp", "2"])
    environ = {}
    with caplog.at_level(logging.INFO):
        config.cpu_defaults.apply(logging.getLogger("llm_svc"), environ)
    assert environ == {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
    assert [r.getMessage() for r in caplog.records] == [
        "CPU: KV cache 0.8 GiB per rank (1/4 of 6.0 GiB available on memory node 0, split over 2 ranks, "
        "within 256 MiB..16 GiB; --kv-cache-memory-bytes to change)",
        "CPU: max model len auto: the model's own, or the longest the KV cache holds for one sequence "
        "(--max-model-len to change)",
        "CPU: eager mode, the model is not compiled (--no-enforce-eager to compile: a slower start, a faster "
        "decode)",
        "CPU: OpenMP threads of 2 ranks bound to CPUs 0|1 (VLLM_CPU_OMP_THREADS_BIND to change)",
        "CPU: the engine's processes keep glibc's adaptive mmap threshold, not this process's fixed one "
        "(MALLOC_MMAP_THRESHOLD_ to fix one for them too)"]


FIXED_BY_LLM_SVC = {"MALLOC_ARENA_MAX": "2", "MALLOC_MMAP_THRESHOLD_": "131072"}  # protos.malloc's, in its env


@pytest.mark.parametrize("started_with, engine_env", [
    ({}, {"MALLOC_ARENA_MAX": "2"}),
    ({"MALLOC_MMAP_THRESHOLD_": "131072"}, FIXED_BY_LLM_SVC),  # the user's own
])
def test_the_engine_gets_glibc_s_adaptive_mmap_threshold_unless_the_user_fixed_one(monkeypatch, started_with,
                                                                                    engine_env):
    # A fixed 128 KiB maps and unmaps every activation of a prefill in the engine's workers.
    config, _ = parse_on(monkeypatch, [], env=started_with)
    environ = dict(FIXED_BY_LLM_SVC)
    config.cpu_defaults.apply(logging.getLogger("llm_svc"), environ)
    assert environ == engine_env


def test_the_started_environment_leaves_out_what_the_process_set_since(monkeypatch):
    monkeypatch.setenv("LLM_SVC_SET_SINCE_START", "1")  # as protos.malloc sets its variables
    started = started_environment()
    assert "LLM_SVC_SET_SINCE_START" not in started and started.get("PATH") == os.environ.get("PATH")
