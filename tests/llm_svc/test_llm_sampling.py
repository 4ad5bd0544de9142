"""Table tests of the proto -> vLLM conversions of the sampling and chat-template controls: each field reaches
vLLM's `SamplingParams` / `ChatParams` with vLLM's defaults, and every limit is an InvalidInput naming it."""

import pytest

from llm_svc import sampling
from llm_svc.prompts import ChatOptions, chat_options_from_pb
from llm_svc.servicer import input_from_pb
from protos import llm_pb2
from protos.errors import InvalidInput

MAX_MODEL_LEN = 128


def convert(**fields):
    return sampling.to_sampling_params(llm_pb2.SamplingParams(**fields), MAX_MODEL_LEN)


def test_absent_controls_take_vllm_s_defaults():
    params = convert()
    assert (params.min_tokens, params.bad_words, params.allowed_token_ids, params.logit_bias) == (0, [], None, None)
    assert params.skip_special_tokens and params.spaces_between_special_tokens
    assert not params.include_stop_str_in_output


def test_each_control_reaches_vllm():
    params = convert(max_tokens=9, min_tokens=3, bad_words=["red"], allowed_token_ids=[4, 5],
                     logit_bias={4: 1.5}, include_stop_str_in_output=True, skip_special_tokens=False,
                     spaces_between_special_tokens=False)
    assert (params.max_tokens, params.min_tokens, params.bad_words, params.allowed_token_ids) == (9, 3, ["red"], [4, 5])
    assert params.logit_bias == {4: 1.5}
    assert params.include_stop_str_in_output and not params.skip_special_tokens
    assert not params.spaces_between_special_tokens


def test_logit_bias_is_clamped_as_vllm_clamps_it():
    assert convert(logit_bias={1: 250.0, 2: -1e9, 3: float("inf")}).logit_bias == {1: 100.0, 2: -100.0, 3: 100.0}


@pytest.mark.parametrize("fields,named", [
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens=10"),
    ({"min_tokens": MAX_MODEL_LEN + 1}, "min_tokens"),
    ({"bad_words": ["x"] * (sampling.MAX_BAD_WORDS + 1)}, "bad_words"),
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words": ["x" * (sampling.MAX_BAD_WORD_CHARS + 1)]}, "bad_words"),
    ({"allowed_token_ids": [1] * (sampling.MAX_ALLOWED_TOKEN_IDS + 1)}, "allowed_token_ids"),
    ({"logit_bias": {i: 1.0 for i in range(sampling.MAX_LOGIT_BIAS_ENTRIES + 1)}}, "logit_bias"),
    ({"logit_bias": {1: float("nan")}}, "logit_bias"),
])
def test_every_limit_names_its_field(fields, named):
    with pytest.raises(InvalidInput, match=named):
        convert(**fields)


def test_limits_are_inclusive():
    convert(min_tokens=5, max_tokens=5, bad_words=["x" * sampling.MAX_BAD_WORD_CHARS] * sampling.MAX_BAD_WORDS,
            logit_bias={i: 1.0 for i in range(sampling.MAX_LOGIT_BIAS_ENTRIES)})


# ---- chat-template controls ---------------------------------------------------------------------------------

def chat(**fields) -> llm_pb2.Chat:
    message = llm_pb2.ChatMessage(role=llm_pb2.ROLE_USER, content=[llm_pb2.ContentPart(text="hi")])
    return llm_pb2.Chat(messages=[message], **fields)


def test_an_unset_add_generation_prompt_means_true_as_in_vllm():
    assert chat_options_from_pb(chat()) == ChatOptions(add_generation_prompt=True, continue_final_message=False)


def test_the_options_reach_the_template_with_the_named_ones_winning():
    options = chat_options_from_pb(chat(add_generation_prompt=False, continue_final_message=True,
                                        chat_template_kwargs_json='{"enable_thinking": false, "n": 3, '
                                                                  '"add_generation_prompt": true}'))
    assert options.chat_params().chat_template_kwargs == {
        "enable_thinking": False, "n": 3, "add_generation_prompt": False, "continue_final_message": True}


@pytest.mark.parametrize("fields,named", [
    ({"continue_final_message": True}, "`continue_final_message` and `add_generation_prompt`"),
    ({"chat_template_kwargs_json": "{not json"}, "chat_template_kwargs is not valid JSON"),
    ({"chat_template_kwargs_json": "[1, 2]"}, "chat_template_kwargs must be a JSON object"),
    ({"chat_template_kwargs_json": "[" * 100_000 + "]" * 100_000}, "chat_template_kwargs"),
    ({"chat_template_kwargs_json": '{"chat_template": "{{ 7 * 7 }}"}'}, "chat_template_kwargs.chat_template"),
])
def test_chat_options_that_cannot_render_name_the_problem(fields, named):
    with pytest.raises(InvalidInput, match=named):
        chat_options_from_pb(chat(**fields))


def test_a_generate_request_carries_its_chat_options():
    request = llm_pb2.GenerateRequest(chat=chat(add_generation_prompt=False, chat_template_kwargs_json='{"a": 1}'))
    converted = input_from_pb(request, max_model_len=MAX_MODEL_LEN)
    assert converted.chat_options == ChatOptions(add_generation_prompt=False, template_kwargs={"a": 1})
