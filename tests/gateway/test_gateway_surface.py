"""The API surface held against vLLM's own request models: every field vLLM's OpenAI server takes is implemented
(a field of the gateway's models, carried to llm_svc) or decided in `UNIMPLEMENTED_FIELDS`; a refused field is
refused with a 400 naming it unless its value leaves the answer unchanged; the new fields reach the proto."""

import json
import logging

import httpx
import pytest
from pydantic import ValidationError
from vllm.entrypoints.generate.base.protocol import StreamOptions as VllmStreamOptions
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletionRequest

from gateway import translate
from gateway.routes import describe_validation_error
from gateway.schemas import (COMPLETION_DEFAULT_MAX_TOKENS, UNIMPLEMENTED_FIELDS, ChatCompletionRequest,
                             CompletionRequest, Ignored, Refused, StreamOptions)
from protos import llm_pb2

CHAT_BODY = {"messages": [{"role": "user", "content": "hi"}]}
COMPLETION_BODY = {"prompt": "hi"}
OURS = {"chat": (ChatCompletionRequest, CHAT_BODY), "completion": (CompletionRequest, COMPLETION_BODY)}
# A value no Refused row leaves unchanged.
CHANGED = {"a value": "that changes the answer"}
REFUSED = [name for name, rule in UNIMPLEMENTED_FIELDS.items() if isinstance(rule, Refused)]
IGNORED = [name for name, rule in UNIMPLEMENTED_FIELDS.items() if isinstance(rule, Ignored)]


def validate(endpoint: str, **fields):
    model, body = OURS[endpoint]
    return model.model_validate({**body, **fields})


# ---- coverage of vLLM's fields ------------------------------------------------------------------------------

@pytest.mark.parametrize("theirs,ours", [(VllmChatRequest, ChatCompletionRequest),
                                         (VllmCompletionRequest, CompletionRequest)])
def test_every_vllm_request_field_is_implemented_or_decided(theirs, ours):
    undecided = sorted(set(theirs.model_fields) - set(ours.model_fields) - set(UNIMPLEMENTED_FIELDS))
    assert not undecided, (f"fields of vLLM's {theirs.__name__} that the gateway neither implements nor lists in "
                           f"gateway.schemas.UNIMPLEMENTED_FIELDS: {undecided}")


def test_no_field_is_both_implemented_and_decided_against():
    for model in (ChatCompletionRequest, CompletionRequest):
        assert not set(model.model_fields) & set(UNIMPLEMENTED_FIELDS), model.__name__


def test_every_vllm_stream_option_is_a_field():
    assert set(VllmStreamOptions.model_fields) <= set(StreamOptions.model_fields)


# ---- refused, ignored, unknown ------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", OURS)
@pytest.mark.parametrize("name", REFUSED)
def test_a_refused_field_that_would_change_the_answer_is_a_400_naming_it(endpoint, name):
    with pytest.raises(ValidationError, match=f"'{name}' is not supported by this server"):
        validate(endpoint, **{name: CHANGED})


@pytest.mark.parametrize("endpoint", OURS)
@pytest.mark.parametrize("name", REFUSED)
def test_a_refused_field_sent_with_a_value_that_changes_nothing_is_accepted(endpoint, name):
    for value in UNIMPLEMENTED_FIELDS[name].unchanged_on(endpoint):
        validate(endpoint, **{name: value})


@pytest.mark.parametrize("endpoint,name,value", [
    ("chat", "add_special_tokens", False), ("completion", "add_special_tokens", True),
    ("chat", "tools", []), ("chat", "logit_bias", {}), ("chat", "n", 1), ("completion", "echo", False),
    ("chat", "tool_choice", "none"), ("chat", "response_format", {"type": "text"})])
def test_defaults_of_vllm_are_accepted(endpoint, name, value):
    validate(endpoint, **{name: value})


@pytest.mark.parametrize("endpoint,name,value", [
    ("chat", "add_special_tokens", True), ("completion", "add_special_tokens", False)])
def test_add_special_tokens_is_refused_against_each_endpoint_default(endpoint, name, value):
    with pytest.raises(ValidationError, match="'add_special_tokens' is not supported"):
        validate(endpoint, **{name: value})


@pytest.mark.parametrize("name", IGNORED)
def test_an_ignored_field_is_accepted_whatever_its_value(name):
    validate("chat", **{name: CHANGED})
    validate("completion", **{name: CHANGED})


