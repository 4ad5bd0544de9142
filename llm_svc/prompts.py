"""Renders a chat into the prompt text exactly as vLLM's own OpenAI server would.

The rendering is vLLM's (its renderer applies the checkpoint's chat template and places one image
placeholder per image: `<image>` for the original layout, `<IMG_CONTEXT>` for the transformers-native
one), fed with image parts that name an embedding by content hash without carrying it. So the text the
engine sees is the text vLLM's monolithic server would build for the same messages, and the embeddings
travel separately, as `multi_modal_data`.
"""

import dataclasses
import json
import re

from vllm.renderers.params import ChatParams, TokenizeParams

from protos import llm_pb2
from protos.errors import InvalidInput

ROLES = ("system", "user", "assistant", "tool")
# vLLM's server refuses a template sent with the request unless started with --trust-request-chat-template, which
# this stage never is. (vLLM's renderer refuses the other variable a request may not set, `tokenize`, itself.)
REQUEST_TEMPLATE_KWARG = "chat_template"
# A text prompt up to this many characters (or a quarter as many token ids) is made into the engine's input on the
# event loop, holding it a millisecond or so: the hand-over to vLLM's tokenizer thread and back (a wake-up each way, the
# GIL taken back and forth) costs more CPU than tokenizing a short prompt does (bench/RESULTS.md). A longer one still
# goes to the thread, so that the streams in flight are not held up for it.
RENDER_IN_PLACE_CHARS = 4096


@dataclasses.dataclass(frozen=True)
class ImageRef:
    content_hash: str


@dataclasses.dataclass(frozen=True)
class VideoRef:
    """A video, placed as vLLM places a `video_url` part: its `<video>` placeholder, expanded into one
    `FrameN: <img>...</img>` per frame when the embeddings arrive."""
    content_hash: str


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    parts: tuple[str | ImageRef | VideoRef, ...]
    tool_calls: tuple[ToolCall, ...] = ()  # an assistant's
    tool_call_id: str = ""  # a tool message's: the call it answers


def to_openai_messages(messages: list[Message], with_images: bool = True) -> list[dict]:
    """OpenAI-style messages whose images are `image_embeds` parts known by uuid only (left out unless
    `with_images`)."""
    out = []
    for message in messages:
        if message.role not in ROLES:
            raise InvalidInput(f"role {message.role!r} is not one of {', '.join(ROLES)}")
        if message.role != "user" and any(isinstance(p, (ImageRef, VideoRef)) for p in message.parts):
            raise InvalidInput(f"images and videos are allowed in user messages only, not in {message.role} messages")
        content = [_content_part(p) for p in message.parts if with_images or isinstance(p, str)]
        # An assistant's tool calls without text: no content at all, as OpenAI clients send it (null).
        no_content = not message.parts and message.tool_calls
        out.append({"role": message.role, "content": None if no_content else content, **_tool_fields(message)})
    return out


def _content_part(part: str | ImageRef | VideoRef) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if isinstance(part, VideoRef):
        return {"type": "video_embeds", "video_embeds": None, "uuid": part.content_hash}
    return {"type": "image_embeds", "image_embeds": None, "uuid": part.content_hash}


def _tool_fields(message: Message) -> dict:
    fields = {}
    if message.tool_calls:
        fields["tool_calls"] = [{"id": call.id, "type": "function",
                                 "function": {"name": call.name, "arguments": call.arguments}}
                                for call in message.tool_calls]
    if message.role == "tool":
        fields["tool_call_id"] = message.tool_call_id
    return fields


