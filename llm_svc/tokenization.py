"""Tokenize and Detokenize: the token ids the engine would get for a prompt or a chat, and token ids back to text,
as vLLM's own server's /tokenize and /detokenize give them.

A chat is rendered as Generate renders it, and each image placeholder is expanded by vLLM's renderer to as many
tokens as the engine would take for that image; the image's count comes from its header (`admission`), so
tokenizing a chat with images costs the vision stage nothing, and no image is decoded. vLLM's /tokenize sets no
length limit (a prompt over the context is still tokenized), and neither does this.
"""

import dataclasses

from vllm.exceptions import VLLMClientError
from vllm.inputs import TokensPrompt
from vllm.renderers import TokenizeParams

from llm_svc.admission import AdmissionCheck
from llm_svc.limits import RequestLimits
from llm_svc.prompts import ChatOptions, Message, PromptRenderer
from llm_svc.vision_client import ImageBlob
from protos.errors import InvalidInput


@dataclasses.dataclass(frozen=True)
class TokenizeInput:
    request_id: str
    messages: list[Message] | None  # a chat, or
    prompt: str | None  # a raw prompt
    images: list[ImageBlob]  # in the order their placeholders appear
    add_special_tokens: bool | None  # None: vLLM's default for the form (a prompt: true, a chat: false)
    return_token_strs: bool
    max_tiles: int
    chat_options: ChatOptions = dataclasses.field(default_factory=ChatOptions)

    @property
    def special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.messages is None


@dataclasses.dataclass(frozen=True)
class Tokens:
    token_ids: list[int]
    token_strs: list[str] | None


class TokenizationService:
    def __init__(self, renderer, prompts: PromptRenderer, admission: AdmissionCheck, limits: RequestLimits):
        """`renderer`: the engine's (`AsyncLLM.renderer`), so the tokenizer and template are the engine's own."""
        self._renderer = renderer
        self._prompts = prompts
        self._admission = admission
        self._limits = limits

    async def tokenize(self, request: TokenizeInput) -> Tokens:
        self._limits.check_images(request.images)
        counts = self._admission.count(request.images, request.max_tiles)
        unknown = [i for i, count in enumerate(counts) if not count.exact]
        if unknown:
            # Generate may go on with a lower bound (the engine counts again); an answer that is a count may not.
            raise InvalidInput(f"images {unknown} are named by content hash and their size is unknown here: send "
                               f"their bytes to count their tokens")
        # As vLLM's /tokenize builds them: no context limit, no room kept for output.
        params = TokenizeParams(max_total_tokens=None, max_output_tokens=0,
                                add_special_tokens=request.special_tokens)
        try:
            text = (self._prompts.render(request.messages, request.chat_options) if request.messages is not None
                    else request.prompt)
            engine_input = await self._admission.expand(request.request_id, text, counts, params)
        except (VLLMClientError, ValueError) as error:  # vLLM's verdict on the input (placeholders, template, ...)
            raise InvalidInput(str(error)) from error
        token_ids = list(engine_input["prompt_token_ids"])
        token_strs = (self._renderer.get_tokenizer().convert_ids_to_tokens(token_ids)
                      if request.return_token_strs else None)
        return Tokens(token_ids, token_strs)

    async def detokenize(self, token_ids: list[int]) -> str:
        # vLLM's /detokenize path, so that what it accepts and refuses is vLLM's.
        try:
            prompt = await self._renderer.tokenize_prompt_async(
                TokensPrompt(prompt_token_ids=token_ids),
                TokenizeParams(max_total_tokens=None, max_output_tokens=0, needs_detokenization=True))
        except (VLLMClientError, ValueError) as error:
            raise InvalidInput(str(error)) from error
        return prompt["prompt"]
