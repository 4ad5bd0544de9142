"""lm_eval, unchanged, against one OpenAI-compatible server; and two runs' samples compared one by one.

Shared by `bench.accuracy` and its test. The bench runs lm_eval as its own command (`python -m lm_eval run ...`,
what a user types) in the directory that holds the data sets, since the tasks' `dataset_path` is relative
(bench/accuracy_tasks); the test calls `lm_eval.simple_evaluate`, which that command calls, in its own process.
Nothing is read from a hub: datasets and hub are set offline, the likelihood task's tokenizer is the checkpoint's
own directory, and the chat task needs none.
"""

import dataclasses
import glob
import json
import math
import os
import pathlib
import subprocess
import sys
import time

TASKS_DIR = pathlib.Path(__file__).resolve().parent / "accuracy_tasks"
CHAT_TASK, LIKELIHOOD_TASK = "mmmu_tiny", "arc_tiny"
# Log-likelihoods of the same tokens from two fp32 engines: equal up to summation order.
LOGPROB_REL_TOL, LOGPROB_ABS_TOL = 1e-6, 1e-4


@dataclasses.dataclass(frozen=True)
class Server:
    base_url: str  # http://HOST:PORT
    model: str  # the served model name
    api_key: str = ""


@dataclasses.dataclass(frozen=True)
class Options:
    tokenizer: pathlib.Path  # the checkpoint's directory: lm_eval's likelihood tasks count tokens themselves
    max_images: int = 3  # images lm_eval sends per question, at most
    num_concurrent: int = 1
    batch_size: int = 1  # prompts per /v1/completions request (likelihood task)
    max_gen_toks: int | None = None  # None: the task's own (mmmu's 512)
    timeout_s: int = 600


@dataclasses.dataclass(frozen=True)
class TaskRun:
    task: str
    score: float  # acc
    stderr: float
    samples: dict[int, dict]  # doc_id -> lm_eval's logged sample
    wall_s: float


def lm_eval_model(task: str, server: Server, options: Options) -> tuple[str, str]:
    """(lm_eval's model type, its model_args) for `task` against `server`."""
    if task == LIKELIHOOD_TASK:
        return "local-completions", (f"model={server.model},base_url={server.base_url}/v1/completions,"
                                     f"tokenizer_backend=huggingface,tokenizer={options.tokenizer},"
                                     # InternVL checkpoints name their own config code: else transformers asks
                                     # on the terminal whether to run it, and waits
                                     "trust_remote_code=True,"
                                     f"num_concurrent={options.num_concurrent},timeout={options.timeout_s}")
    return "local-chat-completions", (f"model={server.model},base_url={server.base_url}/v1/chat/completions,"
                                      f"max_images={options.max_images},num_concurrent={options.num_concurrent},"
                                      f"timeout={options.timeout_s}")


def gen_kwargs(options: Options) -> str | None:
    return None if options.max_gen_toks is None else f"max_gen_toks={options.max_gen_toks}"


def lm_eval_argv(task: str, server: Server, output: pathlib.Path, options: Options) -> list[str]:
    model, model_args = lm_eval_model(task, server, options)
    argv = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
            "--tasks", task, "--include_path", str(TASKS_DIR), "--output_path", str(output), "--log_samples"]
    if task == CHAT_TASK:
        argv += ["--apply_chat_template"] + (["--gen_kwargs", gen_kwargs(options)] if gen_kwargs(options) else [])
    else:
        argv += ["--batch_size", str(options.batch_size)]
    return argv


def offline_env(data_dir: pathlib.Path, api_key: str) -> dict[str, str]:
    """What lm_eval runs with: no hub, the data sets' cache beside them, the key lm_eval's API models send."""
    return {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(data_dir / ".datasets-cache"),
            "OPENAI_API_KEY": api_key, "TOKENIZERS_PARALLELISM": "false"}


def run_task(task: str, server: Server, data_dir: pathlib.Path, output: pathlib.Path, options: Options) -> TaskRun:
    """Runs the lm_eval command on `task` against `server`; its output (and log, lm_eval.log) goes under `output`."""
    output.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(output / "lm_eval.log", "wb") as log:
        status = subprocess.run(lm_eval_argv(task, server, output, options), cwd=data_dir,
                                env={**os.environ, **offline_env(data_dir, server.api_key)}, stdout=log,
                                stderr=subprocess.STDOUT).returncode
    wall_s = time.perf_counter() - started
    if status != 0:
        tail = (output / "lm_eval.log").read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"lm_eval {task} against {server.base_url} exited with {status}:\n" + "\n".join(tail))
    (results_file,) = glob.glob(str(output / "*" / "results_*.json"))
    (samples_file,) = glob.glob(str(output / "*" / f"samples_{task}_*.jsonl"))
    metrics = json.loads(pathlib.Path(results_file).read_text())["results"][task]
    samples = map(json.loads, pathlib.Path(samples_file).read_text().splitlines())
    return TaskRun(task, metrics["acc,none"], metrics["acc_stderr,none"], {s["doc_id"]: s for s in samples}, wall_s)


def evaluate_in_process(task: str, server: Server, data_dir: pathlib.Path, options: Options) -> TaskRun:
    """The same evaluation through `lm_eval.simple_evaluate` in this process (no second start of lm_eval): the
    task's YAML with its `dataset_path` made absolute. The caller sets `offline_env` (the API key is read from
    OPENAI_API_KEY at each request)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(TASKS_DIR / f"{task}.yaml")
    config |= {"dataset_path": str(data_dir / config["dataset_path"]),
               "dataset_kwargs": {"cache_dir": str(data_dir / ".datasets-cache")}}
    model, model_args = lm_eval_model(task, server, options)
    started = time.perf_counter()
    results = simple_evaluate(model=model, model_args=model_args, tasks=[config],
                              task_manager=TaskManager(include_defaults=False), batch_size=options.batch_size,
                              gen_kwargs=gen_kwargs(options) if task == CHAT_TASK else None,
                              apply_chat_template=task == CHAT_TASK, log_samples=True)
    metrics = results["results"][task]
    return TaskRun(task, metrics["acc,none"], metrics["acc_stderr,none"],
                   {s["doc_id"]: s for s in results["samples"][task]}, time.perf_counter() - started)


def responses(sample: dict) -> list:
    """What the server answered for one sample: the generated text, or each choice's (log-likelihood, greedy)."""
    if isinstance(sample["resps"][0][0], str):
        return [r[0] for r in sample["resps"]]
    return [(float(r[0][0]), r[0][1] in (True, "True")) for r in sample["resps"]]


def same_responses(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    return all(x == y if isinstance(x, str) else
               x[1] == y[1] and math.isclose(x[0], y[0], rel_tol=LOGPROB_REL_TOL, abs_tol=LOGPROB_ABS_TOL)
               for x, y in zip(a, b))


@dataclasses.dataclass(frozen=True)
class Agreement:
    samples: int
    same_responses: int
    same_scores: int  # samples whose every metric (acc, acc_norm) is the same
    max_logprob_diff: float  # 0 for a generative task
    differing: list[int]  # doc ids whose responses differ

    @property
    def complete(self) -> bool:
        return self.same_responses == self.same_scores == self.samples


def agreement(ours: TaskRun, theirs: TaskRun) -> Agreement:
    assert ours.samples.keys() == theirs.samples.keys(), "the two runs evaluated different samples"
    differing, same_scores, max_diff = [], 0, 0.0
    for doc_id, sample in ours.samples.items():
        other = theirs.samples[doc_id]
        a, b = responses(sample), responses(other)
        if not same_responses(a, b):
            differing.append(doc_id)
        same_scores += all(sample[m] == other[m] for m in sample["metrics"])
        max_diff = max([max_diff, *(abs(x[0] - y[0]) for x, y in zip(a, b) if not isinstance(x, str))])
    return Agreement(len(ours.samples), len(ours.samples) - len(differing), same_scores, max_diff, differing)
