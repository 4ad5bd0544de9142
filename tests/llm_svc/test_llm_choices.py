"""Several completions of one request, token-id prompts, the prompt's text and log-probabilities: from the proto
to the engine's inputs, and from the engine's outputs (as vLLM's parallel sampling streams them) to the messages."""

import re
import types

import pytest
from vllm import SamplingParams
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput

from llm_svc.sampling import MAX_COMPLETIONS, to_sampling_params
from llm_svc.service import GenerateInput, LanguageService
from llm_svc.servicer import delta_to_pb, input_from_pb
from protos import llm_pb2
from protos.errors import InvalidInput
from tests.llm_svc.test_llm_service_unit import DIMS, LIMITS, Admission, FakeVision

PROMPT_IDS = [11, 12, 13]


def completion(index: int, text: str, finish_reason: str | None = None) -> CompletionOutput:
    return CompletionOutput(index=index, text=text, token_ids=[100 + index], cumulative_logprob=None, logprobs=None,
                            finish_reason=finish_reason, stop_reason=None)


def output(*completions: CompletionOutput, finished=False, prompt_logprobs=None):
    return types.SimpleNamespace(outputs=list(completions), finished=finished, prompt_token_ids=PROMPT_IDS,
                                 prompt_logprobs=prompt_logprobs, num_cached_tokens=0, metrics=None)


class ParallelEngine:
    """Streams as vLLM's engine does with n=2 and DELTA outputs: one child's output at a time, each finishing on
    its own, `finished` only on the last."""

    def __init__(self, prompt_logprobs=None):
        self.prompts = []
        self.prompt_logprobs = prompt_logprobs

    async def generate(self, prompt, sampling, request_id):
        self.prompts.append(prompt)
        yield output(completion(1, "b"), prompt_logprobs=self.prompt_logprobs)
        yield output(completion(0, "a"), prompt_logprobs=self.prompt_logprobs)
        yield output(completion(1, "!", "length"))
        yield output(completion(0, ".", "stop"), finished=True)


class TokenRenderer:
    async def engine_input(self, prompt, tok_params=None):
        return prompt

    def decode(self, token_ids):
        return "".join(f"<{t}>" for t in token_ids)


