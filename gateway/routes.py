"""The HTTP routes: OpenAI chat and text completions, models, vLLM's tokenize, detokenize and version, health and
metrics.

A generation route parses the request, loads its images, makes one Generate call (one per prompt, for several
prompts: gateway/fanout.py) and renders the messages it gets back. The call starts before the HTTP status is
chosen: an error before the first token becomes a real HTTP error (429, 503, ...); an error after it arrives as an
SSE `error` event, as vLLM's server sends it.
The request's bytes (body, images) count against the gateway's work limit until every call has been sent.
"""

import dataclasses
import functools
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import pydantic
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import fanout, tokenization, translate
from gateway.errors import PayloadTooLarge, http_error, read_capped
from gateway.fanout import MergedTokenStream
from gateway.llm_client import TokenStream
from gateway.responses import EventStream, collect, completion_renderer, sse_events
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from protos import llm_pb2, server_version, tracing
from protos.errors import Cancelled, InvalidInput, ServingError, Unavailable
from protos.work_limits import AdmittedWork

if TYPE_CHECKING:
    from gateway.app import Gateway

T = TypeVar("T")
Model = TypeVar("Model", bound=pydantic.BaseModel)

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
TOKENIZE_ENDPOINT = "/tokenize"
DETOKENIZE_ENDPOINT = "/detokenize"


def gateway_of(request: Request) -> "Gateway":
    return request.app.state.gateway


@dataclasses.dataclass(frozen=True)
class AnswerOptions:
    """What rendering the answer needs from the request: kept apart so the request itself can be let go."""

    meta: translate.ResponseMeta
    stream: bool
    include_usage: bool
    logprobs: bool
    # vLLM's continuous_usage_stats: every streamed chunk carries its choice's usage.
    continuous_usage: bool
    n: int = 1
    # Chat: the answer's role, and what `echo` puts before it.
    role: str = "assistant"
    echo_text: str = ""
    # Completions: `echo`, and how many alternatives each token's logprobs show (None: no logprobs).
    echo: bool = False
    top_logprobs: int | None = None


def answer_options(request: Request, body: ChatCompletionRequest | CompletionRequest, id_prefix: str,
                   model: str, logprobs: bool, **endpoint_options) -> AnswerOptions:
    meta = translate.ResponseMeta(f"{id_prefix}-{request.state.request_id}", int(time.time()), model)
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    continuous_usage = body.stream_options is not None and body.stream_options.continuous_usage
    return AnswerOptions(meta, body.stream, include_usage, logprobs, continuous_usage, body.n, **endpoint_options)


async def chat_completions(request: Request):
    stream, options = await start_chat(request)
    metrics = gateway_of(request).metrics
    if options.stream:
        first_chunks = translate.chat_first_chunks(options.meta, options.n, options.role, options.echo_text)
        chunks = sse_events(stream, lambda m: translate.chat_chunk(m, options.meta, options.logprobs),
                            first_chunks, options.meta, "chat.completion.chunk", options.include_usage, metrics,
                            options.continuous_usage)
        return EventStream(chunks, request.state.client, stream.close)
    messages = await collect_unless_disconnected(request, stream)
    return JSONResponse(translate.chat_completion(messages, options.meta, options.logprobs, options.role,
                                                  options.echo_text))


async def start_chat(request: Request) -> tuple[TokenStream, AnswerOptions]:
    gateway = gateway_of(request)
    work: AdmittedWork = request.state.work
    body = await parse_body(request, ChatCompletionRequest)
    options = answer_options(request, body, "chatcmpl", await gateway.check_model(body.model), body.logprobs,
                             role=translate.response_role(body), echo_text=translate.chat_echo_text(body))
    with request.state.client.guarded():
        images = await gateway.images.load_all(translate.image_urls(body), work.hold)
        gateway.metrics.image_bytes.inc(sum(len(i) for i in images))
        videos = await gateway.videos.load_all(translate.video_urls(body), work.hold)
    generate = translate.chat_generate_request(body, images, backend_request_id(request),
                                               gateway.config.max_tokens_limit, videos)
    return await start_generation(request, generate, CHAT_ENDPOINT), options


