"""The HTTP routes: OpenAI chat and text completions, models, health and metrics.

A route parses the request, loads its images, makes one Generate call and renders the messages it gets back.
The call starts before the HTTP status is chosen: an error before the first token becomes a real HTTP error
(429, 503, ...); an error after it arrives as an SSE `error` event, as vLLM's server sends it.
"""

import asyncio
import contextlib
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import pydantic
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import translate
from gateway.config import GatewayConfig
from gateway.errors import PayloadTooLarge, Unauthenticated, http_error, read_capped
from gateway.images import ImageLoader
from gateway.llm_client import LlmClient, TokenStream
from gateway.metrics import GatewayMetrics
from gateway.middleware import RequestContextMiddleware
from gateway.responses import collect, completion_renderer, sse_events
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from protos import llm_pb2
from protos.errors import Cancelled, InternalError, InvalidInput, NotFound, ServingError, Unavailable
from protos.logs import request_id_var

log = logging.getLogger(__name__)

T = TypeVar("T")
Model = TypeVar("Model", bound=pydantic.BaseModel)


class Gateway:
    """What the routes share: config, the llm_svc client, the image loader, metrics and the model name."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics):
        self.config = config
        self.metrics = metrics
        self.llm = LlmClient(config.llm_targets, config.grpc_max_message_bytes, config.unavailable_cooldown_s,
                             tls=config.tls, server_name=config.tls_server_name, token=config.llm_auth_token)
        self.images = ImageLoader(config)
        self._model_info: llm_pb2.GetModelInfoResponse | None = None

    async def close(self) -> None:
        await asyncio.gather(self.llm.close(), self.images.close())

    async def model_info(self) -> llm_pb2.GetModelInfoResponse:
        if self._model_info is None:
            self._model_info = await self.llm.model_info(self.config.health_timeout_s)
        return self._model_info

    async def model_name(self) -> str:
        return self.config.served_model_name or (await self.model_info()).model

    async def check_model(self, requested: str | None) -> str:
        served = await self.model_name()
        if requested and requested != served:
            raise NotFound(f"The model `{requested}` does not exist.")
        return served


def create_app(config: GatewayConfig) -> FastAPI:
    metrics = GatewayMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # Created here so the gRPC channels belong to the server's event loop.
        app.state.gateway = Gateway(config, metrics)
        yield
        await app.state.gateway.close()

    app = FastAPI(title="InternVL gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.add_middleware(RequestContextMiddleware, metrics=metrics)

    async def require_api_key(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.encode(), config.api_key.encode()):
            raise Unauthenticated("missing or wrong API key (send 'Authorization: Bearer <key>')")

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, error: ServingError) -> JSONResponse:
        status, body = http_error(error)
        # The whole error, peer and details, is logged here: a 5xx body names only its kind and the request id.
        log.log(logging.WARNING if status >= 500 else logging.INFO, "%s %s -> %d: %s", request.method,
                request.url.path, status, error.for_log())
        return JSONResponse(body, status_code=status)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, error: Exception) -> JSONResponse:
        # Starlette runs this handler outside every middleware, after RequestContextMiddleware has reset the
        # request id and without its response header: both are put back here, for the log line and the client.
        request_id = getattr(request.state, "request_id", "-")
        token = request_id_var.set(request_id)
        try:
            log.exception("%s %s failed", request.method, request.url.path, exc_info=error)
            status, body = http_error(InternalError("unexpected error"))
        finally:
            request_id_var.reset(token)
        return JSONResponse(body, status_code=status, headers={"x-request-id": request_id})

    @app.post("/v1/chat/completions", dependencies=[Depends(require_api_key)])
    async def chat_completions(request: Request):
        gateway: Gateway = request.app.state.gateway
        body = await parse_body(request, ChatCompletionRequest, config.max_request_bytes)
        meta = translate.ResponseMeta(f"chatcmpl-{request.state.request_id}", int(time.time()),
                                      await gateway.check_model(body.model))
        images = await until_disconnected(request, gateway.images.load_all(translate.image_urls(body)))
        metrics.image_bytes.inc(sum(len(i) for i in images))
        generate = translate.chat_generate_request(body, images, backend_request_id(request),
                                                   config.max_tokens_limit)
        stream = await start_generation(request, gateway, generate, "/v1/chat/completions")
        if body.stream:
            chunks = sse_events(stream, lambda m: translate.chat_chunk(m, meta, body.logprobs),
                                [translate.chat_role_chunk(meta)], meta, "chat.completion.chunk",
                                body.stream_options is not None and body.stream_options.include_usage, metrics)
            return event_stream(chunks, stream)
        messages = await collect_unless_disconnected(request, stream, metrics)
        return JSONResponse(translate.chat_completion(messages, meta, body.logprobs))

    @app.post("/v1/completions", dependencies=[Depends(require_api_key)])
    async def completions(request: Request):
        gateway: Gateway = request.app.state.gateway
        body = await parse_body(request, CompletionRequest, config.max_request_bytes)
        meta = translate.ResponseMeta(f"cmpl-{request.state.request_id}", int(time.time()),
                                      await gateway.check_model(body.model))
        generate = translate.completion_generate_request(body, backend_request_id(request), config.max_tokens_limit)
        stream = await start_generation(request, gateway, generate, "/v1/completions")
        with_logprobs = body.logprobs is not None
        if body.stream:
            chunks = sse_events(stream, completion_renderer(meta, with_logprobs), [], meta, "text_completion",
                                body.stream_options is not None and body.stream_options.include_usage, metrics)
            return event_stream(chunks, stream)
        messages = await collect_unless_disconnected(request, stream, metrics)
        return JSONResponse(translate.completion(messages, meta, with_logprobs))

    @app.get("/v1/models", dependencies=[Depends(require_api_key)])
    async def models(request: Request):
        gateway: Gateway = request.app.state.gateway
        card = {"id": await gateway.model_name(), "object": "model", "created": int(time.time()),
                "owned_by": "internvl-dvd"}
        with contextlib.suppress(ServingError):
            info = await gateway.model_info()
            card.update(root=info.model, max_model_len=info.max_model_len)
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health(request: Request):
        healthy = await request.app.state.gateway.llm.healthy_replicas(config.health_timeout_s)
        if not healthy:
            status, body = http_error(Unavailable("no healthy language service replica"))
            return JSONResponse(body, status_code=status)
        return {"status": "ok", "healthy_replicas": healthy}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def parse_body(request: Request, model: type[Model], limit: int) -> Model:
    body = await read_capped(request.stream(), request.headers.get("content-length"), limit, "request body")
    try:
        return model.model_validate_json(body)
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


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it if the client disconnects first (nobody would read the answer)."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():  # the client left first; the task only now begins to cancel
        task.cancel()
        raise Cancelled("client disconnected")
    return task.result()


async def collect_unless_disconnected(request: Request, stream: TokenStream,
                                     metrics: GatewayMetrics) -> list[llm_pb2.GenerateResponse]:
    try:
        return await until_disconnected(request, collect(stream, metrics))
    finally:
        await stream.close()


def event_stream(events: AsyncIterator[str], stream: TokenStream) -> StreamingResponse:
    # The close also covers a client gone before the first event, when the generator never ran.
    return StreamingResponse(events, media_type="text/event-stream", background=BackgroundTask(stream.close))


async def start_generation(request: Request, gateway: Gateway, generate: llm_pb2.GenerateRequest,
                           endpoint: str) -> TokenStream:
    # A request the language service cannot receive would come back as RESOURCE_EXHAUSTED, a 429 that clients
    # retry forever: it is too large, whenever it is sent.
    limit = (await gateway.model_info()).max_request_bytes
    if limit and (size := generate.ByteSize()) > limit:
        raise PayloadTooLarge(f"the request is {size} bytes with its images; the language service takes at most "
                              f"{limit}")
    stream = await until_disconnected(request, gateway.llm.generate(generate, gateway.config.request_timeout_s))
    gateway.metrics.ttft.labels(endpoint).observe(time.perf_counter() - request.state.started)
    return stream
