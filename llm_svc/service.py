"""One Generate request below the wire: images to embeddings, prompt to tokens, the engine's stream.

The prompt is rendered first and the engine's admission checks run on it, each image counted from its
header (`admission`), so that a request the engine would refuse never reaches the vision stage. Then the
vision call; embeddings are checked against the model before they reach the engine (vLLM may crash on a
wrong width). The engine request is aborted when the caller goes away: vLLM's `generate` aborts on
cancellation, and `Abort` aborts by id.

A chat's answer is split into content, reasoning and tool calls by vLLM's parsers when a parser applies
(`output_parsing`): planned before rendering (the tools reach the template, a forced tool call's constraint reaches
the sampling parameters), then parsed per completion as its deltas arrive, or once at its end.

Every request is admitted against the stage's work limit before any work (`admit`) and holds its message's
bytes, then each embedding's bytes as its header arrives; all of it returns when the request ends, however it ends.
"""

import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from http import HTTPStatus

import torch
from vllm.exceptions import GracefulHTTPError, VLLMClientError
from vllm.outputs import RequestOutput
from vllm.v1.engine.exceptions import EngineDeadError

from llm_svc import metrics
from llm_svc.admission import AdmissionCheck, with_embeddings
from llm_svc.engine_spans import record_engine_phases
from llm_svc.limits import ModelDimensions, RequestLimits
from llm_svc.output_parsing import ChatParsing, ChoiceParser, OutputParsers, ParsedOutput, ToolRequest
from llm_svc.prompts import ChatOptions, Message, PromptRenderer, PromptTruncation, to_openai_messages
from llm_svc.sampling_defaults import NO_DEFAULTS, SamplingDefaults
from llm_svc.video_client import VideoBlob, VideoEmbedding, VideoOptions, check_video_bytes
from llm_svc.vision_client import ImageBlob, VisionClient
from llm_svc.vllm_messages import client_message
from protos import tracing
from protos.errors import InternalError, InvalidInput, Overloaded, ServingError, Unavailable
from protos.work_limits import AdmittedWork, WorkLimit

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerateInput:
    request_id: str
    messages: list[Message] | None  # a chat, or
    prompt: str | None  # a raw prompt, or (with both None)
    images: list[ImageBlob]  # in the order their placeholders appear
    sampling: object  # vllm.SamplingParams
    max_tiles: int
    chat_options: ChatOptions = dataclasses.field(default_factory=ChatOptions)  # how a chat is rendered
    prompt_token_ids: list[int] | None = None  # a prompt already tokenized
    return_prompt_text: bool = False  # the first delta carries the prompt as text
    tools: ToolRequest = ToolRequest()  # a chat's
    parse_at_end: bool = False  # parse each completion once, whole (else delta by delta)
    truncation: PromptTruncation | None = None  # vLLM's truncate_prompt_tokens, truncation_side
    continuous_usage: bool = False  # every delta carries its completion's usage so far (choice_usage)
    videos: list[VideoBlob] = dataclasses.field(default_factory=list)  # a chat's, in placeholder order
    video_options: VideoOptions = VideoOptions()  # how the videos' frames are sampled


@dataclasses.dataclass
class Delta:
    text: str
    token_ids: list[int]
    logprobs: list | None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    timings: dict[str, float] | None = None  # set on the stream's last delta only, with the usage
    index: int = 0  # which of the request's n completions
    prompt_logprobs: list | None = None  # vLLM's, one entry per prompt token (None for the first)
    prompt_token_ids: list[int] | None = None  # with prompt_logprobs
    prompt_text: str | None = None
    parsed: ParsedOutput | None = None  # set on every delta of a request whose answer is parsed
    reasoning_tokens: int | None = None  # with the usage, when the server has a reasoning parser
    # With continuous_usage: (prompt tokens, this completion's tokens so far, its reasoning tokens or None).
    choice_usage: tuple[int, int, int | None] | None = None