async def completions(request: Request):
    stream, options = await start_completion(request)
    if options.stream:
        render = completion_renderer(options.meta, options.top_logprobs, options.echo, options.n)
        chunks = sse_events(stream, render, [], options.meta, "text_completion", options.include_usage,
                            gateway_of(request).metrics, options.continuous_usage)
        return EventStream(chunks, request.state.client, stream.close)
    messages = await collect_unless_disconnected(request, stream)
    return JSONResponse(translate.completion(messages, options.meta, options.logprobs, options.echo,
                                             options.top_logprobs, options.n))


async def start_completion(request: Request) -> tuple[TokenStream | MergedTokenStream, AnswerOptions]:
    gateway = gateway_of(request)
    body = await parse_body(request, CompletionRequest)
    options = answer_options(request, body, "cmpl", await gateway.check_model(body.model), body.logprobs is not None,
                             echo=bool(body.echo), top_logprobs=body.logprobs)
    generates = translate.completion_generate_requests(body, backend_request_id(request),
                                                       gateway.config.max_tokens_limit)
    if len(generates) == 1:
        return await start_generation(request, generates[0], COMPLETIONS_ENDPOINT), options
    return await start_generations(request, generates, COMPLETIONS_ENDPOINT, body.n), options


async def models(request: Request):
    gateway = gateway_of(request)
    # vLLM's model card, field for field. `root` is the served name: vLLM shows the checkpoint's path on its host.
    card = {"id": await gateway.model_name(), "object": "model", "created": int(time.time()), "owned_by": "vllm",
            "root": None, "parent": None, "max_model_len": None, "permission": [model_permission()]}
    try:
        info = await gateway.model_info()
    except ServingError:
        pass  # the card without the model's details: listing models should not fail with the backend
    else:
        card.update(root=info.model, max_model_len=info.max_model_len)
    return JSONResponse({"object": "list", "data": [card]})


def model_permission() -> dict:
    """vLLM's ModelPermission, with its defaults."""
    return {"id": f"modelperm-{uuid.uuid4().hex}", "object": "model_permission", "created": int(time.time()),
            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False, "organization": "*",
            "group": None, "is_blocking": False}


async def tokenize(request: Request):
    gateway = gateway_of(request)
    body = validated(tokenization.tokenize_request, (await parse_body(request, tokenization.JsonObject)).root)
    await gateway.check_model(body.model)
    with request.state.client.guarded():
        images = await gateway.images.load_all(tokenization.image_urls(body), request.state.work.hold)
        message = tokenization.tokenize_to_proto(body, images, backend_request_id(request))
        await refuse_if_too_large(gateway, message)
        response = await gateway.llm.tokenize(message, gateway.config.request_timeout_s)
    return JSONResponse(tokenization.tokenize_json(response, bool(body.return_token_strs)))


async def detokenize(request: Request):
    gateway = gateway_of(request)
    body = await parse_body(request, tokenization.DetokenizeRequest)
    await gateway.check_model(body.model)
    message = llm_pb2.DetokenizeRequest(token_ids=body.tokens)
    await refuse_if_too_large(gateway, message)
    with request.state.client.guarded():
        response = await gateway.llm.detokenize(message, gateway.config.request_timeout_s)
    return JSONResponse({"prompt": response.text})


async def version(request: Request):
    gateway = gateway_of(request)
    return JSONResponse(tokenization.version_json(await gateway.llm.version(gateway.config.health_timeout_s),
                                                  server_version()))


async def health(request: Request):
    gateway = gateway_of(request)
    healthy = await gateway.llm.healthy_replicas(gateway.config.health_timeout_s)
    if not healthy:
        status, body = http_error(Unavailable("no healthy language service replica"))
        return JSONResponse(body, status_code=status)
    return JSONResponse({"status": "ok", "healthy_replicas": healthy})


