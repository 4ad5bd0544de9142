"""Pydantic models of the OpenAI requests the gateway accepts (chat and text completions).

No field is dropped silently: every request field of vLLM's own request models (and of OpenAI's) is a field of
these models, carried to llm_svc, or a row of `UNIMPLEMENTED_FIELDS`, which refuses it with a 400 naming it
unless its value leaves the answer as if it were absent (tests/gateway/test_gateway_surface.py holds the list
to vLLM's). Fields that neither vLLM nor OpenAI define are ignored, as vLLM's server ignores them.
Every integer field is bounded by the range of the proto field that carries it (`proto_range`), so a number
JSON allows but the wire cannot carry is a 400 naming the field, not a failure to build the gRPC request.
"""

import dataclasses
import json
import logging
from typing import Annotated, Any, ClassVar, Literal

from google.protobuf.descriptor import FieldDescriptor
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from gateway.structured_outputs import ResponseFormatField, StructuredOutputs
from gateway.tools import ToolCall
from protos import llm_pb2

log = logging.getLogger(__name__)

_CPP_RANGES = {FieldDescriptor.CPPTYPE_INT32: (-(1 << 31), (1 << 31) - 1),
               FieldDescriptor.CPPTYPE_UINT32: (0, (1 << 32) - 1),
               FieldDescriptor.CPPTYPE_INT64: (-(1 << 63), (1 << 63) - 1),
               FieldDescriptor.CPPTYPE_UINT64: (0, (1 << 64) - 1)}


def proto_range(message: type, field: str, ge: int | None = None, le: int | None = None) -> dict:
    """`ge`/`le` for a pydantic Field: the proto integer field's range (a map's key range), narrowed to [ge, le]."""
    descriptor = message.DESCRIPTOR.fields_by_name[field]
    if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
        descriptor = descriptor.message_type.fields_by_name["key"]
    low, high = _CPP_RANGES[descriptor.cpp_type]
    return {"ge": low if ge is None else max(ge, low), "le": high if le is None else min(le, high)}


def vllm_refusal(message: str, parameter: str, value: Any = None) -> PydanticCustomError:
    """A refusal worded as vLLM's server words it (the text of its VLLMValidationError), so the two 400s read alike."""
    extras = [f"parameter={parameter}", *([f"value={value}"] if value is not None else [])]
    return PydanticCustomError("vllm_validation", "{message}", {"message": f"{message} ({', '.join(extras)})"})


_SAMPLING = llm_pb2.SamplingParams
# OpenAI's bound on n, which llm_svc applies too.
MAX_COMPLETIONS = 128
# Prompts in one completions request, each a Generate call of its own: vLLM sets no bound; this one keeps a request's
# share of the gateway's work (one slot, however many calls) within reason.
MAX_PROMPTS = 64
CHAT, COMPLETION = "chat", "completion"


@dataclasses.dataclass(frozen=True)
class Refused:
    """Not implemented: a 400 naming the field, unless its value is one of `unchanged`, the values that leave the
    answer as vLLM's server gives it without the field. `completion_unchanged` where /v1/completions differs."""

    unchanged: tuple = (None,)
    completion_unchanged: tuple | None = None

    def unchanged_on(self, endpoint: str) -> tuple:
        return self.completion_unchanged if endpoint == COMPLETION and self.completion_unchanged else self.unchanged

    def refusal(self, name: str, value, endpoint: str) -> str | None:
        """The 400's message, or None where `value` leaves the answer unchanged."""
        unchanged = self.unchanged_on(endpoint)
        if value in unchanged:
            return None
        shown = " or ".join(json.dumps(v) for v in unchanged)
        return f"'{name}' is not supported by this server (accepted only as {shown}, or left out)"


@dataclasses.dataclass(frozen=True)
class Ignored:
    """Accepted whatever its value, because it does not change the answer: `why` says why."""

    why: str


_PLANNED = Refused()  # refused until implemented: vLLM's default is to leave it out
_OFF = Refused((None, False))
_EMPTY = Refused((None, [], {}))

