"""Renders a chat into the prompt text exactly as vLLM's own OpenAI server would.

The rendering is vLLM's (its renderer applies the checkpoint's chat template and places one image
placeholder per image: `<image>` for the original layout, `<IMG_CONTEXT>` for the transformers-native
one), fed with image parts that name an embedding by content hash without carrying it. So the text the
engine sees is the text vLLM's monolithic server would build for the same messages, and the embeddings
travel separately, as `multi_modal_data`.
"""

import dataclasses

from vllm.renderers.params import ChatParams

from protos.errors import InvalidInput

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ImageRef:
    content_hash: str


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    parts: tuple[str | ImageRef, ...]


def to_openai_messages(messages: list[Message]) -> list[dict]:
    """OpenAI-style messages whose images are `image_embeds` parts known by uuid only."""
    out = []
    for message in messages:
        if message.role not in ROLES:
            raise InvalidInput(f"role {message.role!r} is not one of {', '.join(ROLES)}")
        if message.role != "user" and any(isinstance(p, ImageRef) for p in message.parts):
            raise InvalidInput(f"images are allowed in user messages only, not in {message.role} messages")
        content = [{"type": "text", "text": p} if isinstance(p, str)
                   else {"type": "image_embeds", "image_embeds": None, "uuid": p.content_hash}
                   for p in message.parts]
        out.append({"role": message.role, "content": content})
    return out


class PromptRenderer:
    def __init__(self, renderer):
        """`renderer` is the engine's (`AsyncLLM.renderer`): same template, same tokenizer as the engine."""
        self._renderer = renderer
        self._params = ChatParams(chat_template_kwargs={"add_generation_prompt": True,
                                                        "continue_final_message": False})

    def render(self, messages: list[Message]) -> str:
        if not messages:
            raise InvalidInput("the chat has no messages")
        try:
            _, prompt = self._renderer.render_messages(to_openai_messages(messages), self._params)
        except (ValueError, TypeError) as error:
            raise InvalidInput(f"cannot render the chat: {error}") from error
        if "prompt" in prompt:
            return prompt["prompt"]
        return self._renderer.get_tokenizer().decode(prompt["prompt_token_ids"])

    async def engine_input(self, prompt: dict) -> dict:
        """Tokenizes `{"prompt", "multi_modal_data", "multi_modal_uuids"}` and expands its image placeholders
        into what the engine takes; refuses prompts over the context with vLLM's own message."""
        (engine_input,) = await self._renderer.render_cmpl_async([prompt])
        return engine_input