async def prometheus_metrics(request: Request):
    return Response(generate_latest(gateway_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)


# Plain Starlette routes: each takes the Request and returns its Response (FastAPI's parameter solving and response
# serialization cost ~0.06 ms of CPU a request, for nothing these routes use).
# The API proper: with an API key configured, its routes take only requests that bring it (gateway.middleware).
API_ROUTES = [Route(CHAT_ENDPOINT, chat_completions, methods=["POST"]),
              Route(COMPLETIONS_ENDPOINT, completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route(TOKENIZE_ENDPOINT, tokenize, methods=["POST"]),
              Route(DETOKENIZE_ENDPOINT, detokenize, methods=["POST"])]
ROUTES = [*API_ROUTES, Route("/version", version, methods=["GET"]), Route("/health", health, methods=["GET"]),
          Route("/metrics", prometheus_metrics, methods=["GET"])]


async def parse_body(request: Request, model: type[Model]) -> Model:
    config = gateway_of(request).config
    # The body leaves room in the work limit for the images and videos it may bring (`AdmittedWork.hold`).
    hold = functools.partial(request.state.work.hold, leaving=config.max_media_bytes)
    with tracing.span("parse") as span:  # reading the body included: a slow client shows here
        try:
            body = await read_capped(request.stream(), request.headers.get("content-length"), config.max_request_bytes,
                                     "request body", hold)
        except ClientDisconnect:  # the client's own doing, not a server error: 499, as a disconnect mid-stream
            raise Cancelled("client disconnected before its request body arrived") from None
        if span.is_recording():
            span.set_attribute("bytes", len(body))
        try:
            return model.model_validate_json(body)
        except pydantic.ValidationError as error:
            raise InvalidInput(describe_validation_error(error)) from None


def validated(parse: Callable[[dict], T], data: dict) -> T:
    try:
        return parse(data)
    except pydantic.ValidationError as error:
        raise InvalidInput(describe_validation_error(error)) from None


def describe_validation_error(error: pydantic.ValidationError) -> str:
    problems = []
    for e in error.errors(include_url=False):
        if e["type"] == "json_invalid":
            return f"request body is not valid JSON: {e['msg']}"
        where = ".".join(str(part) for part in e["loc"])
        problems.append(f"{where}: {e['msg']}" if where else e["msg"])
    return "; ".join(problems)


def backend_request_id(request: Request) -> str:
    """The id llm_svc runs the request under. A client's x-request-id may repeat (SDK retries, proxies) while
    llm_svc's ids must be unique, so a client id gets a suffix; it still prefixes every stage's log lines."""
    request_id = request.state.request_id
    if request.headers.get("x-request-id") == request_id:
        return f"{request_id}-{uuid.uuid4().hex[:8]}"
    return request_id


async def collect_unless_disconnected(request: Request,
                                      stream: TokenStream | MergedTokenStream) -> list[llm_pb2.GenerateResponse]:
    try:
        with request.state.client.guarded():
            return await collect(stream, gateway_of(request).metrics)
    finally:
        await stream.close()


async def start_generation(request: Request, generate: llm_pb2.GenerateRequest, endpoint: str) -> TokenStream:
    gateway = gateway_of(request)
    await refuse_if_too_large(gateway, generate)
    with request.state.client.guarded():
        stream = await gateway.llm.generate(generate, gateway.config.request_timeout_s)
    # Sent: the body, images and message die with the caller's frame; only the request's slot stays held.
    request.state.work.release_bytes()
    gateway.metrics.ttft.labels(endpoint).observe(time.perf_counter() - request.state.started)
    return stream


async def start_generations(request: Request, generates: list[llm_pb2.GenerateRequest], endpoint: str,
                            n: int) -> MergedTokenStream:
    """`start_generation` for several prompts: a call each, all started at once, merged as vLLM numbers them."""
    gateway = gateway_of(request)
    for generate in generates:
        await refuse_if_too_large(gateway, generate)
    with request.state.client.guarded():
        streams = await fanout.generate_all(gateway.llm, generates, gateway.config.request_timeout_s)
    # Sent, every one: as for one call, the request's bytes are let go only now.
    request.state.work.release_bytes()
    gateway.metrics.ttft.labels(endpoint).observe(time.perf_counter() - request.state.started)
    return MergedTokenStream(streams, n)


async def refuse_if_too_large(gateway: "Gateway", message) -> None:
    # A request the language service cannot receive would come back as RESOURCE_EXHAUSTED, a 429 that clients
    # retry forever: it is too large, whenever it is sent.
    limit = (await gateway.model_info()).max_request_bytes
    if limit and (size := message.ByteSize()) > limit:
        raise PayloadTooLarge(f"the request is {size} bytes with its images; the language service takes at most "
                              f"{limit}")
