"""gRPC servicer of the language stage: proto <-> domain conversion only; the work is in `LanguageService`."""

import asyncio
import functools
import hashlib
import logging
import re
import uuid
from collections.abc import Callable

from vllm.exceptions import VLLMClientError

from llm_svc import metrics
from llm_svc.output_parsing import ParsedOutput, ToolRequest, tools_from_pb
from llm_svc.prompts import ImageRef, Message, ToolCall, VideoRef, chat_options_from_pb, truncation_from_pb
from llm_svc.sampling import to_sampling_params
from llm_svc.service import Delta, GenerateInput, LanguageService
from llm_svc.tokenization import TokenizationService, TokenizeInput, Tokens
from llm_svc.video_client import VideoBlob, video_from_pb
from llm_svc.video_client import options_from_pb as video_options_from_pb
from llm_svc.vision_client import ImageBlob
from llm_svc.vllm_messages import client_message
from protos import llm_pb2, llm_pb2_grpc, tracing
from protos.call_stream import ServesCallStreams
from protos.errors import InvalidInput, ServingError
from protos.logs import request_id_var

log = logging.getLogger(__name__)

_HASH = re.compile(r"[0-9a-f]{64}")
# A request up to this size is parsed on the event loop: hashing what bytes it may carry takes tens of microseconds.
PARSE_IN_PLACE_BYTES = 64 << 10
_ROLES = {llm_pb2.ROLE_SYSTEM: "system", llm_pb2.ROLE_USER: "user", llm_pb2.ROLE_ASSISTANT: "assistant",
          llm_pb2.ROLE_TOOL: "tool"}
_FINISH = {"stop": llm_pb2.FINISH_REASON_STOP, "length": llm_pb2.FINISH_REASON_LENGTH,
           "abort": llm_pb2.FINISH_REASON_ABORT, "tool_calls": llm_pb2.FINISH_REASON_TOOL_CALLS}


def image_from_pb(part: llm_pb2.ImagePart) -> ImageBlob:
    if part.WhichOneof("source") == "data":
        if not part.data:
            raise InvalidInput("an image part has empty bytes")
        return ImageBlob(hashlib.sha256(part.data).hexdigest(), part.data)
    if part.WhichOneof("source") == "content_hash":
        if not _HASH.fullmatch(part.content_hash.lower()):
            raise InvalidInput("an image's content_hash must be 64 hex digits (SHA-256 of its bytes)")
        return ImageBlob(part.content_hash.lower(), None)
    raise InvalidInput("an image part has neither bytes nor a content hash")


def chat_from_pb(chat: llm_pb2.Chat, videos: list[VideoBlob] | None = None
                 ) -> tuple[list[Message], list[ImageBlob]]:
    """The chat's messages and images; its videos go into `videos` (None: a video part is refused)."""
    messages, images = [], []
    for n, message in enumerate(chat.messages):
        if message.role not in _ROLES:
            raise InvalidInput(f"message {n}: role must be system, user, assistant or tool")
        parts = []
        for part in message.content:
            if part.WhichOneof("part") == "image":
                images.append(image_from_pb(part.image))
                parts.append(ImageRef(images[-1].content_hash))
            elif part.WhichOneof("part") == "video":
                if videos is None:
                    raise InvalidInput("videos are not taken here")
                videos.append(video_from_pb(part.video))
                parts.append(VideoRef(videos[-1].content_hash))
            else:
                parts.append(part.text)
        calls = tuple(ToolCall(call.id, call.name, call.arguments) for call in message.tool_calls)
        messages.append(Message(_ROLES[message.role], tuple(parts), calls, message.tool_call_id))
    return messages, images


def input_from_pb(request: llm_pb2.GenerateRequest, max_model_len: int, sampling_defaults=None) -> GenerateInput:
    request_id = request.request_id or f"gen-{uuid.uuid4().hex}"
    sampling = to_sampling_params(request.sampling, max_model_len, sampling_defaults)
    # What every input form takes alike.
    common = dict(return_prompt_text=request.return_prompt_text, truncation=truncation_from_pb(request),
                  continuous_usage=request.continuous_usage)
    kind = request.WhichOneof("input")
    if kind == "chat":
        videos = []
        messages, images = chat_from_pb(request.chat, videos)
        tools = tools_from_pb(request.chat.tools) if request.chat.HasField("tools") else ToolRequest()
        return GenerateInput(request_id, messages, None, images, sampling, request.max_tiles,
                             chat_options_from_pb(request.chat), tools=tools, parse_at_end=request.parse_at_end,
                             videos=videos, video_options=video_options_from_pb(request), **common)
    if kind == "prompt":
        if not request.prompt:
            raise InvalidInput("the prompt is empty")
        return GenerateInput(request_id, None, request.prompt, [], sampling, request.max_tiles, **common)
    if kind == "prompt_tokens":
        if not request.prompt_tokens.token_ids:
            raise InvalidInput("the prompt is empty")
        return GenerateInput(request_id, None, None, [], sampling, request.max_tiles,
                             prompt_token_ids=list(request.prompt_tokens.token_ids), **common)
    raise InvalidInput("the request has neither chat messages nor a prompt")


