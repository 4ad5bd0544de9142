"""Pure conversions between OpenAI's JSON and the LanguageModel contract: requests in, chunks and responses out.

Nothing here does I/O: image bytes arrive already loaded, in the order `image_urls` lists them.
"""

import dataclasses
import json

from gateway.schemas import ChatCompletionRequest, CompletionRequest, ImagePart, TextPart
from protos import llm_pb2
from protos.errors import InvalidInput

_ROLES = {"system": llm_pb2.ROLE_SYSTEM, "developer": llm_pb2.ROLE_SYSTEM, "user": llm_pb2.ROLE_USER,
          "assistant": llm_pb2.ROLE_ASSISTANT}
# The strings vLLM's OpenAI server sends for each reason.
FINISH_REASONS = {llm_pb2.FINISH_REASON_STOP: "stop", llm_pb2.FINISH_REASON_LENGTH: "length",
                  llm_pb2.FINISH_REASON_ABORT: "abort"}


@dataclasses.dataclass(frozen=True)
class ResponseMeta:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str


def sampling_params(request: ChatCompletionRequest | CompletionRequest, max_tokens_limit: int,
                    top_logprobs: int | None) -> llm_pb2.SamplingParams:
    max_tokens = request.requested_max_tokens
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise InvalidInput(f"max_tokens={max_tokens} is above this server's limit of {max_tokens_limit}")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    fields = dict(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                  min_p=request.min_p, max_tokens=max_tokens, seed=request.seed,
                  presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                  repetition_penalty=request.repetition_penalty, logprobs=top_logprobs, n=request.n,
                  skip_special_tokens=request.skip_special_tokens,
                  spaces_between_special_tokens=request.spaces_between_special_tokens)
    # Unset fields stay unset on the wire, so llm_svc applies vLLM's defaults.
    return llm_pb2.SamplingParams(
        stop=stop, stop_token_ids=request.stop_token_ids or [], ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens, bad_words=request.bad_words,
        allowed_token_ids=request.allowed_token_ids or [], logit_bias=request.logit_bias or {},
        include_stop_str_in_output=request.include_stop_str_in_output,
        **{k: v for k, v in fields.items() if v is not None})


def image_urls(request: ChatCompletionRequest) -> list[str]:
    """The request's image URLs in message order: the order their bytes must be passed to `chat_to_proto`."""
    return [part.image_url.url for message in request.messages if isinstance(message.content, list)
            for part in message.content if isinstance(part, ImagePart)]


def chat_to_proto(request: ChatCompletionRequest, images: list[bytes]) -> llm_pb2.Chat:
    remaining = iter(images)
    messages = []
    for message in request.messages:
        content = message.content
        if content is None or isinstance(content, str):
            parts = [llm_pb2.ContentPart(text=content or "")]
        else:
            parts = [llm_pb2.ContentPart(text=part.text) if isinstance(part, TextPart)
                     else llm_pb2.ContentPart(image=llm_pb2.ImagePart(data=next(remaining)))
                     for part in content]
        messages.append(llm_pb2.ChatMessage(role=_ROLES[message.role], content=parts))
    assert next(remaining, None) is None, "more images than image parts"
    template_kwargs = json.dumps(request.chat_template_kwargs) if request.chat_template_kwargs else ""
    return llm_pb2.Chat(messages=messages, add_generation_prompt=request.add_generation_prompt,
                        continue_final_message=request.continue_final_message,
                        chat_template_kwargs_json=template_kwargs)


def chat_generate_request(request: ChatCompletionRequest, images: list[bytes], request_id: str,
                          max_tokens_limit: int) -> llm_pb2.GenerateRequest:
    top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
    tiles = request.mm_processor_kwargs.max_dynamic_patch if request.mm_processor_kwargs else None
    return llm_pb2.GenerateRequest(request_id=request_id, chat=chat_to_proto(request, images),
                                   sampling=sampling_params(request, max_tokens_limit, top_logprobs),
                                   max_tiles=tiles or 0)


def completion_generate_request(request: CompletionRequest, request_id: str,
                                max_tokens_limit: int) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(request_id=request_id, prompt=request.prompt_text,
                                   sampling=sampling_params(request, max_tokens_limit, request.logprobs))


