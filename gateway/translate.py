"""Pure conversions between OpenAI's JSON and the LanguageModel contract: requests in, chunks and responses out.

Nothing here does I/O: image bytes arrive already loaded, in the order `image_urls` lists them.
"""

import dataclasses
import json
import math

from gateway.schemas import ChatCompletionRequest, CompletionRequest, ImagePart, TextPart, VideoPart
from gateway.structured_outputs import structured_outputs_to_proto
from gateway.tools import parsed_delta_json, tool_call_json, tool_calls_to_proto, tools_to_proto
from protos import llm_pb2
from protos.errors import InvalidInput

_ROLES = {"system": llm_pb2.ROLE_SYSTEM, "developer": llm_pb2.ROLE_SYSTEM, "user": llm_pb2.ROLE_USER,
          "assistant": llm_pb2.ROLE_ASSISTANT, "tool": llm_pb2.ROLE_TOOL}
# The strings vLLM's OpenAI server sends for each reason.
FINISH_REASONS = {llm_pb2.FINISH_REASON_STOP: "stop", llm_pb2.FINISH_REASON_LENGTH: "length",
                  llm_pb2.FINISH_REASON_ABORT: "abort", llm_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls"}


@dataclasses.dataclass(frozen=True)
class ResponseMeta:
    """What every chunk of one response repeats."""

    id: str
    created: int
    model: str


def sampling_params(request: ChatCompletionRequest | CompletionRequest, max_tokens_limit: int,
                    top_logprobs: int | None, prompt_logprobs: int | None = None) -> llm_pb2.SamplingParams:
    max_tokens = request.requested_max_tokens
    if max_tokens is not None and max_tokens > max_tokens_limit:
        raise InvalidInput(f"max_tokens={max_tokens} is above this server's limit of {max_tokens_limit}")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    fields = dict(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                  min_p=request.min_p, max_tokens=max_tokens, seed=request.seed,
                  presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                  repetition_penalty=request.repetition_penalty, logprobs=top_logprobs, n=request.n,
                  prompt_logprobs=prompt_logprobs,
                  skip_special_tokens=request.skip_special_tokens,
                  spaces_between_special_tokens=request.spaces_between_special_tokens,
                  structured_outputs=structured_outputs_to_proto(request.structured_outputs, request.response_format))
    # Unset fields stay unset on the wire, so llm_svc applies vLLM's defaults.
    return llm_pb2.SamplingParams(
        stop=stop, stop_token_ids=request.stop_token_ids or [], ignore_eos=request.ignore_eos,
        min_tokens=request.min_tokens, bad_words=request.bad_words,
        allowed_token_ids=request.allowed_token_ids or [], logit_bias=request.logit_bias or {},
        include_stop_str_in_output=request.include_stop_str_in_output,
        **{k: v for k, v in fields.items() if v is not None})


def prompt_controls(request: ChatCompletionRequest | CompletionRequest) -> dict:
    """The GenerateRequest fields both endpoints fill alike: truncation, and usage on every streamed chunk."""
    controls = dict(truncation_side=request.truncation_side or "",
                    continuous_usage=bool(request.stream and request.stream_options
                                          and request.stream_options.continuous_usage))
    if request.truncate_prompt_tokens is not None:
        controls["truncate_prompt_tokens"] = request.truncate_prompt_tokens
    return controls


def image_urls(request: ChatCompletionRequest) -> list[str]:
    """The request's image URLs in message order: the order their bytes must be passed to `chat_to_proto`."""
    return [part.image_url.url for message in request.messages if isinstance(message.content, list)
            for part in message.content if isinstance(part, ImagePart)]


def video_urls(request: ChatCompletionRequest) -> list[str]:
    """The request's video URLs in message order: the order their bytes must be passed to `chat_to_proto`."""
    return [part.video_url.url for message in request.messages if isinstance(message.content, list)
            for part in message.content if isinstance(part, VideoPart)]


def video_options(request: ChatCompletionRequest) -> llm_pb2.VideoOptions | None:
    video = request.media_io_kwargs.video if request.media_io_kwargs else None
    return llm_pb2.VideoOptions(num_frames=video.num_frames, fps=video.fps) if video else None


def _media_part(part, images, videos) -> llm_pb2.ContentPart:
    if isinstance(part, TextPart):
        return llm_pb2.ContentPart(text=part.text)
    if isinstance(part, VideoPart):
        return llm_pb2.ContentPart(video=llm_pb2.VideoPart(data=next(videos)))
    return llm_pb2.ContentPart(image=llm_pb2.ImagePart(data=next(images)))


def chat_to_proto(request: ChatCompletionRequest, images: list[bytes], videos: list[bytes] = ()) -> llm_pb2.Chat:
    remaining = iter(images)
    remaining_videos = iter(videos)
    messages = []
    for message in request.messages:
        content = message.content
        tool_calls = tool_calls_to_proto(getattr(message, "tool_calls", None))
        if content is None and tool_calls:
            parts = []  # no content at all: the template sees null, as vLLM's server passes it
        elif content is None or isinstance(content, str):
            parts = [llm_pb2.ContentPart(text=content or "")]
        else:
            parts = [_media_part(part, remaining, remaining_videos) for part in content]
        messages.append(llm_pb2.ChatMessage(role=_ROLES[message.role], content=parts, tool_calls=tool_calls,
                                            tool_call_id=getattr(message, "tool_call_id", "")))
    assert next(remaining, None) is None, "more images than image parts"
    assert next(remaining_videos, None) is None, "more videos than video parts"
    template_kwargs = json.dumps(request.chat_template_kwargs) if request.chat_template_kwargs else ""
    return llm_pb2.Chat(messages=messages, add_generation_prompt=request.add_generation_prompt,
                        continue_final_message=request.continue_final_message,
                        chat_template_kwargs_json=template_kwargs,
                        tools=tools_to_proto(getattr(request, "tools", None), getattr(request, "tool_choice", None),
                                             getattr(request, "parallel_tool_calls", None)))


def chat_generate_request(request: ChatCompletionRequest, images: list[bytes], request_id: str,
                          max_tokens_limit: int, videos: list[bytes] = ()) -> llm_pb2.GenerateRequest:
    top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
    # As vLLM: echo asks for the prompt's log-probabilities too, top_logprobs of them (0 when absent).
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is None and request.echo:
        prompt_logprobs = request.top_logprobs or 0
    tiles = request.mm_processor_kwargs.max_dynamic_patch if request.mm_processor_kwargs else None
    return llm_pb2.GenerateRequest(request_id=request_id, chat=chat_to_proto(request, images, videos),
                                   sampling=sampling_params(request, max_tokens_limit, top_logprobs,
                                                            prompt_logprobs),
                                   max_tiles=tiles or 0, parse_at_end=not request.stream,
                                   video_options=video_options(request), **prompt_controls(request))


def completion_generate_requests(request: CompletionRequest, request_id: str,
                                 max_tokens_limit: int) -> list[llm_pb2.GenerateRequest]:
    """One Generate call per prompt; several run as `<request_id>-<prompt index>`, as vLLM's server names them."""
    prompts = request.prompts
    if len(prompts) == 1:
        return [completion_generate_request(request, request_id, max_tokens_limit)]
    return [completion_generate_request(request, f"{request_id}-{i}", max_tokens_limit, prompt)
            for i, prompt in enumerate(prompts)]


def completion_generate_request(request: CompletionRequest, request_id: str, max_tokens_limit: int,
                                prompt: str | list[int] | None = None) -> llm_pb2.GenerateRequest:
    """The call for `prompt`, one of the request's; None: the request's only prompt."""
    if prompt is None:
        (prompt,) = request.prompts
    # As vLLM: echo with logprobs asks for the prompt's log-probabilities, to show them before the answer's.
    prompt_logprobs = request.prompt_logprobs
    if prompt_logprobs is None and request.echo:
        prompt_logprobs = request.logprobs
    prompt = ({"prompt": prompt} if isinstance(prompt, str)
              else {"prompt_tokens": llm_pb2.PromptTokens(token_ids=prompt)})
    return llm_pb2.GenerateRequest(request_id=request_id, **prompt, return_prompt_text=bool(request.echo),
                                   sampling=sampling_params(request, max_tokens_limit, request.logprobs,
                                                            prompt_logprobs), **prompt_controls(request))


def response_role(request: ChatCompletionRequest) -> str:
    """The role vLLM gives the answer: the assistant's, or, without a generation prompt, the last message's."""
    return "assistant" if request.add_generation_prompt else request.messages[-1].role


def chat_echo_text(request: ChatCompletionRequest) -> str:
    """What vLLM's chat `echo` puts before each answer: the last message's text, where it has the answer's role."""
    last = request.messages[-1]
    if not request.echo or last.role != response_role(request) or not last.content:
        return ""
    if isinstance(last.content, str):
        return last.content
    return "\n".join(part.text for part in last.content if isinstance(part, TextPart))


def usage_json(usage: llm_pb2.Usage, streamed: bool = False) -> dict:
    """A response's usage; a stream's leaves the cached tokens out, as vLLM's server does (without its
    --enable-prompt-tokens-details)."""
    body = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}
    if not streamed:
        body["prompt_tokens_details"] = {"cached_tokens": usage.cached_tokens}
    if usage.HasField("reasoning_tokens"):  # as vLLM's server reports them when it has a reasoning parser
        body["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return body


def running_usage_json(choice_usage: llm_pb2.Usage, chat: bool, before_tokens: bool = False) -> dict:
    """vLLM's continuous usage stats on one chunk: its choice's usage so far (`before_tokens`: a chunk sent before
    any token, a chat's role or echo). Chat chunks show completion_tokens_details, null without a reasoning parser."""
    completion = 0 if before_tokens else choice_usage.completion_tokens
    body = {"prompt_tokens": choice_usage.prompt_tokens, "completion_tokens": completion,
            "total_tokens": choice_usage.prompt_tokens + completion}
    if chat:
        reasoning = 0 if before_tokens else choice_usage.reasoning_tokens
        body["completion_tokens_details"] = ({"reasoning_tokens": reasoning}
                                             if choice_usage.HasField("reasoning_tokens") else None)
    return body


def finish_reason(response: llm_pb2.GenerateResponse) -> str | None:
    return FINISH_REASONS.get(response.finish_reason)


def _stop_reason(response: llm_pb2.GenerateResponse) -> str | None:
    return response.stop_reason or None


# vLLM's stand-in for -inf, which JSON cannot carry.
LOWEST_LOGPROB = -9999.0


def _clamped(logprob: float) -> float:
    """-inf (a token masked by a grammar or a bias) and NaN as vLLM's floor: JSON has neither."""
    return LOWEST_LOGPROB if math.isnan(logprob) else max(logprob, LOWEST_LOGPROB)


def _token_json(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": _clamped(logprob), "bytes": list(token.encode())}


def chat_logprobs(response: llm_pb2.GenerateResponse) -> list[dict]:
    """OpenAI's `logprobs.content` entries for the tokens of one response message."""
    return [{**_token_json(lp.token, lp.logprob), "top_logprobs": [_token_json(t.token, t.logprob) for t in lp.top]}
            for lp in response.logprobs]


# One token of the legacy completions logprobs: its text, its log-probability and its top alternatives by text
# (both None for a prompt's first token).
CompletionToken = tuple[str, float | None, dict[str, float] | None]


def _completion_top(token_id: int, token: str, logprob: float, top, limit: int | None = None) -> dict[str, float]:
    """As vLLM lists them: the token itself first, then the alternatives best first, `limit` entries at most."""
    ranked = [(token, logprob), *((t.token, t.logprob) for t in top if t.token_id != token_id)]
    return {text: _clamped(value) for text, value in ranked[:limit]}


def generated_tokens(response: llm_pb2.GenerateResponse) -> list[CompletionToken]:
    return [(lp.token, _clamped(lp.logprob), _completion_top(lp.token_id, lp.token, lp.logprob, lp.top))
            for lp in response.logprobs]


def echoed_prompt_tokens(prompt_logprobs, top_logprobs: int) -> list[CompletionToken]:
    """The prompt's tokens as `echo` shows them before the answer's, `top_logprobs` alternatives each."""
    return [(p.token, None, None) if not p.HasField("logprob") else
            (p.token, _clamped(p.logprob), _completion_top(p.token_id, p.token, p.logprob, p.top, top_logprobs + 1))
            for p in prompt_logprobs]


def completion_logprobs(tokens: list[CompletionToken], text_offset: int) -> dict:
    """The legacy completions logprobs object; `text_offset` is where these tokens start in the whole text."""
    offsets = []
    for token, _, _ in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return {"tokens": [t[0] for t in tokens], "token_logprobs": [t[1] for t in tokens],
            "top_logprobs": [t[2] for t in tokens], "text_offset": offsets}


def prompt_logprobs_json(prompt_logprobs) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, then {token id: {logprob, rank,
    decoded_token}} for the prompt token and the most likely tokens at its position."""
    out = []
    for p in prompt_logprobs:
        if not p.HasField("logprob"):
            out.append(None)
            continue
        entries = {str(p.token_id): {"logprob": _clamped(p.logprob), "rank": p.rank, "decoded_token": p.token}}
        for rank, t in enumerate(p.top, start=1):
            entries.setdefault(str(t.token_id), {"logprob": _clamped(t.logprob), "rank": rank,
                                                 "decoded_token": t.token})
        out.append(entries)
    return out


def by_choice(responses: list[llm_pb2.GenerateResponse]) -> list[list[llm_pb2.GenerateResponse]]:
    """The messages of each choice, in index order."""
    choices: dict[int, list] = {}
    for response in responses:
        choices.setdefault(response.index, []).append(response)
    return [choices[index] for index in sorted(choices)]


def _chunk(meta: ResponseMeta, obj: str, choices: list[dict]) -> dict:
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model, "choices": choices}


def chat_role_chunk(meta: ResponseMeta, index: int = 0, role: str = "assistant") -> dict:
    """The first chunk of each choice of a chat stream, as OpenAI and vLLM send it: the role and empty content."""
    delta = {"role": role, "content": ""}
    return _chunk(meta, "chat.completion.chunk",
                  [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])


def chat_first_chunks(meta: ResponseMeta, n: int, role: str, echo_text: str) -> list[dict]:
    """What a chat stream sends before any token, as vLLM does: each choice's role, then each choice's echo."""
    roles = [chat_role_chunk(meta, i, role) for i in range(n)]
    echoes = [_chunk(meta, "chat.completion.chunk", [{"index": i, "delta": {"content": echo_text}, "logprobs": None,
                                                      "finish_reason": None}]) for i in range(n)]
    return roles + (echoes if echo_text else [])


def chat_chunk(response: llm_pb2.GenerateResponse, meta: ResponseMeta, with_logprobs: bool) -> dict | None:
    """The SSE chunk for one response message; None when it carries nothing the client would see."""
    reason = finish_reason(response)
    if response.HasField("parsed"):  # llm_svc split the answer: what the split says, or nothing yet
        delta = parsed_delta_json(response.parsed)
    else:
        delta = {"content": response.text} if response.text else {}
    if not delta and reason is None and not response.logprobs:
        return None
    choice = {"index": response.index, "delta": delta,
              "logprobs": {"content": chat_logprobs(response)} if with_logprobs else None,
              "finish_reason": reason}
    if reason is not None:
        choice["stop_reason"] = _stop_reason(response)
    return _chunk(meta, "chat.completion.chunk", [choice])


def usage_chunk(meta: ResponseMeta, obj: str, usage: llm_pb2.Usage) -> dict:
    """The last chunk of a stream when `stream_options.include_usage` is set: no choices, only usage."""
    return {**_chunk(meta, obj, []), "usage": usage_json(usage, streamed=True)}


def _chat_message(responses: list[llm_pb2.GenerateResponse], role: str, echo_text: str) -> dict:
    """The choice's message; where llm_svc split the answer (on its last message), as vLLM's server shows it."""
    last = responses[-1]
    if not last.HasField("parsed"):
        return {"role": role, "content": echo_text + "".join(r.text for r in responses)}
    parsed = last.parsed
    content = parsed.content if parsed.HasField("content") else None
    message = {"role": role, "content": echo_text + (content or "") if echo_text else content,
               "reasoning": parsed.reasoning if parsed.HasField("reasoning") else None}
    if parsed.tool_calls:
        message["tool_calls"] = [tool_call_json(call) for call in parsed.tool_calls]
    return message


def _chat_choice(responses: list[llm_pb2.GenerateResponse], with_logprobs: bool, role: str, echo_text: str) -> dict:
    last = responses[-1]
    return {"index": last.index, "message": _chat_message(responses, role, echo_text),
            "logprobs": {"content": [e for r in responses for e in chat_logprobs(r)]} if with_logprobs else None,
            "finish_reason": finish_reason(last), "stop_reason": _stop_reason(last)}


def chat_completion(responses: list[llm_pb2.GenerateResponse], meta: ResponseMeta, with_logprobs: bool,
                    role: str = "assistant", echo_text: str = "") -> dict:
    choices = [_chat_choice(messages, with_logprobs, role, echo_text) for messages in by_choice(responses)]
    body = {**_chunk(meta, "chat.completion", choices), "usage": usage_json(responses[-1].usage)}
    if responses[0].prompt_logprobs:
        body["prompt_logprobs"] = prompt_logprobs_json(responses[0].prompt_logprobs)
    return body


@dataclasses.dataclass(frozen=True)
class PromptEcho:
    """What `echo` puts before a completion's text and tokens: the prompt, from the stream's first message."""

    text: str
    tokens: list[CompletionToken]

    @classmethod
    def of(cls, first: llm_pb2.GenerateResponse, top_logprobs: int | None) -> "PromptEcho":
        return cls(first.prompt_text, echoed_prompt_tokens(first.prompt_logprobs, top_logprobs or 0))


def completion_chunk(response: llm_pb2.GenerateResponse, meta: ResponseMeta, with_logprobs: bool,
                     text_offset: int, echo: PromptEcho | None = None) -> dict | None:
    """One message as a chunk of its choice; `echo` on the choice's first, which then shows the prompt first."""
    reason = finish_reason(response)
    if not response.text and reason is None and not response.logprobs and echo is None:
        return None
    tokens = (echo.tokens if echo else []) + generated_tokens(response)
    choice = {"index": response.index, "text": (echo.text if echo else "") + response.text,
              "logprobs": completion_logprobs(tokens, text_offset) if with_logprobs else None,
              "finish_reason": reason}
    if reason is not None:
        choice["stop_reason"] = _stop_reason(response)
    return _chunk(meta, "text_completion", [choice])


def _completion_choice(responses: list[llm_pb2.GenerateResponse], with_logprobs: bool, echo: PromptEcho | None,
                       prompt_logprobs: list | None) -> dict:
    last = responses[-1]
    tokens = (echo.tokens if echo else []) + [t for r in responses for t in generated_tokens(r)]
    choice = {"index": last.index, "text": (echo.text if echo else "") + "".join(r.text for r in responses),
              "logprobs": completion_logprobs(tokens, 0) if with_logprobs else None,
              "finish_reason": finish_reason(last), "stop_reason": _stop_reason(last)}
    if prompt_logprobs is not None:
        choice["prompt_logprobs"] = prompt_logprobs
    return choice


def first_of_each_prompt(responses: list[llm_pb2.GenerateResponse], n: int) -> dict[int, llm_pb2.GenerateResponse]:
    """Prompt index -> the first message of its call, which carries the prompt's text and log-probabilities. Choice
    i answers prompt i // n (as vLLM numbers the choices of several prompts)."""
    first: dict[int, llm_pb2.GenerateResponse] = {}
    for response in responses:
        first.setdefault(response.index // n, response)
    return first


def completion(responses: list[llm_pb2.GenerateResponse], meta: ResponseMeta, with_logprobs: bool,
               echo: bool = False, top_logprobs: int | None = None, n: int = 1) -> dict:
    """vLLM repeats each prompt's log-probabilities (and, with `echo`, the prompt) in every choice of that prompt;
    `responses[-1]` carries the usage of the whole request."""
    first = first_of_each_prompt(responses, n)
    choices = []
    for messages in by_choice(responses):
        prompt = first[messages[0].index // n]
        echoed = PromptEcho.of(prompt, top_logprobs) if echo else None
        prompt_logprobs = prompt_logprobs_json(prompt.prompt_logprobs) if prompt.prompt_logprobs else None
        choices.append(_completion_choice(messages, with_logprobs, echoed, prompt_logprobs))
    return {**_chunk(meta, "text_completion", choices), "usage": usage_json(responses[-1].usage)}