class LanguageService:
    def __init__(self, engine, vision: VisionClient, renderer: PromptRenderer, admission: AdmissionCheck,
                 dims: ModelDimensions, limits: RequestLimits, parsers: OutputParsers | None = None,
                 sampling_defaults: SamplingDefaults = NO_DEFAULTS):
        self._engine = engine
        # What the sampling fields a request leaves unset take (the generation config's), read by the servicer.
        self.sampling_defaults = sampling_defaults
        self._parsers = parsers
        self._vision = vision
        self.renderer = renderer
        self._admission = admission
        self.dims = dims
        self.limits = limits
        self.work_limit = WorkLimit("llm_svc", limits.max_requests_in_flight, limits.max_bytes_in_flight)
        metrics.watch_work_limit(self.work_limit)
        # Running request ids -> whether Abort asked to stop them (it may come before the engine knows them).
        self._running: dict[str, bool] = {}

    def admit(self, request_bytes: int, embeddings: bool = True) -> AdmittedWork:
        """A slot for one request holding its message's bytes, or Overloaded (holding nothing) past the limits. A
        request that may receive `embeddings` is admitted only while it leaves room for the most one may hold: else a
        flood of messages could leave none of them room for its embeddings, and every one be refused after its
        images were encoded."""
        return self.work_limit.admit(request_bytes, self.limits.embedding_room_bytes if embeddings else 0)

    async def abort(self, request_id: str) -> bool:
        if request_id not in self._running:
            return False
        self._running[request_id] = True
        await self._engine.abort(request_id)
        return True

    async def generate(self, request: GenerateInput, work: AdmittedWork) -> AsyncIterator[Delta]:
        """The request's deltas; `work` (from `admit`, released by the caller) holds its embeddings' bytes too."""
        if request.request_id in self._running:
            raise InvalidInput(f"request id {request.request_id!r} is already running")
        self.limits.check_images(request.images)
        check_video_bytes(request.videos, self.limits.max_image_bytes_per_request)
        started = time.perf_counter()
        self._running[request.request_id] = False
        try:
            parsing = self._plan_parsing(request)
            options = request.chat_options
            if parsing is not None:
                options = dataclasses.replace(options, tools=parsing.template_tools)
            with tracing.span("render"):
                text = (self.renderer.render(request.messages, options) if request.messages is not None
                        else request.prompt)
            embeddings, checked = [], None
            if request.images:
                with tracing.span("vision_wait"):  # the admission checks, then the vision call (which annotates it)
                    embeddings, checked = await self._embeddings(request, text, work)
            videos = await self._video_embeddings(request, text, work) if request.videos else []
            vision_s = time.perf_counter() - started
            if self._running[request.request_id]:  # aborted while its images were being encoded
                for delta in _aborted_before_the_engine(vision_s, request.sampling.n):
                    yield delta
                return
            prompt = {"prompt": text} if text is not None else {"prompt_token_ids": request.prompt_token_ids}
            if embeddings:
                metrics.VISION_SECONDS.observe(vision_s)
                prompt["multi_modal_data"] = {"image": embeddings}
                prompt["multi_modal_uuids"] = {"image": [img.content_hash for img in request.images]}
            if videos:
                prompt.setdefault("multi_modal_data", {})["video"] = [video.embeddings for video in videos]
                prompt.setdefault("multi_modal_uuids", {})["video"] = [
                    request.video_options.uuid(video.content_hash) for video in videos]
            # The input the admission check passed, with the embeddings in: the prompt is not rendered again.
            ready = with_embeddings(checked, embeddings, prompt["multi_modal_uuids"]["image"]) \
                if checked is not None and not videos else None
            prompt_text = self._prompt_text(request, text) if request.return_prompt_text else None
            async for delta in self._stream(request, prompt, started, vision_s, parsing, ready):
                # The prompt's extras ride on the stream's first delta.
                delta.prompt_text, prompt_text = prompt_text, None
                yield delta
        finally:
            self._running.pop(request.request_id, None)

    def _plan_parsing(self, request: GenerateInput) -> ChatParsing | None:
        """For a chat that a parser or tools apply to: vLLM's checks of its tool fields, and what they change in the
        sampling parameters (set here, before the admission check reads them)."""
        tools, parsers = request.tools, self._parsers
        if request.messages is None or parsers is None or (
                parsers.parser_cls is None and tools == ToolRequest()):
            return None
        sampling = request.sampling
        parsing = parsers.plan(to_openai_messages(request.messages, with_images=False), tools,
                               request.chat_options.chat_params().chat_template_kwargs, sampling.structured_outputs,
                               sampling.skip_special_tokens)
        sampling.structured_outputs = parsing.request.structured_outputs
        sampling.skip_special_tokens = parsing.request.skip_special_tokens
        return parsing

    def _tok_params(self, request: GenerateInput):
        """The tokenization the request's truncation asks for (vLLM's TokenizeParams); None: the engine's default."""
        if request.truncation is None:
            return None
        return self.renderer.tok_params(request.truncation)

    def _prompt_text(self, request: GenerateInput, text: str | None) -> str:
        return text if text is not None else self.renderer.decode(request.prompt_token_ids)

    async def _embeddings(self, request: GenerateInput, text: str,
                          work: AdmittedWork) -> tuple[list[torch.Tensor], dict]:
        """The images' embeddings, and the engine's input (with stand-ins for them) that the admission check passed."""
        # Before the vision call: a request that the engine would refuse costs the vision stage nothing.
        with tracing.span("admission"):
            checked = await self._admission.check(request.request_id, text, request.images, request.max_tiles,
                                                  request.sampling, self._tok_params(request))
        results = await self._vision.encode(request.request_id, request.images, request.max_tiles,
                                            self.limits.vision_timeout_s, hold_bytes=work.hold)
        for i, result in enumerate(results):
            self._check_rows(f"image {i}", result.embeddings, result.num_tiles, "tiles")
        return [r.embeddings for r in results], checked

    async def _video_embeddings(self, request: GenerateInput, text: str, work: AdmittedWork) -> list[VideoEmbedding]:
        if not request.images:  # else checked with the images
            with tracing.span("admission"):
                await self._admission.check(request.request_id, text, [], request.max_tiles, request.sampling,
                                            self._tok_params(request))
        with tracing.span("vision_wait"):
            results = await self._vision.encode_videos(request.request_id, request.videos, request.video_options,
                                                       self.limits.vision_timeout_s, hold_bytes=work.hold)
        for i, result in enumerate(results):
            self._check_rows(f"video {i}", result.embeddings, result.num_frames, "frames")
        return results

    def _check_rows(self, what: str, embeddings: torch.Tensor, tiles: int, unit: str) -> None:
        """[tiles * tokens_per_tile, hidden] (a video's frames are one tile each), or the vision stage is wrong."""
        rows, width = embeddings.shape if embeddings.dim() == 2 else (-1, -1)
        expected = tiles * self.dims.tokens_per_tile
        if tiles < 1 or rows != expected or width != self.dims.hidden_size:
            raise InternalError(f"{what}: the vision stage sent embeddings of shape {tuple(embeddings.shape)} for "
                                f"{tiles} {unit}; the language model needs [{expected}, {self.dims.hidden_size}]")

    async def _stream(self, request: GenerateInput, prompt: dict, started: float, vision_s: float,
                      parsing: ChatParsing | None, engine_input: dict | None = None) -> AsyncIterator[Delta]:
        """`engine_input`: `prompt` already rendered for the engine, if it was."""
        first_token_s = None
        completion_tokens = 0
        try:
            engine_input = engine_input or await self.renderer.engine_input(prompt, self._tok_params(request))
            engine_kwargs = {}
            answers = None
            if parsing is not None:
                engine_kwargs = parsing.engine_kwargs(self._parsers.tokenizer, self._parsers.model_config,
                                                      engine_input.get("prompt_token_ids") or [])
                if parsing.parser_cls is not None:  # else tools only reach the template: the answer is text
                    answers = ParsedAnswers(parsing, self._parsers, request.parse_at_end)
            if self._running[request.request_id]:  # aborted while the prompt was being rendered
                for delta in _aborted_before_the_engine(vision_s, request.sampling.n):
                    yield delta
                return
            prompt_logprobs_sent = False
            choice_tokens: dict[int, int] = {}  # completion index -> its tokens so far
            if (trace_headers := tracing.trace_headers()) is not None:
                engine_kwargs["trace_headers"] = trace_headers  # vLLM's own span of the request joins the trace
            async for output in self._engine.generate(engine_input, request.sampling, request.request_id,
                                                      **engine_kwargs):
                if self._running[request.request_id] and not output.finished:
                    # An Abort that came while the engine was admitting the request found no request to abort.
                    await self._engine.abort(request.request_id)
                    continue
                # With n > 1 each output carries the completions that advanced; `output.finished` only once all
                # of them have, on the last one.
                for position, completion in enumerate(output.outputs):
                    completion_tokens += len(completion.token_ids)
                    if first_token_s is None and completion.token_ids:
                        first_token_s = time.perf_counter() - started
                        metrics.TTFT_SECONDS.observe(first_token_s)
                    delta = Delta(completion.text, list(completion.token_ids), completion.logprobs,
                                  index=completion.index)
                    if completion.finished():
                        delta.finish_reason = completion.finish_reason
                        delta.stop_reason = completion.stop_reason
                    if answers is not None:
                        answers.parse(delta, output.prompt_token_ids)
                    if request.continuous_usage:
                        choice_tokens[completion.index] = choice_tokens.get(completion.index, 0) + len(
                            completion.token_ids)
                        delta.choice_usage = (len(output.prompt_token_ids or ()), choice_tokens[completion.index],
                                              answers.choice_reasoning_tokens(completion.index)
                                              if answers is not None else None)
                    if output.prompt_logprobs and not prompt_logprobs_sent:
                        # Every completion computes the prompt's; one copy is enough.
                        delta.prompt_logprobs, delta.prompt_token_ids = output.prompt_logprobs, output.prompt_token_ids
                        prompt_logprobs_sent = True
                    if output.finished and position == len(output.outputs) - 1:
                        total_s = time.perf_counter() - started
                        delta.prompt_tokens = len(output.prompt_token_ids or ())
                        delta.completion_tokens = completion_tokens
                        delta.cached_tokens = output.num_cached_tokens or 0
                        delta.reasoning_tokens = answers.reasoning_tokens() if answers is not None else None
                        delta.timings = {"vision_s": vision_s, "queue_s": _queue_seconds(output),
                                         "first_token_s": first_token_s or total_s, "total_s": total_s}
                        record_engine_phases(output.metrics, delta.prompt_tokens, delta.cached_tokens,
                                             completion_tokens)
                        metrics.PROMPT_TOKENS.inc(delta.prompt_tokens)
                    yield delta
        except ServingError:
            raise
        except EngineDeadError as error:
            raise Unavailable(f"the engine is dead: {error}") from error
        except GracefulHTTPError as error:  # admission control (--max-num-queued-reqs / -tokens): retry elsewhere
            raise (Unavailable if error.http_status == HTTPStatus.SERVICE_UNAVAILABLE else Overloaded)(
                error.message) from error
        except (VLLMClientError, ValueError) as error:  # vLLM's validation: prompt too long, bad token ids, ...
            raise InvalidInput(client_message(error)) from error
        finally:
            # Once a request, however it ends, not once a token: an inc takes a lock and about a microsecond (vLLM's
            # own vllm:generation_tokens counts at every step).
            metrics.COMPLETION_TOKENS.inc(completion_tokens)