def _logprobs_to_pb(token_ids: list[int], logprobs: list, top_n: int) -> list[llm_pb2.TokenLogprob]:
    """vLLM gives, per token, a dict holding the chosen token and the `top_n` most likely (rank 1..top_n)."""
    out = []
    for token_id, alternatives in zip(token_ids, logprobs):
        chosen = alternatives[token_id]
        top = sorted((kv for kv in alternatives.items() if kv[1].rank is not None and kv[1].rank <= top_n),
                     key=lambda kv: kv[1].rank)
        out.append(llm_pb2.TokenLogprob(
            token_id=token_id, token=chosen.decoded_token or "", logprob=chosen.logprob,
            top=[llm_pb2.TopLogprob(token_id=t, token=lp.decoded_token or "", logprob=lp.logprob) for t, lp in top]))
    return out


def _prompt_logprobs_to_pb(token_ids: list[int], logprobs: list, top_n: int,
                           decode: Callable[[list[int]], str]) -> list[llm_pb2.PromptTokenLogprob]:
    """vLLM gives, per prompt token, None for the first and then a dict holding the prompt token (its own rank) and
    the `top_n` most likely (rank 1..top_n; every rank when top_n is -1)."""
    out = []
    for token_id, alternatives in zip(token_ids, logprobs):
        if alternatives is None:
            out.append(llm_pb2.PromptTokenLogprob(token_id=token_id, token=decode([token_id])))
            continue
        chosen = alternatives[token_id]
        top = sorted((kv for kv in alternatives.items()
                      if kv[1].rank is not None and (top_n < 0 or kv[1].rank <= top_n)), key=lambda kv: kv[1].rank)
        out.append(llm_pb2.PromptTokenLogprob(
            token_id=token_id, token=chosen.decoded_token or decode([token_id]), logprob=chosen.logprob,
            rank=chosen.rank or 0,
            top=[llm_pb2.TopLogprob(token_id=t, token=lp.decoded_token or "", logprob=lp.logprob) for t, lp in top]))
    return out


def parsed_to_pb(parsed: ParsedOutput) -> llm_pb2.ParsedOutput:
    calls = [llm_pb2.ToolCallDelta(index=index, **{k: v for k, v in (("id", id_), ("name", name),
                                                                        ("arguments", arguments)) if v is not None})
             for index, id_, name, arguments in parsed.tool_calls]
    return llm_pb2.ParsedOutput(content=parsed.content, reasoning=parsed.reasoning, tool_calls=calls,
                                content_null=parsed.content_null, reasoning_null=parsed.reasoning_null)


def delta_to_pb(request_id: str, delta: Delta, top_logprobs: int, prompt_top_logprobs: int = 0,
                decode: Callable[[list[int]], str] | None = None) -> llm_pb2.GenerateResponse:
    """`decode` names the tokens vLLM leaves without text (the prompt's first); needed with prompt_logprobs."""
    # Per token: only what a plain delta holds is set in the constructor, the rest where there is some.
    response = llm_pb2.GenerateResponse(request_id=request_id, text=delta.text, token_ids=delta.token_ids,
                                        index=delta.index)
    if delta.logprobs:
        response.logprobs.extend(_logprobs_to_pb(delta.token_ids, delta.logprobs, top_logprobs))
    if delta.prompt_text:
        response.prompt_text = delta.prompt_text
    if delta.prompt_logprobs:
        response.prompt_logprobs.extend(_prompt_logprobs_to_pb(delta.prompt_token_ids, delta.prompt_logprobs,
                                                               prompt_top_logprobs, decode))
    if delta.parsed is not None:
        response.parsed.CopyFrom(parsed_to_pb(delta.parsed))
    if delta.finish_reason is not None:
        response.finish_reason = _FINISH.get(delta.finish_reason, llm_pb2.FINISH_REASON_STOP)
        response.stop_reason = "" if delta.stop_reason is None else str(delta.stop_reason)
    if delta.choice_usage is not None:
        prompt_tokens, completion_tokens, reasoning_tokens = delta.choice_usage
        response.choice_usage.CopyFrom(llm_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                     reasoning_tokens=reasoning_tokens))
    if delta.timings is not None:
        response.usage.CopyFrom(llm_pb2.Usage(prompt_tokens=delta.prompt_tokens,
                                              completion_tokens=delta.completion_tokens,
                                              cached_tokens=delta.cached_tokens,
                                              reasoning_tokens=delta.reasoning_tokens))
        response.timings.CopyFrom(llm_pb2.Timings(**delta.timings))
    return response


