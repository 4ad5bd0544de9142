"""`response_format` and `structured_outputs` held against vLLM's own request models: the same request body gives
the same StructuredOutputsParams (through the gateway's proto and llm_svc's conversion) as vLLM's server builds,
and a body vLLM's request models refuse is refused here with vLLM's message."""

import dataclasses
import json

import pytest
from pydantic import ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest as VllmChatRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletionRequest
from vllm.exceptions import VLLMClientError

from gateway import translate
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from llm_svc.structured_outputs import structured_outputs_from_pb
from protos import llm_pb2
from protos.errors import InvalidInput

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
TAG = {"type": "structural_tag", "format": {"type": "const_string", "value": "hi"}}
LEGACY_TAG = {"type": "structural_tag", "triggers": ["<f>"],
              "structures": [{"begin": "<f>", "schema": {"type": "boolean"}, "end": "</f>", "extra": 1}]}
ENDPOINTS = {"chat": (ChatCompletionRequest, VllmChatRequest, {"messages": [{"role": "user", "content": "hi"}]}),
             "completion": (CompletionRequest, VllmCompletionRequest, {"prompt": "hi"})}

ACCEPTED = {
    "json_object": {"response_format": {"type": "json_object"}},
    "json_schema": {"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
    "text": {"response_format": {"type": "text"}},
    "text over a regex": {"response_format": {"type": "text"}, "structured_outputs": {"regex": "a|b"}},
    "json": {"structured_outputs": {"json": SCHEMA, "disable_additional_properties": True}},
    "empty regex": {"structured_outputs": {"regex": ""}},
    "choice": {"structured_outputs": {"choice": ["yes", "no"], "whitespace_pattern": " ?"}},
    "grammar": {"structured_outputs": {"grammar": 'root ::= "a"+', "disable_any_whitespace": True}},
    "structural_tag": {"structured_outputs": {"structural_tag": json.dumps(TAG)}},
    "response_format structural_tag": {"response_format": TAG},
    "legacy structural tag": {"response_format": LEGACY_TAG},
    "json_schema over options": {"structured_outputs": {"json": {"type": "number"}, "disable_any_whitespace": True},
                                 "response_format": {"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": SCHEMA}}},
    "unknown keys are ignored": {"structured_outputs": {"regex": "a", "frobnicate": 1}},
}

REFUSED = {
    "json_schema without json_schema": {"response_format": {"type": "json_schema"}},
    "json_schema without a schema": {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    "no constraint": {"structured_outputs": {}},
    "json and regex": {"structured_outputs": {"json": SCHEMA, "regex": "a"}},
    "regex and grammar": {"structured_outputs": {"regex": "a", "grammar": "root ::= a"}},
    "regex and response_format": {"structured_outputs": {"regex": "a"}, "response_format": {"type": "json_object"}},
    "structural tag of the wrong shape": {"response_format": {"type": "structural_tag"}},
    "structural tag that xgrammar refuses": {"structured_outputs": {"structural_tag": "{}"}},
    "empty structural tag": {"structured_outputs": {"structural_tag": ""}},
}


def ours(endpoint: str, fields: dict):
    """The StructuredOutputsParams that llm_svc gives the engine for this body (None: unconstrained)."""
    model, _, body = ENDPOINTS[endpoint]
    sampling = translate.sampling_params(model.model_validate({**body, **fields}), 100, None)
    return structured_outputs_from_pb(sampling.structured_outputs) if sampling.HasField("structured_outputs") \
        else None


def theirs(endpoint: str, fields: dict):
    _, model, body = ENDPOINTS[endpoint]
    return model.model_validate({"model": "m", **body, **fields}).extract_structured_outputs()


def message(error: Exception) -> str:
    """The message vLLM or the gateway gives the client: a validation error's own, without pydantic's wrapping."""
    if isinstance(error, ValidationError):
        details = error.errors()[0]
        return str(details["ctx"]["error"]) if "error" in details.get("ctx", {}) else details["msg"]
    return str(error)


def outcome(build, endpoint: str, fields: dict) -> str:
    with pytest.raises((ValidationError, InvalidInput, VLLMClientError)) as caught:
        build(endpoint, fields)
    return message(caught.value)


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("name", ACCEPTED)
def test_the_engine_gets_the_constraint_vllm_s_server_gives_it(endpoint, name):
    assert ours(endpoint, ACCEPTED[name]) == theirs(endpoint, ACCEPTED[name])


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("name", REFUSED)
def test_what_vllm_refuses_is_refused_with_its_message(endpoint, name):
    vllm_message = outcome(theirs, endpoint, REFUSED[name])
    # vLLM's VLLMValidationError adds "(parameter=...)" where it names one; pydantic's wrapping adds nothing.
    assert vllm_message.split(" (parameter=")[0] in outcome(ours, endpoint, REFUSED[name])


def test_a_schema_sent_as_text_reaches_the_engine_as_the_object_it_holds():
    # The engine writes an object back with json.dumps: the same text, the same grammar, and vLLM's messages
    # show the schema as they show one sent as an object.
    fields = {"structured_outputs": {"json": '{"type": "string"}'}}
    assert ours("chat", fields) == dataclasses.replace(theirs("chat", fields), json={"type": "string"})


def test_an_empty_choice_reaches_llm_svc_as_a_list_for_vllm_to_refuse():
    sampling = translate.sampling_params(
        ChatCompletionRequest.model_validate({**ENDPOINTS["chat"][2], "structured_outputs": {"choice": []}}), 100,
        None)
    assert sampling.structured_outputs.HasField("choice") and not sampling.structured_outputs.choice.values


def test_no_constraint_leaves_the_field_unset():
    sampling = translate.sampling_params(ChatCompletionRequest.model_validate(ENDPOINTS["chat"][2]), 100, None)
    assert not sampling.HasField("structured_outputs")
    assert sampling == llm_pb2.SamplingParams(n=1)