# Every request field of vLLM's ChatCompletionRequest and CompletionRequest (and OpenAI's) that these models do
# not implement, with the decision taken on it. A field implemented end to end is a field of the models below.
UNIMPLEMENTED_FIELDS: dict[str, Refused | Ignored] = {
    # Beam search, and what only it uses.
    "best_of": Refused((None, 1)),
    "use_beam_search": _OFF,
    "length_penalty": Ignored("used by beam search only, which is refused"),
    # OpenAI's deprecated names for tools, which vLLM's server does not read either.
    "functions": _EMPTY,
    "function_call": Refused((None, "none", "auto")),
    # vLLM's removed guided-decoding fields: its server ignores them with a warning, and the output is not
    # constrained. A silent drop that changes the answer: refused here.
    **{name: _PLANNED for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar",
                                   "guided_decoding_backend", "guided_whitespace_pattern")},
    # Reasoning.
    "reasoning_effort": _PLANNED,
    "thinking_token_budget": Refused((None, -1)),
    "include_reasoning": Refused((None, True)),
    # Prompt forms and prompt-side outputs.
    "suffix": Refused((None, "")),
    "prompt_embeds": _PLANNED,
    "add_special_tokens": Refused((None, False), completion_unchanged=(None, True)),
    "documents": _PLANNED,
    "chat_template": _PLANNED,
    # Output extras.
    "logprob_token_ids": _EMPTY,
    "return_tokens_as_token_ids": _OFF,
    "return_token_ids": _OFF,
    "return_prompt_text": _OFF,
    "routed_experts_prompt_start": Refused((None, 0)),
    "return_token_offsets": Ignored("vLLM honours it on its render endpoints only"),
    "mm_payload": Ignored("vLLM honours it on its render endpoints only"),
    "return_mm_kwargs": Ignored("vLLM's deprecated alias of mm_payload"),
    # Sampling and scheduling extras.
    "watermarking": _OFF,
    "repetition_detection": _PLANNED,
    "vllm_xargs": _EMPTY,
    "priority": Refused((None, 0)),
    # It changes no answer, but it isolates users' prefix caches: a protection that must not vanish unnoticed.
    "cache_salt": _PLANNED,
    "kv_transfer_params": _PLANNED,
    "ec_transfer_params": _PLANNED,
    "stream_interval": Ignored("groups streamed tokens into fewer chunks; the text is the same"),
    # OpenAI's output modalities and hosted features.
    "audio": _PLANNED,
    "modalities": Refused((None, ["text"])),
    "prediction": _PLANNED,
    "web_search_options": _PLANNED,
    # Metadata: they name, route or record the request, and change nothing in the answer.
    "user": Ignored("names the end user, as vLLM's server ignores it"),
    "request_id": Ignored("the response id comes from the x-request-id header"),
    "session_id": Ignored("routing metadata"),
    "service_tier": Ignored("one tier here"),
    "store": Ignored("nothing is stored"),
    "metadata": Ignored("nothing is stored"),
    "prompt_cache_key": Ignored("prefix caching is automatic"),
    "safety_identifier": Ignored("names the end user"),
}


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")
    endpoint: ClassVar[str] = CHAT

    @model_validator(mode="after")
    def _refuse_unimplemented(self):
        extra = self.model_extra or {}
        for name, value in extra.items():
            rule = UNIMPLEMENTED_FIELDS.get(name)
            if isinstance(rule, Refused) and (message := rule.refusal(name, value, self.endpoint)):
                raise ValueError(message)
        unknown = extra.keys() - UNIMPLEMENTED_FIELDS.keys()
        if unknown:
            # As vLLM's server does with fields it does not know.
            log.debug("ignored request fields: %s", sorted(unknown))
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


class VideoUrl(BaseModel):
    url: str


class VideoPart(BaseModel):
    type: Literal["video_url"]
    video_url: VideoUrl


ContentPart = Annotated[TextPart | ImagePart | VideoPart, Field(discriminator="type")]


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
    tool_calls: list[ToolCall] | None = None