class ParsedAnswers:
    """The parsers of one request's completions, fed its deltas: vLLM's streaming path, or with `at_end` its
    non-streaming one (each completion parsed once, whole, on its last delta)."""

    def __init__(self, parsing: ChatParsing, parsers: OutputParsers, at_end: bool):
        self._parsing = parsing
        self._parsers = parsers
        self._at_end = at_end
        self._choices: dict[int, ChoiceParser] = {}
        self._texts: dict[int, list[str]] = {}
        self._token_ids: dict[int, list[int]] = {}

    def parse(self, delta: Delta, prompt_token_ids: list[int] | None) -> None:
        """Sets `delta.parsed` (and `finish_reason` "tool_calls" where vLLM's server would say it)."""
        index = delta.index
        if index not in self._choices:
            self._choices[index] = self._parsing.choice_parser(self._parsers.tokenizer, self._parsers.model_config)
        choice = self._choices[index]
        delta.parsed = ParsedOutput()
        if self._at_end:
            self._texts.setdefault(index, []).append(delta.text)
            self._token_ids.setdefault(index, []).extend(delta.token_ids)
            if delta.finish_reason is not None:
                delta.parsed, delta.finish_reason = choice.whole(
                    "".join(self._texts[index]), self._token_ids[index], prompt_token_ids, delta.finish_reason)
            return
        if not delta.text and not delta.token_ids and not choice.token_count:
            return  # vLLM's server skips empty outputs before the first token (chunked prefill) without parsing them
        parsed = choice.delta(delta.text, delta.token_ids, prompt_token_ids, delta.finish_reason is not None)
        delta.parsed = parsed or ParsedOutput()
        if delta.finish_reason is not None:
            delta.finish_reason = choice.streamed_finish_reason(delta.finish_reason)

    def reasoning_tokens(self) -> int | None:
        if not self._parsing.counts_reasoning:
            return None
        return sum(choice.reasoning_tokens() for choice in self._choices.values())

    def choice_reasoning_tokens(self, index: int) -> int | None:
        """One completion's reasoning tokens so far (0 before its first token), or None without a reasoning parser."""
        if not self._parsing.counts_reasoning:
            return None
        choice = self._choices.get(index)
        return choice.reasoning_tokens() if choice is not None else 0


def _aborted_before_the_engine(vision_s: float, n: int) -> list[Delta]:
    """Each completion's end; the last carries the (empty) usage and the timings."""
    deltas = [Delta("", [], None, finish_reason="abort", index=i) for i in range(n)]
    deltas[-1].timings = {"vision_s": vision_s, "queue_s": 0.0, "first_token_s": vision_s, "total_s": vision_s}
    return deltas


def _queue_seconds(output: RequestOutput) -> float:
    stats = output.metrics
    queued, scheduled = getattr(stats, "queued_ts", 0.0), getattr(stats, "scheduled_ts", 0.0)
    return max(0.0, scheduled - queued) if queued and scheduled else 0.0