async def test_each_completion_streams_with_its_index_and_finishes_on_its_own():
    engine = ParallelEngine()
    service = LanguageService(engine, FakeVision(None, 1), TokenRenderer(), Admission(), DIMS, LIMITS)
    request = GenerateInput("r1", None, None, [], SamplingParams(n=2, max_tokens=2), 0, prompt_token_ids=PROMPT_IDS,
                            return_prompt_text=True)
    deltas = [d async for d in service.generate(request, service.admit(0))]
    assert engine.prompts == [{"prompt_token_ids": PROMPT_IDS}]
    assert [(d.index, d.text, d.finish_reason) for d in deltas] == [
        (1, "b", None), (0, "a", None), (1, "!", "length"), (0, ".", "stop")]
    # The usage once, on the stream's last message, counting every completion's tokens.
    assert [d.timings is not None for d in deltas] == [False, False, False, True]
    assert (deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == (3, 4)
    assert [d.prompt_text for d in deltas] == ["<11><12><13>", None, None, None]
    messages = [delta_to_pb("r1", d, 0) for d in deltas]
    assert [m.HasField("usage") for m in messages] == [False, False, False, True]
    assert [m.index for m in messages] == [1, 0, 1, 0]


async def test_the_prompt_logprobs_come_once_on_the_first_message():
    # As vLLM gives them: None for the first token; then the prompt token (its own rank) and the top 1.
    logprobs = [None, {12: Logprob(-2.5, rank=3, decoded_token=" b"), 7: Logprob(-0.5, rank=1, decoded_token="x")},
                {13: Logprob(-0.25, rank=1, decoded_token=" c")}]
    service = LanguageService(ParallelEngine(logprobs), FakeVision(None, 1), TokenRenderer(), Admission(), DIMS,
                              LIMITS)
    request = GenerateInput("r1", None, None, [], SamplingParams(n=2, prompt_logprobs=1), 0,
                            prompt_token_ids=PROMPT_IDS)
    deltas = [d async for d in service.generate(request, service.admit(0))]
    assert [d.prompt_logprobs is not None for d in deltas] == [True, False, False, False]
    message = delta_to_pb("r1", deltas[0], 0, prompt_top_logprobs=1, decode=TokenRenderer().decode)
    assert list(message.prompt_logprobs) == [
        llm_pb2.PromptTokenLogprob(token_id=11, token="<11>"),
        llm_pb2.PromptTokenLogprob(token_id=12, token=" b", logprob=-2.5, rank=3,
                                   top=[llm_pb2.TopLogprob(token_id=7, token="x", logprob=-0.5)]),
        llm_pb2.PromptTokenLogprob(token_id=13, token=" c", logprob=-0.25, rank=1,
                                   top=[llm_pb2.TopLogprob(token_id=13, token=" c", logprob=-0.25)])]
    assert not message.prompt_logprobs[0].HasField("logprob")


def test_a_token_id_prompt_reaches_the_service():
    request = llm_pb2.GenerateRequest(prompt_tokens=llm_pb2.PromptTokens(token_ids=PROMPT_IDS), return_prompt_text=True,
                                      sampling=llm_pb2.SamplingParams(n=3, prompt_logprobs=2, seed=5))
    converted = input_from_pb(request, max_model_len=128)
    assert converted.prompt_token_ids == PROMPT_IDS and converted.prompt is None and converted.return_prompt_text
    assert (converted.sampling.n, converted.sampling.prompt_logprobs, converted.sampling.seed) == (3, 2, 5)
    with pytest.raises(InvalidInput, match="the prompt is empty"):
        input_from_pb(llm_pb2.GenerateRequest(prompt_tokens=llm_pb2.PromptTokens()), max_model_len=128)


@pytest.mark.parametrize("sampling,message", [
    (llm_pb2.SamplingParams(n=0), "n=0 must be in"),
    (llm_pb2.SamplingParams(n=MAX_COMPLETIONS + 1), f"n={MAX_COMPLETIONS + 1} must be in"),
    (llm_pb2.SamplingParams(prompt_logprobs=-2), "`prompt_logprobs` must be a positive value or -1."),
])
def test_out_of_range_choices_and_prompt_logprobs_are_refused(sampling, message):
    with pytest.raises(InvalidInput, match=re.escape(message)):
        to_sampling_params(sampling, max_model_len=128)


async def test_continuous_usage_counts_each_completion_s_tokens_so_far():
    service = LanguageService(ParallelEngine(), FakeVision(None, 1), TokenRenderer(), Admission(), DIMS, LIMITS)
    request = GenerateInput("r1", None, None, [], SamplingParams(n=2, max_tokens=2), 0, prompt_token_ids=PROMPT_IDS,
                            continuous_usage=True)
    deltas = [d async for d in service.generate(request, service.admit(0))]
    # (prompt tokens, that completion's tokens so far, no reasoning parser), as vLLM's continuous usage counts them.
    assert [(d.index, d.choice_usage) for d in deltas] == [
        (1, (3, 1, None)), (0, (3, 1, None)), (1, (3, 2, None)), (0, (3, 2, None))]
    sent = delta_to_pb("r1", deltas[2], 0).choice_usage
    assert sent == llm_pb2.Usage(prompt_tokens=3, completion_tokens=2) and not sent.HasField("reasoning_tokens")


def test_truncation_reaches_the_service_and_is_checked():
    request = llm_pb2.GenerateRequest(prompt="hi", truncate_prompt_tokens=5, truncation_side="right",
                                      continuous_usage=True)
    generate_input = input_from_pb(request, max_model_len=128)
    assert (generate_input.truncation.tokens, generate_input.truncation.side) == (5, "right")
    assert generate_input.continuous_usage
    assert input_from_pb(llm_pb2.GenerateRequest(prompt="hi"), max_model_len=128).truncation is None
    with pytest.raises(InvalidInput, match="truncate_prompt_tokens=-2"):
        input_from_pb(llm_pb2.GenerateRequest(prompt="hi", truncate_prompt_tokens=-2), max_model_len=128)
    with pytest.raises(InvalidInput, match="truncation_side"):
        input_from_pb(llm_pb2.GenerateRequest(prompt="hi", truncate_prompt_tokens=2, truncation_side="up"),
                      max_model_len=128)
