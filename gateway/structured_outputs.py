"""`response_format` and `structured_outputs` as vLLM's OpenAI server reads them, and their one proto message.

The models mirror vLLM's (`vllm.entrypoints.generate.base.protocol`, `vllm.sampling_params.StructuredOutputsParams`),
so that the same JSON is accepted and refused with the same messages. The constraint itself is checked by vLLM's
structured-output backends in llm_svc (a bad schema, regex or grammar is vLLM's 400 from there); what is checked
here is what vLLM's request models check before the engine sees the request.
"""

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from protos import llm_pb2


class _VllmModel(BaseModel):
    # vLLM's OpenAIBaseModel keeps unknown keys, and a structural tag's JSON carries them on to the backend.
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class JsonSchemaFormat(_VllmModel):
    name: str
    description: str | None = None
    # OpenAI's key is "schema", a name pydantic keeps for itself.
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_VllmModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class LegacyStructuralTag(_VllmModel):
    begin: str
    structural_tag_schema: dict[str, Any] | None = Field(None, alias="schema")
    end: str


class LegacyStructuralTagFormat(_VllmModel):
    type: Literal["structural_tag"]
    structures: list[LegacyStructuralTag]
    triggers: list[str]


class StructuralTagFormat(_VllmModel):
    type: Literal["structural_tag"]
    format: Any


_STRUCTURAL_TAG = TypeAdapter(LegacyStructuralTagFormat | StructuralTagFormat)
AnyResponseFormat = ResponseFormat | StructuralTagFormat | LegacyStructuralTagFormat


def check_response_format(value: Any) -> Any:
    """vLLM's checks before parsing, with its messages (a structural tag's grammar is checked by vLLM in llm_svc)."""
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_schema" and value.get("json_schema") is None:
        raise ValueError("When response_format type is 'json_schema', the 'json_schema' field must be provided.")
    if kind == "structural_tag":
        try:
            _STRUCTURAL_TAG.validate_python(value)
        except ValidationError:
            raise ValueError("Invalid response_format structural_tag specification.") from None
    return value


ResponseFormatField = Annotated[AnyResponseFormat, BeforeValidator(check_response_format)]


class StructuredOutputs(BaseModel):
    """vLLM's StructuredOutputsParams: one constraint and its options. Unknown keys are ignored, as vLLM's are."""

    json_: str | dict | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    model_config = ConfigDict(populate_by_name=True)

    @model_validator(mode="after")
    def _one_of_json_regex_choice(self):
        # vLLM's request models check these three; the others (none, or several of all six) vLLM's
        # StructuredOutputsParams refuses in llm_svc, with its own message.
        if sum(value is not None for value in (self.json_, self.regex, self.choice)) > 1:
            raise ValueError("You can only use one kind of constraints for structured outputs "
                             "('json', 'regex' or 'choice').")
        return self


def _json_text(value: str | dict) -> str:
    # vLLM's engine writes a schema object with json.dumps too: the same text, so the same compiled grammar.
    return value if isinstance(value, str) else json.dumps(value)


def structured_outputs_to_proto(structured: StructuredOutputs | None,
                                response_format: AnyResponseFormat | None) -> llm_pb2.StructuredOutputs | None:
    """The constraint of a request: `structured_outputs` with `response_format` written over it, as vLLM's
    `structured_outputs_from_response_format` does."""
    if structured is None and (response_format is None or response_format.type == "text"):
        return None
    message = llm_pb2.StructuredOutputs()
    if structured is not None:
        _copy_constraint(structured, message)
    if isinstance(response_format, ResponseFormat):
        if response_format.type == "json_object":
            message.json_object = True
        elif response_format.type == "json_schema":
            schema = response_format.json_schema.json_schema
            if schema is None:  # clears the constraint, as in vLLM (which then refuses a request with none)
                message.ClearField("json")
            else:
                message.json = _json_text(schema)
    elif response_format is not None:
        message.structural_tag = json.dumps(response_format.model_dump(by_alias=True))
    return message


def _copy_constraint(structured: StructuredOutputs, message: llm_pb2.StructuredOutputs) -> None:
    if structured.json_ is not None:
        message.json = _json_text(structured.json_)
    if structured.choice is not None:
        message.choice.SetInParent()  # present even when empty, so that vLLM refuses an empty choice
        message.choice.values.extend(structured.choice)
    for name in ("regex", "grammar", "json_object", "structural_tag", "whitespace_pattern"):
        if (value := getattr(structured, name)) is not None:
            setattr(message, name, value)
    message.disable_any_whitespace = structured.disable_any_whitespace
    message.disable_additional_properties = structured.disable_additional_properties
