"""Accuracy check: lm_eval, unchanged, against this stack's gateway and against vLLM's own OpenAI server.

    python -m bench.accuracy                                   # 5 to 10 minutes on 2 cores (tiny checkpoint)
    python -m bench.accuracy --mmmu-samples 8 --arc-samples 8 --max-gen-toks 32
    python -m bench.accuracy --model /models/InternVL3_5-1B    # a real checkpoint on both servers

Both systems serve the same checkpoint on this machine with the same engine flags in fp32 (gateway -> llm_svc ->
vision_svc, and vLLM's monolithic server). Two tasks, each on a small data set built here in the format of a
task lm_eval ships (`bench.accuracy_data`), registered from bench/accuracy_tasks with `--include_path`:
- `mmmu_tiny`: lm_eval's mmmu_val (its prompt, image handling and scoring) through `local-chat-completions
  --apply_chat_template`: each question a chat with its images as base64 PNG data URLs;
- `arc_tiny`: arc_easy's likelihood multiple choice through `local-completions`: token-id prompts with `echo`
  and `logprobs`, several prompts per request.
Each runs as the `lm_eval` command, once per server. Reported: both scores, the samples whose answers are the
same (text, or log-likelihood of every choice), the samples scored the same, and each run's wall time.
Exit status 1 when any sample differs.
"""

from deploy import fork_safe_grpc  # noqa: F401  (first: before anything imports grpc)

import argparse
import os
import pathlib
import shlex
import time

import datasets

from bench import accuracy_data, stage_runs
from bench.common import markdown_table
from bench.lm_eval_runs import CHAT_TASK, LIKELIHOOD_TASK, Options, Server, TaskRun, agreement, lm_eval_argv, run_task
from deploy.local import Stage, free_port, gateway_stage, llm_stage, vision_stage

SYSTEMS = ("DvD (gateway)", "vLLM monolithic")
ENGINE_FLAGS = ["--kv-cache-memory-bytes", str(512 << 20), "--max-model-len", "8192", "--enforce-eager",
                "--dtype", "float32", "--max-num-seqs", "8"]
START_TIMEOUT_S = 600.0


def started(stage: Stage, stages: list[Stage]) -> Stage:
    """`stage` once ready; it joins `stages` (which the caller stops) before the wait, so a failed start stops too."""
    stages.append(stage)
    return stage.wait_ready(START_TIMEOUT_S)


def start_ours(model: pathlib.Path, name: str, logs: pathlib.Path, stages: list[Stage]) -> Stage:
    vision = started(vision_stage(model, free_port(), ["--dtype", "float32", "--grace-s", "2"], logs / "vision.log"),
                     stages)
    llm = started(llm_stage(model, [vision], free_port(),
                            [*ENGINE_FLAGS, "--served-model-name", name, "--grace-s", "2"], logs / "llm.log"), stages)
    return started(gateway_stage([llm], "127.0.0.1", free_port(), [], logs / "gateway.log"), stages)


def start_vllm(model: pathlib.Path, name: str, logs: pathlib.Path, stages: list[Stage]) -> Stage:
    port = free_port()
    return started(Stage("vllm", ["vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
                                  "127.0.0.1", "--port", str(port), "--served-model-name", name,
                                  "--trust-remote-code", *ENGINE_FLAGS], port, logs / "vllm.log", http_health=True),
                   stages)


def report(runs: dict[tuple[str, str], TaskRun]) -> tuple[str, bool]:
    """The scores table and the agreement table; and whether every sample agreed."""
    rows, agree_rows, complete = [], [], True
    for task in (CHAT_TASK, LIKELIHOOD_TASK):
        for system in SYSTEMS:
            run = runs[system, task]
            rows.append([task, system, run.score, run.stderr, len(run.samples), run.wall_s])
        seen = agreement(runs[SYSTEMS[0], task], runs[SYSTEMS[1], task])
        complete &= seen.complete
        agree_rows.append([task, seen.samples, f"{seen.same_responses}/{seen.samples}",
                           f"{seen.same_scores}/{seen.samples}",
                           f"{seen.max_logprob_diff:.2g}" if task == LIKELIHOOD_TASK else "-",
                           ", ".join(map(str, seen.differing)) or "-"])
    scores = markdown_table(["task", "system", "acc", "stderr", "samples", "wall s"], rows)
    agree = markdown_table(["task", "samples", "same answers", "same per-sample score", "max abs diff log-likelihood",
                            "differing doc ids"], agree_rows)
    return f"{scores}\n\n{agree}", complete


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs, model = stage_runs.prepare(args, "accuracy")
    name = model.name
    datasets.disable_progress_bars()
    data_dir = accuracy_data.build(logs / "data", args.mmmu_samples, args.arc_samples)
    options = Options(tokenizer=model, max_images=args.max_images, num_concurrent=args.num_concurrent,
                      batch_size=args.batch_size, max_gen_toks=args.max_gen_toks)
    print(f"model {model}, data and logs in {logs}, load average {os.getloadavg()[0]:.1f}", flush=True)
    started = time.perf_counter()
    stages: list[Stage] = []
    runs: dict[tuple[str, str], TaskRun] = {}
    try:
        servers = {SYSTEMS[0]: start_ours(model, name, logs, stages), SYSTEMS[1]: start_vllm(model, name, logs, stages)}
        print(f"both servers ready in {time.perf_counter() - started:.0f} s", flush=True)
        for task in (CHAT_TASK, LIKELIHOOD_TASK):
            for system, stage in servers.items():  # one server loaded at a time
                server = Server(f"http://{stage.address}", name)
                output = logs / "lm_eval" / f"{task}-{system.split()[0].lower()}"
                print(f"{task} against {system}: {shlex.join(lm_eval_argv(task, server, output, options))}",
                      flush=True)
                runs[system, task] = run_task(task, server, data_dir, output, options)
                print(f"  acc {runs[system, task].score:.3f} in {runs[system, task].wall_s:.0f} s, load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
    finally:
        for stage in reversed(stages):
            stage.stop(30)
    tables, complete = report(runs)
    print(f"\n{args.mmmu_samples} MMMU-format questions (max_images={args.max_images}, max_gen_toks="
          f"{args.max_gen_toks or 'the task default, 512'}), {args.arc_samples} ARC-format questions (batch size "
          f"{args.batch_size}), num_concurrent={args.num_concurrent}\n\n{tables}")
    print(f"\n{time.perf_counter() - started:.0f} s in all, load average {os.getloadavg()[0]:.1f}")
    return 0 if complete else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=pathlib.Path, default=None,
                        help="checkpoint directory for both servers (default: the tiny checkpoint, built here)")
    parser.add_argument("--work-dir", default=None, help="where the tiny checkpoint, the data and the logs go")
    parser.add_argument("--mmmu-samples", type=int, default=24, help="MMMU-format questions")
    parser.add_argument("--arc-samples", type=int, default=24, help="ARC-format questions")
    parser.add_argument("--max-images", type=int, default=3,
                        help="lm_eval's max_images: at least the images of any question (these have up to 3)")
    parser.add_argument("--max-gen-toks", type=int, default=None,
                        help="tokens generated per MMMU question (default: the task's, 512)")
    parser.add_argument("--num-concurrent", type=int, default=4, help="lm_eval's concurrent requests")
    parser.add_argument("--batch-size", type=int, default=4, help="prompts per /v1/completions request (ARC)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    stage_runs.run(main)
