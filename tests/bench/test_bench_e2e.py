"""The benchmarks' own arithmetic and command lines; the runs themselves are in bench/RESULTS.md."""

import io
import math
import os
import subprocess
import sys
import types

import pytest
from PIL import Image

from bench.common import markdown_table, photo_like_jpeg, ratio
from bench.e2e import (RequestTiming, Summary, chat_body, parse_args, per_request_ms, sized_for, stage_cpu_s,
                       stage_cpu_table, timings_of, vllm_bench_argv)
from vision_svc.tiling import TileOptions, tile_count


def test_summary_follows_vllm_definitions():
    timings = [RequestTiming(ttft_s=0.1, e2e_s=0.1 + 31 * 0.01, prompt_tokens=200, output_tokens=32),
               RequestTiming(ttft_s=0.3, e2e_s=0.3 + 31 * 0.02, prompt_tokens=210, output_tokens=32)]
    summary = Summary.of(timings, seconds=2.0)
    assert summary.requests_per_s == 1.0
    assert summary.output_tokens_per_s == 32.0
    assert summary.ttft_p50_ms == pytest.approx(200.0)
    # TPOT excludes the first token: (e2e - ttft) / (tokens - 1), the median over requests.
    assert summary.tpot_p50_ms == pytest.approx(15.0)
    assert summary.prompt_tokens == 205
    assert math.isnan(summary.cpu_ms) and Summary.of(timings, 2.0, cpu_ms=12.5).cpu_ms == 12.5


# A stage's root that does nothing itself, and its child, which uses 0.3 s of CPU, says so, and waits.
BUSY_CHILD = ("import time; t = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
              "print(flush=True); input()")
IDLE_ROOT = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {BUSY_CHILD!r}])"


def test_a_stages_cpu_is_its_whole_process_tree():
    root = subprocess.Popen([sys.executable, "-c", IDLE_ROOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        root.stdout.readline()  # the child has used its 0.3 s
        used = stage_cpu_s([types.SimpleNamespace(name="stage", proc=root)])
        assert used.keys() == {"stage"} and used["stage"] >= 0.3
    finally:
        root.stdin.close()  # the child's input() ends, and with it the root
        root.wait(10)
        root.stdout.close()


def test_cpu_a_request_is_nan_without_requests_and_tabled_by_stage():
    assert per_request_ms(0.5, 100) == 5.0 and math.isnan(per_request_ms(0.0, 0))
    table = stage_cpu_table({"text": {"gateway": 2.0, "llm_svc": 30.25, "vllm": 40.0}})
    assert "| text | gateway 2.0, llm_svc 30.2, vllm 40.0 |" in table


def test_images_are_distinct_per_seed_and_tile_as_internvl_does():
    first, second = photo_like_jpeg(1280, 720, seed=1), photo_like_jpeg(1280, 720, seed=2)
    assert first != second
    assert Image.open(io.BytesIO(first)).size == (1280, 720)
    # 16:9 ties between the 2x1 and 4x2 grids; InternVL takes the larger grid for a large image: 8 + thumbnail.
    assert tile_count(1280, 720, TileOptions(max_tiles=12, use_thumbnail=True)) == 9


def test_chat_body_puts_the_image_before_the_text_and_fixes_the_output_length():
    body = chat_body("tiny", "hello", b"jpeg", output_len=32)
    image, text = body["messages"][0]["content"]
    assert image["image_url"]["url"].startswith("data:image/jpeg;base64,") and text == {"type": "text", "text": "hello"}
    assert body["max_tokens"] == 32 and body["ignore_eos"] and body["stream_options"] == {"include_usage": True}


def test_vllm_bench_command_parses_with_vllm_own_parser(tmp_path):
    environ = dict(os.environ)
    try:
        from vllm.benchmarks import serve
        from vllm.utils.argparse_utils import FlexibleArgumentParser
    finally:  # importing it sets LD_LIBRARY_PATH (opencv), which breaks vLLM servers started later
        os.environ.clear()
        os.environ.update(environ)

    class Args:
        image_size, input_len, output_len = (1280, 720), 200, 32
    parser = FlexibleArgumentParser()
    serve.add_cli_args(parser)
    args = parser.parse_args(vllm_bench_argv("http://127.0.0.1:1", tmp_path, "random-mm", Args, concurrency=4,
                                             requests=6, seed=3, warm_up=0))
    assert args.backend == "openai-chat" and args.endpoint == "/v1/chat/completions"
    assert args.random_mm_bucket_config == {(720, 1280, 1): 1.0}  # (height, width, frames)
    assert args.random_mm_limit_mm_per_prompt == {"image": 1, "video": 0}
    assert args.ignore_eos and args.num_prompts == 6 and args.max_concurrency == 4
    assert args.seed == 3 and args.num_warmups == 0 and args.save_detailed and not args.save_result
    assert args.trust_remote_code  # the tiny checkpoint's config names its own code, as vLLM's server is told


def test_a_vllm_bench_run_counts_only_the_requests_that_succeeded():
    result = {"duration": 2.0, "ttfts": [0.1, 0.0, 0.3], "latencies": [1.0, 0.0, 2.0], "input_lens": [200, 200, 200],
              "output_lens": [32, 0, 32], "errors": ["", "HTTP 400", ""]}
    assert timings_of(result) == [RequestTiming(0.1, 1.0, 200, 32), RequestTiming(0.3, 2.0, 200, 32)]


def sizes(monkeypatch, *argv: str) -> dict[str, tuple[int, int]]:
    monkeypatch.setattr("sys.argv", ["bench.e2e", *argv])
    args = parse_args()
    parts = {part: sized_for(args, part) for part in ("compare", "vllm-bench")}
    return {part: (sized.requests, sized.rounds) for part, sized in parts.items()}


def test_each_part_has_its_own_default_size_and_the_command_line_sets_both(monkeypatch):
    assert sizes(monkeypatch) == {"compare": (48, 4), "vllm-bench": (768, 8)}
    assert sizes(monkeypatch, "--quick") == {"compare": (12, 2), "vllm-bench": (96, 2)}
    assert sizes(monkeypatch, "--requests", "64", "--rounds", "2") == {"compare": (64, 2), "vllm-bench": (64, 2)}
    assert sizes(monkeypatch, "--parts", "compare", "--rounds", "6") == {"compare": (48, 6), "vllm-bench": (768, 6)}
    with pytest.raises(SystemExit):  # 768 requests do not split into 5 rounds
        sizes(monkeypatch, "--parts", "vllm-bench", "--rounds", "5")


def test_tables_and_ratios():
    assert ratio(3.0, 2.0) == "1.50x" and ratio(1.0, 0.0) == "-"
    assert markdown_table(["a", "b"], [["x", 1234.5], ["y", 0.01234]]).splitlines() == [
        "| a | b |", "|---|---|", "| x | 1234 |", "| y | 0.0123 |"]
