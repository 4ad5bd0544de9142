"""Refuse early: the engine's own admission checks, run on a request before its images are encoded.

vLLM's renderer and input processor (the code that admits every engine request) are fed the request's
prompt with stand-ins for the image embeddings: zero-stride tensors of the real shape, `[tokens, hidden]`,
that hold no memory. So the prompt length, with every image placeholder expanded to
`<img><IMG_CONTEXT>*N</img>` whatever the layout and tokenizer, and the refusal's message are vLLM's own;
only each image's N is ours (`image_tokens`). The engine checks the real request again, as the last line
of defence: this filter only keeps the vision stage from encoding images for a request that cannot run.
"""

import torch
from vllm.exceptions import VLLMClientError

from llm_svc.image_tokens import ImageTokenCounter, ImageTokens
from llm_svc.vision_client import ImageBlob
from llm_svc.vllm_messages import client_message
from protos.errors import InvalidInput


class AdmissionCheck:
    def __init__(self, renderer, input_processor, supported_tasks: tuple, counter: ImageTokenCounter,
                 hidden_size: int):
        """`renderer`, `input_processor`, `supported_tasks`: the engine's (`AsyncLLM.renderer`, ...)."""
        self._renderer = renderer
        self._input_processor = input_processor
        self._supported_tasks = supported_tasks
        self._counter = counter
        self._hidden_size = hidden_size

    async def check(self, request_id: str, text: str, images: list[ImageBlob], max_tiles: int,
                    sampling, tok_params=None) -> int:
        """The prompt's length as the engine will count it (after the truncation `tok_params` ask for); raises
        InvalidInput with vLLM's message where the engine would refuse the request."""
        counts = self._counter.count(images, max_tiles)
        try:
            engine_input = await self.expand(request_id, text, counts, tok_params)
            self._input_processor.process_inputs(request_id, engine_input, sampling, self._supported_tasks)
        except (VLLMClientError, ValueError) as error:
            raise InvalidInput(client_message(error) + _lower_bound_note(counts)) from error
        return len(engine_input["prompt_token_ids"])

    def count(self, images: list[ImageBlob], max_tiles: int) -> list[ImageTokens]:
        return self._counter.count(images, max_tiles)

    async def expand(self, request_id: str, text: str, counts: list[ImageTokens], tok_params=None) -> dict:
        """The engine's input for `text`, each image placeholder expanded to its image's `counts[i].tokens`, by
        vLLM's renderer (`tok_params`: a `vllm.renderers.TokenizeParams`, or None for the engine's defaults)."""
        prompt = {"prompt": text}
        if counts:
            # [tokens, hidden] views of one element: vLLM reads their length, never their values.
            prompt["multi_modal_data"] = {"image": [torch.zeros(1, 1).expand(c.tokens, self._hidden_size)
                                                    for c in counts]}
            # Names of their own, so that no cache could ever mistake a stand-in for an image.
            prompt["multi_modal_uuids"] = {"image": [f"{request_id}-admission-{i}" for i in range(len(counts))]}
        (engine_input,) = await self._renderer.render_cmpl_async([prompt], tok_params)
        return engine_input


def _lower_bound_note(counts: list[ImageTokens]) -> str:
    guessed = [i for i, c in enumerate(counts) if not c.exact]
    if not guessed:
        return ""
    return (f" (images {guessed} are named by content hash and their size is unknown here: each was counted at "
            f"the fewest tokens an image can take, {counts[guessed[0]].tokens})")