@dataclasses.dataclass(frozen=True)
class ChatOptions:
    """How the template renders a chat: vLLM's `add_generation_prompt`, `continue_final_message` and
    `chat_template_kwargs`, with vLLM's defaults."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    template_kwargs: dict = dataclasses.field(default_factory=dict)
    # OpenAI's tool definitions as vLLM hands them to the template (its `tools` variable); None: no tools.
    tools: list[dict] | None = None

    def __post_init__(self):
        if self.add_generation_prompt and self.continue_final_message:
            raise InvalidInput("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        if self.template_kwargs.get(REQUEST_TEMPLATE_KWARG) is not None:
            raise InvalidInput("chat_template_kwargs.chat_template: a chat template sent with the request is refused; "
                               "this server renders with the checkpoint's own")

    def chat_params(self) -> ChatParams:
        # As vLLM's server merges them: the two named options win over the same names in the free-form kwargs, which
        # win over the tools.
        tools = {"tools": self.tools} if self.tools is not None else {}
        return ChatParams(chat_template_kwargs={**tools, **self.template_kwargs,
                                                "add_generation_prompt": self.add_generation_prompt,
                                                "continue_final_message": self.continue_final_message})


def template_kwargs_from_json(text: str) -> dict:
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidInput(f"chat_template_kwargs is not valid JSON: {error}") from None
    if not isinstance(kwargs, dict):
        raise InvalidInput("chat_template_kwargs must be a JSON object")
    return kwargs


def chat_options_from_pb(chat: llm_pb2.Chat) -> ChatOptions:
    return ChatOptions(
        add_generation_prompt=chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True,
        continue_final_message=chat.continue_final_message,
        template_kwargs=template_kwargs_from_json(chat.chat_template_kwargs_json))


@dataclasses.dataclass(frozen=True)
class PromptTruncation:
    """vLLM's truncate_prompt_tokens: keep `tokens` of the prompt (-1: as many as the context takes), cut from `side`
    ("left" keeps the last ones; None: the tokenizer's side, left for generation). `max_tokens`: the request's own
    max_tokens (None: it sent none), the room vLLM's server leaves for the answer; a generation-config default
    filled in later does not count."""

    tokens: int
    side: str | None = None
    max_tokens: int | None = None

    def __post_init__(self):
        if self.tokens < -1:
            raise InvalidInput(f"truncate_prompt_tokens={self.tokens} must be -1 or at least 0")
        if self.side not in (None, "left", "right"):
            raise InvalidInput("`truncation_side` must be either 'left' or 'right'.")


def truncation_from_pb(request: llm_pb2.GenerateRequest) -> PromptTruncation | None:
    if not request.HasField("truncate_prompt_tokens"):
        return None
    max_tokens = request.sampling.max_tokens if request.sampling.HasField("max_tokens") else None
    return PromptTruncation(request.truncate_prompt_tokens, request.truncation_side or None, max_tokens)


class PromptRenderer:
    def __init__(self, renderer):
        """`renderer` is the engine's (`AsyncLLM.renderer`): same template, same tokenizer as the engine."""
        self._renderer = renderer

    def render(self, messages: list[Message], options: ChatOptions = ChatOptions()) -> str:
        if not messages:
            raise InvalidInput("the chat has no messages")
        params = options.chat_params()
        # The template's text: the engine input tokenizes it once, with the image placeholders in it. Token ids
        # here would be decoded back to the same text and thrown away (two passes of the tokenizer per request).
        params.chat_template_kwargs["tokenize"] = False
        try:
            _, prompt = self._renderer.render_messages(to_openai_messages(messages), params)
        except (ValueError, TypeError) as error:
            raise InvalidInput(f"cannot render the chat: {error}") from error
        return prompt["prompt"]

    def decode(self, token_ids: list[int]) -> str:
        """A token-id prompt's text, as vLLM's server decodes it to echo it (special tokens kept)."""
        return self._renderer.get_tokenizer().decode(token_ids)

    def tok_params(self, truncation: PromptTruncation | None) -> TokenizeParams | None:
        """The engine's tokenization with `truncation` applied as vLLM's server applies it (its checks and messages:
        a length over the context is refused); None, the engine's defaults, without it."""
        if truncation is None:
            return None
        # As vLLM's request models build them: max_output_tokens decides what -1 keeps (one token for the answer).
        return dataclasses.replace(self._renderer.default_cmpl_tok_params, truncate_prompt_tokens=truncation.tokens,
                                   truncation_side=truncation.side, max_output_tokens=truncation.max_tokens or 0,
                                   max_total_tokens_param="max_model_len", max_output_tokens_param="max_tokens")

    async def engine_input(self, prompt: dict, tok_params: TokenizeParams | None = None) -> dict:
        """Tokenizes `{"prompt", "multi_modal_data", "multi_modal_uuids"}` (or takes `{"prompt_token_ids"}` as they
        are), truncates it where `tok_params` say so and expands its image placeholders into what the engine takes;
        refuses prompts over the context with vLLM's own message."""
        return await render_for_engine(self._renderer, prompt, tok_params)


async def render_for_engine(renderer, prompt: dict, tok_params: TokenizeParams | None) -> dict:
    """vLLM's renderer's engine input for one prompt. Its truncation cuts the tokens before the image and video
    placeholders expand, and where that cuts a placeholder out its processor fails an assertion (vLLM's own server
    answers 500): here that is the request's error, in the words vLLM has for a truncation that splits an item."""
    try:
        if _renders_in_place(prompt):
            (engine_input,) = renderer.render_cmpl([prompt], tok_params)
        else:
            (engine_input,) = await renderer.render_cmpl_async([prompt], tok_params)
    except AssertionError as error:
        cut = re.search(r"prompt replacement for mm_items\['(\w+)'\]", str(error))
        if cut is None or tok_params is None or tok_params.truncate_prompt_tokens is None:
            raise
        raise InvalidInput(
            f"truncate_prompt_tokens={tok_params.truncate_prompt_tokens} would drop a(n) {cut[1]} item's placeholder. "
            "Multimodal placeholders expand after truncation is applied, so the limit must leave every multimodal "
            "item intact. Please raise truncate_prompt_tokens or shorten the prompt.") from None
    return engine_input


def _renders_in_place(prompt: dict) -> bool:
    """A short prompt without images or videos (their processor's work stays on vLLM's thread)."""
    if "multi_modal_data" in prompt:
        return False
    if (text := prompt.get("prompt")) is not None:
        return len(text) <= RENDER_IN_PLACE_CHARS
    return len(prompt.get("prompt_token_ids") or ()) <= RENDER_IN_PLACE_CHARS // 4