class ToolMessage(BaseModel):
    role: Literal["tool"]
    content: str | list[TextPart]
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class StreamOptions(BaseModel):
    include_usage: bool = False
    # With include_usage (as vLLM reads it): every chunk carries the usage of its choice so far.
    continuous_usage_stats: bool = False

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and self.continuous_usage_stats


TokenId = Annotated[int, Field(**proto_range(_SAMPLING, "allowed_token_ids"))]
LogitBiasKey = Annotated[int, Field(**proto_range(_SAMPLING, "logit_bias"))]


class _Sampling(_Base):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, **proto_range(_SAMPLING, "top_k", ge=-1))
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, **proto_range(_SAMPLING, "max_tokens", ge=1))
    min_tokens: int = Field(0, **proto_range(_SAMPLING, "min_tokens"))
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(**proto_range(_SAMPLING, "stop_token_ids"))]] | None = None
    include_stop_str_in_output: bool = False
    bad_words: list[str] = []
    # vLLM refuses an empty list, which would allow no token at all.
    allowed_token_ids: Annotated[list[TokenId], Field(min_length=1)] | None = None
    # Keys are token ids written as strings (JSON's object keys are strings); vLLM clamps values to [-100, 100].
    logit_bias: dict[LogitBiasKey, Annotated[float, Field(allow_inf_nan=False)]] | None = None
    seed: int | None = Field(None, **proto_range(_SAMPLING, "seed"))
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0, le=2)
    ignore_eos: bool = False
    # Unset: vLLM's default, true.
    skip_special_tokens: bool | None = None
    spaces_between_special_tokens: bool | None = None
    # Several completions of one prompt: vLLM's parallel sampling, one engine request.
    n: int = Field(1, ge=1, le=MAX_COMPLETIONS)
    # The prompt's log-probabilities, returned as vLLM's `prompt_logprobs`; -1: the whole vocabulary.
    prompt_logprobs: int | None = Field(None, **proto_range(_SAMPLING, "prompt_logprobs", ge=-1))
    # Completions: the prompt before each choice's text (and its tokens before the logprobs); chat: the last
    # message before the answer, where it is of the answer's role.
    echo: bool | None = False
    # Constrained decoding through vLLM's structured-output backends; response_format is written over
    # structured_outputs, as vLLM does (gateway/structured_outputs.py).
    response_format: ResponseFormatField | None = None
    structured_outputs: StructuredOutputs | None = None
    # Keep this many of the prompt's tokens (-1: as many as the context takes), cut from truncation_side (unset: the
    # left, keeping the last ones); llm_svc applies vLLM's checks (e.g. larger than the context is a 400).
    truncate_prompt_tokens: int | None = Field(None, **proto_range(llm_pb2.GenerateRequest, "truncate_prompt_tokens",
                                                                   ge=-1))
    truncation_side: Literal["left", "right"] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    # Fields that vLLM's request models refuse, as sent, unless they are JSON numbers (a string "3" included).
    numbers_as_sent: ClassVar[tuple[str, ...]] = ("prompt_logprobs",)

    @model_validator(mode="before")
    @classmethod
    def _checks_vllm_makes_on_the_body_as_sent(cls, data):
        # vLLM's, with its messages, made before the fields are parsed: an empty or null stream_options passes.
        if not isinstance(data, dict):
            return data
        for name in cls.numbers_as_sent:
            if data.get(name) is not None and not isinstance(data[name], (int, float)):
                raise vllm_refusal(f"`{name}` must be an integer.", name, data[name])
        if data.get("stream_options") and not data.get("stream"):
            raise vllm_refusal("Stream options can only be defined when `stream=True`.", "stream_options")
        return data

    @model_validator(mode="after")
    def _prompt_logprobs_need_a_whole_answer(self):
        # vLLM's check, with its message (prompt_logprobs 0 passes it, and streams nothing of them).
        if self.stream and self.prompt_logprobs is not None and self.prompt_logprobs != 0:
            raise vllm_refusal("`prompt_logprobs` are not available when `stream=True`.", "prompt_logprobs")
        return self


