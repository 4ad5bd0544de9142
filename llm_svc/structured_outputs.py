"""Proto StructuredOutputs -> vLLM's StructuredOutputsParams; the constraint itself is vLLM's to judge.

vLLM refuses a request with no constraint or several, an empty choice or grammar, a bad schema, regex or
grammar: `StructuredOutputsParams` on construction, `SamplingParams.verify` (its structured-output backends)
when the engine admits the request. Those refusals reach the caller as INVALID_ARGUMENT with vLLM's message.
A structural tag is checked here with vLLM's own check, which its OpenAI server runs on the request.
"""

import json

from vllm.entrypoints.generate.base.protocol import validate_structural_tag_payload
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import StructuredOutputsParams

from llm_svc.vllm_messages import client_message
from protos import llm_pb2
from protos.errors import InvalidInput

_SCALAR_FIELDS = ("regex", "grammar", "json_object", "structural_tag", "whitespace_pattern")


def _schema(text: str) -> str | dict:
    """A schema object as the dict that vLLM's server holds after parsing a request (so vLLM's messages show
    it alike); text that is not a JSON object goes as it is, for vLLM's backend to refuse or read."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # vLLM refuses both, with its messages
        return text
    return value if isinstance(value, dict) else text


def structured_outputs_from_pb(p: llm_pb2.StructuredOutputs) -> StructuredOutputsParams:
    fields = {name: getattr(p, name) for name in _SCALAR_FIELDS if p.HasField(name)}
    if p.HasField("json"):
        fields["json"] = _schema(p.json)
    if p.HasField("choice"):
        fields["choice"] = list(p.choice.values)
    try:
        params = StructuredOutputsParams(disable_any_whitespace=p.disable_any_whitespace,
                                         disable_additional_properties=p.disable_additional_properties, **fields)
        if params.structural_tag is not None:
            validate_structural_tag_payload(params.structural_tag, parameter="structured_outputs")
    except (VLLMClientError, ValueError) as error:
        raise InvalidInput(client_message(error)) from error
    return params
