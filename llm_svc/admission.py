"""Refuse early: the engine's own admission checks, run on a request before its images are encoded.

vLLM's renderer and input processor (the code that admits every engine request) are fed the request's
prompt with stand-ins for the image embeddings: zero-stride tensors of the real shape, `[tokens, hidden]`,
that hold no memory. So the prompt length, with every image placeholder expanded to
`<img><IMG_CONTEXT>*N</img>` whatever the layout and tokenizer, and the refusal's message are vLLM's own;
only each image's N is ours (`image_tokens`). The engine checks the real request again, as the last line
of defence: this filter only keeps the vision stage from encoding images for a request that cannot run.

The input it checked is the engine's input but for the stand-ins: once the real embeddings are in,
`with_embeddings` puts them in the stand-ins' place instead of rendering and tokenizing the prompt again (3 ms of
an image's time to first token here); `tests/llm_svc/test_llm_admission.py` holds it equal to a fresh render.
"""

import dataclasses
import time

import torch
from vllm.exceptions import VLLMClientError
from vllm.multimodal.inputs import MultiModalKwargsItem, MultiModalKwargsItems

from llm_svc.image_tokens import ImageTokenCounter, ImageTokens
from llm_svc.prompts import render_for_engine
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
                    sampling, tok_params=None) -> dict:
        """The engine's input for the prompt, with stand-ins for the images (after the truncation `tok_params` ask
        for); raises InvalidInput with vLLM's message where the engine would refuse the request."""
        counts = self._counter.count(images, max_tiles)
        try:
            engine_input = await self.expand(request_id, text, counts, tok_params)
            self._input_processor.process_inputs(request_id, engine_input, sampling, self._supported_tasks)
        except (VLLMClientError, ValueError) as error:
            raise InvalidInput(client_message(error) + _lower_bound_note(counts)) from error
        return engine_input

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
        return await render_for_engine(self._renderer, prompt, tok_params)


def with_embeddings(checked: dict, embeddings: list[torch.Tensor], uuids: list[str]) -> dict | None:
    """The engine's input for the real images from the input `check` passed: its stand-ins replaced by `embeddings`
    and named `uuids`. None where they cannot simply be swapped (a shape differs: an image counted at a lower
    bound; or vLLM's processor made more of an image than its embeddings): the prompt is then rendered afresh."""
    images = checked.get("mm_kwargs", {}).get("image") if checked.get("type") == "multimodal" else None
    if images is None or not len(images) == len(embeddings) == len(uuids):
        return None
    swapped = []
    for item, tensor in zip(images, embeddings):
        if len(item) != 1:
            return None
        [(key, stand_in)] = item.items()
        if not isinstance(stand_in.data, torch.Tensor) or stand_in.data.shape != tensor.shape:
            return None
        swapped.append(MultiModalKwargsItem({key: dataclasses.replace(stand_in, data=tensor)}))
    return dict(checked, mm_kwargs=MultiModalKwargsItems({**checked["mm_kwargs"], "image": swapped}),
                mm_hashes={**checked["mm_hashes"], "image": list(uuids)}, arrival_time=time.time())


def _lower_bound_note(counts: list[ImageTokens]) -> str:
    guessed = [i for i, c in enumerate(counts) if not c.exact]
    if not guessed:
        return ""
    return (f" (images {guessed} are named by content hash and their size is unknown here: each was counted at "
            f"the fewest tokens an image can take, {counts[guessed[0]].tokens})")
