"""The /tokenize and /detokenize requests as vLLM's server takes them, and their conversion to the proto.

/tokenize has two forms, chosen as vLLM chooses: a body with `messages` is a chat (rendered with the checkpoint's
template, its images expanded to their tokens), any other body a prompt. Every field of vLLM's three request models
is a field here or a row of `REFUSED_FIELDS` (tests/gateway/test_gateway_tokenize.py holds the list to vLLM's);
fields that vLLM does not define are ignored, as vLLM ignores them.
"""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator

from gateway import translate
from gateway.schemas import Message, MmProcessorKwargs, Refused, proto_range
from protos import llm_pb2
from protos.errors import InvalidInput

# Fields of vLLM's tokenize requests not carried, each a 400 naming it unless sent with a value that changes nothing.
REFUSED_FIELDS: dict[str, Refused] = {
    "chat_template": Refused(),  # this server renders with the checkpoint's own template
    "tools": Refused((None, [])),
    "media_io_kwargs": Refused((None, {})),
}


class JsonObject(RootModel[dict[str, Any]]):
    """A body read as a JSON object, before its form is known."""


class _TokenizeBase(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    return_token_strs: bool | None = False

    @model_validator(mode="after")
    def _refuse_fields_not_carried(self):
        for name, value in (self.model_extra or {}).items():
            if name in REFUSED_FIELDS and (message := REFUSED_FIELDS[name].refusal(name, value, "tokenize")):
                raise ValueError(message)
        return self


class TokenizeCompletionRequest(_TokenizeBase):
    prompt: str
    add_special_tokens: bool = True


class TokenizeChatRequest(_TokenizeBase):
    messages: list[Message]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # The chat template writes the special tokens it wants: vLLM adds none on top by default.
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    mm_processor_kwargs: MmProcessorKwargs | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    tokens: list[Annotated[int, Field(**proto_range(llm_pb2.DetokenizeRequest, "token_ids"))]]


def tokenize_request(body: dict) -> TokenizeChatRequest | TokenizeCompletionRequest:
    """Raises pydantic.ValidationError."""
    return (TokenizeChatRequest if "messages" in body else TokenizeCompletionRequest).model_validate(body)


def tokenize_to_proto(request: TokenizeChatRequest | TokenizeCompletionRequest, images: list[bytes],
                      request_id: str) -> llm_pb2.TokenizeRequest:
    common = dict(request_id=request_id, add_special_tokens=request.add_special_tokens,
                  return_token_strs=bool(request.return_token_strs))
    if isinstance(request, TokenizeCompletionRequest):
        return llm_pb2.TokenizeRequest(prompt=request.prompt, **common)
    if translate.video_urls(request):
        # Counting a video's tokens means decoding it; the vision stage does that for generation only.
        raise InvalidInput("video_url parts are not supported by /tokenize on this server")
    tiles = request.mm_processor_kwargs.max_dynamic_patch if request.mm_processor_kwargs else None
    # The chat's messages and template controls are those of a chat completion, and travel the same way.
    return llm_pb2.TokenizeRequest(chat=translate.chat_to_proto(request, images), max_tiles=tiles or 0, **common)


def tokenize_json(response: llm_pb2.TokenizeResponse, return_token_strs: bool) -> dict:
    """vLLM's TokenizeResponse, `token_strs` null unless asked for."""
    tokens = list(response.token_ids)
    return {"count": len(tokens), "max_model_len": response.max_model_len, "tokens": tokens,
            "token_strs": list(response.token_strs) if return_token_strs else None}


def version_json(response: llm_pb2.GetVersionResponse, gateway_version: str) -> dict:
    """vLLM's `{"version": ...}`, and this deployment's own version beside it."""
    return {"version": response.vllm_version, "internvl_dvd_version": gateway_version}


def image_urls(request: TokenizeChatRequest | TokenizeCompletionRequest) -> list[str]:
    return translate.image_urls(request) if isinstance(request, TokenizeChatRequest) else []