def test_a_field_neither_vllm_nor_openai_defines_is_ignored_and_logged(caplog):
    with caplog.at_level(logging.DEBUG, logger="gateway.schemas"):
        request = validate("chat", frobnicate=3)
    assert request.model_extra == {"frobnicate": 3}
    assert "frobnicate" in caplog.text


@pytest.mark.parametrize("fields,named", [
    ({"prompt": ["a"] * 65}, r"'prompt' with 65 prompts is more than this server takes in one request \(64\)"),
    ({"prompt": [[1, 2]] * 65}, "'prompt' with 65 prompts"),
    ({"prompt": []}, "'prompt' must not be empty"),
    ({"prompt_logprobs": 1, "stream": True}, "`prompt_logprobs` are not available when `stream=True`."),
    ({"prompt_logprobs": -2}, "prompt_logprobs"),
    ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ({"truncation_side": "middle"}, "truncation_side"),
])
def test_completion_forms_not_carried_are_refused_by_name(fields, named):
    with pytest.raises(ValidationError, match=named):
        validate("completion", **fields)


@pytest.mark.parametrize("fields,named", [
    ({"logit_bias": {"x": 1}}, "logit_bias"), ({"logit_bias": {str(1 << 32): 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids"), ({"min_tokens": -1}, "min_tokens"),
    ({"mm_processor_kwargs": {"min_dynamic_patch": 2}}, "min_dynamic_patch"),
    ({"chat_template_kwargs": ["not", "an", "object"]}, "chat_template_kwargs"),
])
def test_out_of_range_values_of_the_new_fields_name_the_field(fields, named):
    with pytest.raises(ValidationError, match=named):
        validate("chat", **fields)


def test_a_non_finite_logit_bias_is_refused():
    body = '{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": NaN}}'
    with pytest.raises(ValidationError, match="logit_bias"):
        ChatCompletionRequest.model_validate_json(body)


# ---- vLLM's checks on the body as sent ----------------------------------------------------------------------

VLLMS = {"chat": VllmChatRequest, "completion": VllmCompletionRequest}
REFUSED_AS_SENT = [
    ("chat", {"stream_options": {"include_usage": True}}),
    ("chat", {"stream": False, "stream_options": {"include_usage": False}}),
    ("completion", {"stream_options": {"include_usage": True}}),
    ("chat", {"top_logprobs": 3}), ("chat", {"top_logprobs": 3, "logprobs": False}), ("chat", {"top_logprobs": -1}),
    ("chat", {"top_logprobs": 25}),  # vLLM's logprobs check comes before any range check
    ("chat", {"logprobs": True, "top_logprobs": "3"}), ("chat", {"prompt_logprobs": "1"}),
    ("completion", {"logprobs": "2"}), ("completion", {"prompt_logprobs": 1, "stream": True}),
]
ACCEPTED_AS_SENT = [
    ("chat", {"stream_options": {}}), ("chat", {"stream_options": None}), ("completion", {"stream_options": {}}),
    ("chat", {"stream": True, "stream_options": {"include_usage": True}}),
    ("completion", {"stream": True, "stream_options": {"include_usage": True}}),
    ("chat", {"top_logprobs": 0}), ("chat", {"top_logprobs": None}), ("chat", {"logprobs": True, "top_logprobs": 3}),
]


def vllm_message(endpoint: str, fields: dict) -> str:
    """The message of the 400 vLLM's server answers (its request model raises VLLMValidationError, sent as is)."""
    with pytest.raises(Exception) as refused:
        VLLMS[endpoint].model_validate({**OURS[endpoint][1], **fields})
    return str(refused.value)


@pytest.mark.parametrize("endpoint,fields", REFUSED_AS_SENT)
def test_what_vllm_refuses_as_sent_is_refused_with_vllm_s_message(endpoint, fields):
    with pytest.raises(ValidationError) as refused:
        validate(endpoint, **fields)
    assert describe_validation_error(refused.value) == vllm_message(endpoint, fields)


@pytest.mark.parametrize("endpoint,fields", ACCEPTED_AS_SENT)
def test_what_vllm_accepts_as_sent_is_accepted(endpoint, fields):
    VLLMS[endpoint].model_validate({**OURS[endpoint][1], **fields})
    validate(endpoint, **fields)


# ---- carried to the proto -----------------------------------------------------------------------------------

@pytest.mark.parametrize("endpoint", OURS)
def test_the_sampling_controls_reach_the_proto(endpoint):
    fields = {"min_tokens": 2, "bad_words": ["red", "blue"], "allowed_token_ids": [5, 6, 7],
              "logit_bias": {"5": 2.5, "7": -100}, "include_stop_str_in_output": True,
              "skip_special_tokens": False, "spaces_between_special_tokens": False, "max_tokens": 9}
    request = validate(endpoint, **fields)
    sampling = translate.sampling_params(request, max_tokens_limit=100, top_logprobs=None)
    assert sampling == llm_pb2.SamplingParams(
        n=1, max_tokens=9, min_tokens=2, bad_words=["red", "blue"], allowed_token_ids=[5, 6, 7],
        logit_bias={5: 2.5, 7: -100}, include_stop_str_in_output=True, skip_special_tokens=False,
        spaces_between_special_tokens=False)


def test_absent_controls_stay_unset_on_the_wire_for_vllm_defaults():
    sampling = translate.sampling_params(validate("chat"), max_tokens_limit=100, top_logprobs=None)
    assert sampling == llm_pb2.SamplingParams(n=1)
    assert not sampling.HasField("skip_special_tokens") and not sampling.HasField("spaces_between_special_tokens")


@pytest.mark.parametrize("endpoint", OURS)
def test_the_generation_config_s_fields_stay_unset_on_the_wire(endpoint):
    # llm_svc gives an unset field the checkpoint's generation-config default, as vLLM's server does; a neutral value
    # filled in here would hide it.
    sampling = translate.sampling_params(validate(endpoint), max_tokens_limit=100, top_logprobs=None)
    assert not [name for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty") if sampling.HasField(name)]


def test_completions_default_to_vllm_s_16_tokens_and_null_means_the_context():
    assert translate.completion_generate_request(validate("completion"), "r", 100).sampling.max_tokens == \
        COMPLETION_DEFAULT_MAX_TOKENS == VllmCompletionRequest.model_fields["max_tokens"].default
    unbounded = translate.completion_generate_request(validate("completion", max_tokens=None), "r", 100)
    assert not unbounded.sampling.HasField("max_tokens")


def test_the_chat_template_controls_reach_the_proto():
    request = validate("chat", add_generation_prompt=False, continue_final_message=True,
                       chat_template_kwargs={"enable_thinking": False, "depth": 3})
    chat = translate.chat_generate_request(request, [], "r", 100).chat
    assert chat.add_generation_prompt is False and chat.continue_final_message is True
    assert json.loads(chat.chat_template_kwargs_json) == {"enable_thinking": False, "depth": 3}


@pytest.mark.parametrize("endpoint", OURS)
def test_truncation_and_continuous_usage_reach_the_proto(endpoint):
    request = validate(endpoint, truncate_prompt_tokens=5, truncation_side="right", stream=True,
                       stream_options={"include_usage": True, "continuous_usage_stats": True})
    build = translate.chat_generate_request if endpoint == "chat" else translate.completion_generate_request
    sent = build(request, *([[]] if endpoint == "chat" else []), "r", 100)
    assert (sent.truncate_prompt_tokens, sent.truncation_side, sent.continuous_usage) == (5, "right", True)
    plain = build(validate(endpoint, stream=True, stream_options={"continuous_usage_stats": True}),
                  *([[]] if endpoint == "chat" else []), "r", 100)
    # As vLLM reads it: continuous usage only with include_usage; no truncation unless asked.
    assert not plain.HasField("truncate_prompt_tokens") and not plain.continuous_usage


def test_chat_template_defaults_are_vllm_s():
    chat = translate.chat_generate_request(validate("chat"), [], "r", 100).chat
    assert chat.HasField("add_generation_prompt") and chat.add_generation_prompt
    assert not chat.continue_final_message and chat.chat_template_kwargs_json == ""


# ---- over HTTP: still refused by name, before any call to llm_svc ---------------------------------------------

@pytest.mark.parametrize("path,fields,named", [
    ("/v1/chat/completions", {"n": 129}, "n"),
    ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
    ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {"prompt": ["a"] * 65}, "'prompt' with 65 prompts"),
    ("/v1/completions", {"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
    ("/v1/completions", {"guided_regex": "a+"}, "guided_regex"),
])
async def test_refused_fields_are_a_400_naming_them_before_llm_svc_is_called(gateway_url, fake, path, fields,
                                                                             named):
    body = {**(CHAT_BODY if path.endswith("chat/completions") else COMPLETION_BODY), **fields}
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(gateway_url + path, json=body)
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]["message"]
    assert fake.requests == []
