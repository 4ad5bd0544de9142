"""Pydantic models of the OpenAI requests the gateway accepts (chat and text completions).

Unknown fields are ignored, as OpenAI-compatible servers do, except for features whose silent absence
would change the answer (tools, response formats, logit bias, ...): those are refused with a 400.
Every integer field is bounded by the range of the proto field that carries it (`proto_range`), so a number
JSON allows but the wire cannot carry is a 400 naming the field, not a failure to build the gRPC request.
"""

from typing import Annotated, Literal

from google.protobuf.descriptor import FieldDescriptor
from pydantic import BaseModel, ConfigDict, Field, model_validator

from protos import llm_pb2

_CPP_RANGES = {FieldDescriptor.CPPTYPE_INT32: (-(1 << 31), (1 << 31) - 1),
               FieldDescriptor.CPPTYPE_UINT32: (0, (1 << 32) - 1),
               FieldDescriptor.CPPTYPE_INT64: (-(1 << 63), (1 << 63) - 1),
               FieldDescriptor.CPPTYPE_UINT64: (0, (1 << 64) - 1)}


def proto_range(message: type, field: str, ge: int | None = None, le: int | None = None) -> dict:
    """`ge`/`le` for a pydantic Field: the proto integer field's range, narrowed to [ge, le] where given."""
    low, high = _CPP_RANGES[message.DESCRIPTOR.fields_by_name[field].cpp_type]
    return {"ge": low if ge is None else max(ge, low), "le": high if le is None else min(le, high)}


_SAMPLING = llm_pb2.SamplingParams


# Fields of OpenAI's schema this server does not implement -> the values that mean "not used".
_UNSUPPORTED = {"tools": (None, []), "functions": (None, []), "tool_choice": (None, "none", "auto"),
                "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
                "logit_bias": (None, {}), "audio": (None,), "prediction": (None,), "best_of": (None, 1),
                "suffix": (None, ""), "echo": (None, False), "use_beam_search": (None, False)}


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _refuse_unsupported(self):
        extra = self.model_extra or {}
        for name, unused in _UNSUPPORTED.items():
            if extra.get(name) not in unused:
                raise ValueError(f"'{name}' is not supported by this server")
        return self


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str
    # Accepted for compatibility; the vision stage's tiling decides the resolution.
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class SystemMessage(BaseModel):
    # "developer" is OpenAI's newer name for the system role.
    role: Literal["system", "developer"]
    content: str | list[TextPart]


class UserMessage(BaseModel):
    role: Literal["user"]
    content: str | list[ContentPart]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | list[TextPart] | None = None


Message = Annotated[SystemMessage | UserMessage | AssistantMessage, Field(discriminator="role")]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(_Base):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, **proto_range(_SAMPLING, "top_k", ge=-1))
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, **proto_range(_SAMPLING, "max_tokens", ge=1))
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(**proto_range(_SAMPLING, "stop_token_ids"))]] | None = None
    seed: int | None = Field(None, **proto_range(_SAMPLING, "seed"))
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    n: int = Field(1, ge=1, le=1, description="only one completion per request is supported")
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None


class MmProcessorKwargs(BaseModel):
    # vLLM's name for InternVL's per-image tile limit.
    max_dynamic_patch: int | None = Field(None, **proto_range(llm_pb2.GenerateRequest, "max_tiles", ge=1))


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, **proto_range(_SAMPLING, "max_tokens", ge=1))
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    mm_processor_kwargs: MmProcessorKwargs | None = None

    @property
    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens in favour of max_completion_tokens; the newer one wins.
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    # A list is accepted only with one prompt: one request is one generation.
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