def tokenize_input_from_pb(request: llm_pb2.TokenizeRequest) -> TokenizeInput:
    request_id = request.request_id or f"tokenize-{uuid.uuid4().hex}"
    special = request.add_special_tokens if request.HasField("add_special_tokens") else None
    kind = request.WhichOneof("input")
    if kind == "chat":
        messages, images = chat_from_pb(request.chat)
        return TokenizeInput(request_id, messages, None, images, special, request.return_token_strs,
                             request.max_tiles, chat_options_from_pb(request.chat))
    if kind == "prompt":
        return TokenizeInput(request_id, None, request.prompt, [], special, request.return_token_strs,
                             request.max_tiles)
    raise InvalidInput("the request has neither chat messages nor a prompt")


def tokens_to_pb(tokens: Tokens, max_model_len: int) -> llm_pb2.TokenizeResponse:
    return llm_pb2.TokenizeResponse(token_ids=tokens.token_ids, max_model_len=max_model_len,
                                    token_strs=tokens.token_strs or [])


class LanguageModelServicer(ServesCallStreams, llm_pb2_grpc.LanguageModelServicer):
    def __init__(self, service: LanguageService, info: llm_pb2.GetModelInfoResponse,
                 tokenization: TokenizationService | None = None,
                 version: llm_pb2.GetVersionResponse | None = None):
        self._service = service
        self._info = info
        self._tokenization = tokenization
        self._version = version or llm_pb2.GetVersionResponse()

    async def GetVersion(self, request, context):
        return self._version

    async def Tokenize(self, request: llm_pb2.TokenizeRequest, context):
        request_id_var.set(request.request_id or "-")
        # Admitted like a Generate request: its message holds images' bytes.
        with self._service.admit(request.ByteSize(), embeddings=False):
            # Off the event loop: hashing the images' bytes.
            tokenize_input = await asyncio.to_thread(tokenize_input_from_pb, request)
            tokens = await self._tokenization.tokenize(tokenize_input)
        return tokens_to_pb(tokens, self._info.max_model_len)

    async def Detokenize(self, request: llm_pb2.DetokenizeRequest, context):
        return llm_pb2.DetokenizeResponse(text=await self._tokenization.detokenize(list(request.token_ids)))

    async def GetModelInfo(self, request, context):
        return self._info

    async def Abort(self, request, context):
        return llm_pb2.AbortResponse(aborted=await self._service.abort(request.request_id))

    async def Generate(self, request: llm_pb2.GenerateRequest, context):
        request_id_var.set(request.request_id or "-")
        code = "OK"
        metrics.RUNNING.inc()
        try:
            size = request.ByteSize()  # once: it costs ~16 ms for a message of 20 MB
            # Admitted before any work (its images are not even hashed yet); whatever it holds returns however it ends.
            with tracing.grpc_server_span("LanguageModel/Generate", context) as span, \
                    self._service.admit(size) as work:
                if span.is_recording():
                    span.set_attribute("request.id", request.request_id)
                try:
                    # Off the event loop when there are images' or videos' bytes to hash (16 x 20 MB take ~200 ms;
                    # hashlib lets go of the GIL); a smaller request is parsed in place, in less time than a thread's
                    # hand-over.
                    parse = functools.partial(input_from_pb, request, self._info.max_model_len,
                                              self._service.sampling_defaults)
                    generate_input = await asyncio.to_thread(parse) if size > PARSE_IN_PLACE_BYTES else parse()
                    request_id, sampling = generate_input.request_id, request.sampling
                    request_id_var.set(request_id)
                    log.info("generate: %d images", len(generate_input.images))
                    # Here, not in a generator of its own: each generator between the engine and the stream is
                    # resumed once a token.
                    async for delta in self._service.generate(generate_input, work):
                        yield delta_to_pb(request_id, delta, sampling.logprobs, sampling.prompt_logprobs,
                                          self._service.renderer.decode)
                except VLLMClientError as error:
                    # vLLM's verdict on the request, wherever vLLM gave it (sampling parameters, chat parsing,
                    # rendering, admission, the engine): the caller's input, so INVALID_ARGUMENT with vLLM's message.
                    raise InvalidInput(client_message(error)) from error
        except BaseException as error:
            code = error.code.name if isinstance(error, ServingError) else type(error).__name__
            raise
        finally:
            metrics.RUNNING.dec()
            metrics.REQUESTS.labels(code).inc()