def usage_json(usage: llm_pb2.Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def finish_reason(response: llm_pb2.GenerateResponse) -> str | None:
    return FINISH_REASONS.get(response.finish_reason)


def _stop_reason(response: llm_pb2.GenerateResponse) -> str | None:
    return response.stop_reason or None


def _token_json(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def chat_logprobs(response: llm_pb2.GenerateResponse) -> list[dict]:
    """OpenAI's `logprobs.content` entries for the tokens of one response message."""
    return [{**_token_json(lp.token, lp.logprob), "top_logprobs": [_token_json(t.token, t.logprob) for t in lp.top]}
            for lp in response.logprobs]


def completion_logprobs(responses: list[llm_pb2.GenerateResponse], text_offset: int) -> dict:
    """The legacy completions logprobs object; `text_offset` is where these tokens start in the whole text."""
    tokens, offsets, logprobs, tops = [], [], [], []
    for lp in (lp for r in responses for lp in r.logprobs):
        tokens.append(lp.token)
        offsets.append(text_offset)
        text_offset += len(lp.token)
        logprobs.append(lp.logprob)
        tops.append({t.token: t.logprob for t in lp.top})
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _chunk(meta: ResponseMeta, obj: str, choices: list[dict]) -> dict:
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model, "choices": choices}


def chat_role_chunk(meta: ResponseMeta) -> dict:
    """The first chunk of a chat stream, as OpenAI and vLLM send it: the role and empty content."""
    delta = {"role": "assistant", "content": ""}
    return _chunk(meta, "chat.completion.chunk",
                  [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}])


def chat_chunk(response: llm_pb2.GenerateResponse, meta: ResponseMeta, with_logprobs: bool) -> dict | None:
    """The SSE chunk for one response message; None when it carries nothing the client would see."""
    reason = finish_reason(response)
    if not response.text and reason is None and not response.logprobs:
        return None
    choice = {"index": 0, "delta": {"content": response.text} if response.text else {},
              "logprobs": {"content": chat_logprobs(response)} if with_logprobs else None,
              "finish_reason": reason}
    if reason is not None:
        choice["stop_reason"] = _stop_reason(response)
    return _chunk(meta, "chat.completion.chunk", [choice])


def usage_chunk(meta: ResponseMeta, obj: str, usage: llm_pb2.Usage) -> dict:
    """The last chunk of a stream when `stream_options.include_usage` is set: no choices, only usage."""
    return {**_chunk(meta, obj, []), "usage": usage_json(usage)}


def chat_completion(responses: list[llm_pb2.GenerateResponse], meta: ResponseMeta, with_logprobs: bool) -> dict:
    last = responses[-1]
    choice = {"index": 0, "message": {"role": "assistant", "content": "".join(r.text for r in responses)},
              "logprobs": {"content": [e for r in responses for e in chat_logprobs(r)]} if with_logprobs else None,
              "finish_reason": finish_reason(last), "stop_reason": _stop_reason(last)}
    return {**_chunk(meta, "chat.completion", [choice]), "usage": usage_json(last.usage)}


def completion_chunk(response: llm_pb2.GenerateResponse, meta: ResponseMeta, with_logprobs: bool,
                     text_offset: int) -> dict | None:
    reason = finish_reason(response)
    if not response.text and reason is None and not response.logprobs:
        return None
    choice = {"index": 0, "text": response.text,
              "logprobs": completion_logprobs([response], text_offset) if with_logprobs else None,
              "finish_reason": reason}
    if reason is not None:
        choice["stop_reason"] = _stop_reason(response)
    return _chunk(meta, "text_completion", [choice])


def completion(responses: list[llm_pb2.GenerateResponse], meta: ResponseMeta, with_logprobs: bool) -> dict:
    last = responses[-1]
    choice = {"index": 0, "text": "".join(r.text for r in responses),
              "logprobs": completion_logprobs(responses, 0) if with_logprobs else None,
              "finish_reason": finish_reason(last), "stop_reason": _stop_reason(last)}
    return {**_chunk(meta, "text_completion", [choice]), "usage": usage_json(last.usage)}