class MmProcessorKwargs(BaseModel):
    # Other keys of InternVL's processor are refused by name until they are carried.
    model_config = ConfigDict(extra="forbid")
    # vLLM's name for InternVL's per-image tile limit.
    max_dynamic_patch: int | None = Field(None, **proto_range(llm_pb2.GenerateRequest, "max_tiles", ge=1))


class VideoIoKwargs(BaseModel):
    # Other keys of vLLM's video loader (its backend, frame recovery) are refused by name.
    model_config = ConfigDict(extra="forbid")
    # Frames sampled per video, evenly over the clip (-1 or 0: every frame; vLLM's default 32).
    num_frames: int | None = Field(None, **proto_range(llm_pb2.VideoOptions, "num_frames", ge=-1))
    # At most this many frames per second of the clip (<= 0: no cap).
    fps: float | None = Field(None, allow_inf_nan=False, le=1e6)


class MediaIoKwargs(BaseModel):
    # vLLM's per-request media loading options, keyed by modality; only videos have any here.
    model_config = ConfigDict(extra="forbid")
    video: VideoIoKwargs | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, **proto_range(_SAMPLING, "max_tokens", ge=1))
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    mm_processor_kwargs: MmProcessorKwargs | None = None
    media_io_kwargs: MediaIoKwargs | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    # Passed on as they are: vLLM's request model judges them in llm_svc (gateway/tools.py).
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    numbers_as_sent: ClassVar[tuple[str, ...]] = ("prompt_logprobs", "top_logprobs")

    @model_validator(mode="before")
    @classmethod
    def _top_logprobs_need_logprobs(cls, data):
        # vLLM's check on the body as sent, before the range check, with its message: top_logprobs 0 (or null)
        # passes without logprobs.
        top = data.get("top_logprobs") if isinstance(data, dict) else None
        if isinstance(top, (int, float)) and (top > 0 or top == -1) and not data.get("logprobs"):
            raise vllm_refusal("when using `top_logprobs`, `logprobs` must be set to true.", "top_logprobs")
        return data

    @property
    def requested_max_tokens(self) -> int | None:
        # OpenAI deprecated max_tokens in favour of max_completion_tokens; the newer one wins.
        return self.max_completion_tokens or self.max_tokens


# vLLM's default when a completion request does not say (its CompletionRequest's); chat runs to the context's end.
COMPLETION_DEFAULT_MAX_TOKENS = 16


PromptTokenIds = Annotated[list[Annotated[int, Field(**proto_range(llm_pb2.PromptTokens, "token_ids"))]],
                           Field(min_length=1)]


class CompletionRequest(_Sampling):
    endpoint: ClassVar[str] = COMPLETION
    numbers_as_sent: ClassVar[tuple[str, ...]] = ("prompt_logprobs", "logprobs")
    # vLLM's four forms: text, token ids, and a list of either. Validation leaves a list of one as that one prompt
    # (text or token ids), and a list of several as it is: each is its own Generate call (gateway/fanout.py).
    prompt: str | PromptTokenIds | list[str] | list[PromptTokenIds]
    logprobs: int | None = Field(None, ge=0, le=20)
    max_tokens: int | None = Field(COMPLETION_DEFAULT_MAX_TOKENS, **proto_range(_SAMPLING, "max_tokens", ge=1))

    @field_validator("prompt")
    @classmethod
    def _one_prompt_or_a_few(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) > MAX_PROMPTS:
                raise ValueError(f"'prompt' with {len(prompt)} prompts is more than this server takes in one "
                                 f"request ({MAX_PROMPTS})")
            return prompt[0] if len(prompt) == 1 else prompt
        if not prompt and isinstance(prompt, list):
            raise ValueError("'prompt' must not be empty")
        return prompt

    @property
    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request, in order: one, or the several of a list."""
        several = isinstance(self.prompt, list) and isinstance(self.prompt[0], (str, list))
        return self.prompt if several else [self.prompt]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens
