"""lm_eval, unchanged, against the gateway and against vLLM's own OpenAI server: its per-sample answers are equal.

`bench.accuracy` shortened to a few samples: MMMU-format questions with one and with several images through
`local-chat-completions` (lm_eval's own mmmu_val prompt and scoring), and ARC-format multiple choice through
`local-completions` (token-id prompts with `echo` and `logprobs`, several prompts per request). lm_eval runs in
this process (`simple_evaluate`, what the `lm_eval` command calls), offline.
"""

import pytest

from bench import accuracy_data
from bench.lm_eval_runs import (CHAT_TASK, LIKELIHOOD_TASK, Options, Server, agreement, evaluate_in_process,
                                offline_env, responses)
from tests.gateway.conftest import API_KEY, MODEL


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    # Four MMMU questions: one of each kind (one image, two, an image named twice; multiple choice and open).
    return accuracy_data.build(tmp_path_factory.mktemp("lm-eval-data"), mmmu_count=4, arc_count=3)


@pytest.fixture(scope="module")
def options(tiny_checkpoint):
    return Options(tokenizer=tiny_checkpoint(layout="original", llm="dense"), max_images=3, batch_size=2,
                   max_gen_toks=8, timeout_s=120)


@pytest.mark.parametrize("task", [CHAT_TASK, LIKELIHOOD_TASK])
def test_lm_eval_gives_vllms_answers_sample_by_sample(task, stack, vllm_server, data_dir, options, monkeypatch):
    for name, value in offline_env(data_dir, API_KEY).items():  # vLLM's server takes any key
        monkeypatch.setenv(name, value)
    ours = evaluate_in_process(task, Server(f"http://{stack['gateway'].address}", MODEL), data_dir, options)
    theirs = evaluate_in_process(task, Server(str(vllm_server.base_url).removesuffix("/v1/"), MODEL), data_dir,
                                 options)

    assert len(ours.samples) == (4 if task == CHAT_TASK else 3)
    for sample in ours.samples.values():  # a text per question; a (log-likelihood, greedy) per choice
        answers = responses(sample)
        if task == CHAT_TASK:
            assert len(answers) == 1 and isinstance(answers[0], str), answers
        else:
            assert len(answers) == 4 and all(logprob < 0 for logprob, _ in answers), answers
    seen = agreement(ours, theirs)
    assert seen.complete, {d: (responses(ours.samples[d]), responses(theirs.samples[d])) for d in seen.differing}
    assert ours.score == theirs.score
