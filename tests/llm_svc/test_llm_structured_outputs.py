"""Proto StructuredOutputs -> vLLM's StructuredOutputsParams: each constraint and option reaches vLLM as a gRPC
client sent it, and what vLLM refuses (here, or later in the engine's checks) is an INVALID_ARGUMENT with vLLM's
message, never an internal error."""

import grpc
import pytest
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import StructuredOutputsParams, check_json_nesting

from llm_svc.sampling import to_sampling_params
from llm_svc.structured_outputs import structured_outputs_from_pb
from protos import llm_pb2
from protos.errors import InvalidInput

SO = llm_pb2.StructuredOutputs


@pytest.mark.parametrize("message,expected", [
    (SO(json='{"type": "object"}'), StructuredOutputsParams(json={"type": "object"})),
    (SO(json="not json"), StructuredOutputsParams(json="not json")),  # vLLM's backend judges it, with its message
    (SO(regex=""), StructuredOutputsParams(regex="")),  # an empty regex is a constraint in vLLM
    (SO(choice=llm_pb2.Choices(values=["a", "b"])), StructuredOutputsParams(choice=["a", "b"])),
    (SO(grammar='root ::= "a"'), StructuredOutputsParams(grammar='root ::= "a"')),
    (SO(json_object=True, disable_any_whitespace=True, disable_additional_properties=True, whitespace_pattern=" "),
     StructuredOutputsParams(json_object=True, disable_any_whitespace=True, disable_additional_properties=True,
                             whitespace_pattern=" ")),
])
def test_each_constraint_reaches_vllm(message, expected):
    assert structured_outputs_from_pb(message) == expected


def test_unset_means_unconstrained():
    assert to_sampling_params(llm_pb2.SamplingParams(), 64).structured_outputs is None
    constrained = to_sampling_params(llm_pb2.SamplingParams(structured_outputs=SO(regex="a+")), 64)
    assert constrained.structured_outputs == StructuredOutputsParams(regex="a+")


@pytest.mark.parametrize("message,says", [
    (SO(), "You must use one kind of structured outputs constraint but none are specified"),
    (SO(regex="a", grammar="root ::= a"), "You can only use one kind of structured outputs constraint"),
    (SO(structural_tag="{}"), "Invalid structured_outputs structural_tag specification"),
])
def test_what_vllm_refuses_on_construction_is_invalid_argument_with_its_message(message, says):
    with pytest.raises(InvalidInput, match=says) as caught:
        to_sampling_params(llm_pb2.SamplingParams(structured_outputs=message), 64)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT



def test_a_schema_nested_past_python_s_recursion_limit_goes_to_vllm_as_text():
    # The engine's check refuses it with vLLM's message (a VLLMClientError: INVALID_ARGUMENT), not a RecursionError.
    deep = '{"a":' * 5000 + "1" + "}" * 5000
    params = to_sampling_params(llm_pb2.SamplingParams(structured_outputs=SO(json=deep)), 64)
    assert params.structured_outputs.json == deep
    with pytest.raises(VLLMClientError, match="nested too deeply"):
        check_json_nesting(params.structured_outputs.json)
