"""The gateway application: what its routes share (`Gateway`) and how the Starlette app is put together.

Routes are in `gateway.routes`, the mapping of errors to HTTP answers in `gateway.error_handlers`; around
them, the request context (id, metrics), the API key and the work limit (requests and bytes in flight, 429 past
them).
"""

import asyncio
import contextlib
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.middleware import Middleware

from gateway.config import GatewayConfig
from gateway.error_handlers import install_error_handlers
from gateway.images import ImageLoader
from gateway.llm_client import LlmClient
from gateway.metrics import GatewayMetrics
from gateway.middleware import ApiKeyMiddleware, RequestContextMiddleware, WorkLimitMiddleware
from gateway.routes import (API_ROUTES, CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, DETOKENIZE_ENDPOINT, ROUTES,
                            TOKENIZE_ENDPOINT)
from gateway.videos import VideoLoader
from protos import llm_pb2
from protos.errors import NotFound
from protos.work_limits import WorkLimit


class Gateway:
    """What the routes share: config, the llm_svc client, the image loader, metrics and the model name."""

    def __init__(self, config: GatewayConfig, metrics: GatewayMetrics):
        self.config = config
        self.metrics = metrics
        self.llm = LlmClient(config.llm_targets, config.grpc_max_message_bytes, config.unavailable_cooldown_s,
                             tls=config.tls, server_name=config.tls_server_name, token=config.llm_auth_token,
                             retire_s=config.request_timeout_s, multiplex=config.multiplex_llm_calls)
        self.images = ImageLoader(config)
        self.videos = VideoLoader(config)
        self._model_info: llm_pb2.GetModelInfoResponse | None = None

    async def close(self) -> None:
        await asyncio.gather(self.llm.close(), self.images.close(), self.videos.close())

    async def model_info(self) -> llm_pb2.GetModelInfoResponse:
        if self._model_info is None:
            self._model_info = await self.llm.model_info(self.config.health_timeout_s)
        return self._model_info

    async def model_name(self) -> str:
        return self.config.served_model_name or (await self.model_info()).model

    async def check_model(self, requested: str | None) -> str:
        served = await self.model_name()
        if requested and requested != served:
            raise NotFound(f"The model `{requested}` does not exist. Valid aliases: {served}.")  # vLLM's words
        return served


def create_app(config: GatewayConfig, before_serving: Callable[[], object] = lambda: None) -> Starlette:
    """`before_serving` runs once the app is up, before it serves: what the process does then (`gateway.__main__`
    freezes its heap), which an app that shares its process (tests) leaves out."""
    metrics = GatewayMetrics()
    work_limit = WorkLimit("the gateway", config.max_requests_in_flight, config.max_bytes_in_flight)
    metrics.watch_work_limit(work_limit)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        # Created here so the gRPC channels belong to the server's event loop.
        app.state.gateway = Gateway(config, metrics)
        await app.state.gateway.llm.start()
        before_serving()
        yield
        await app.state.gateway.close()

    # In this order around each request: its id (set before anything may refuse it), the API key, the work limit.
    middleware = [
        Middleware(RequestContextMiddleware, metrics=metrics, endpoints={route.path for route in ROUTES}),
        Middleware(ApiKeyMiddleware, api_key=config.api_key, endpoints={route.path for route in API_ROUTES}),
        Middleware(WorkLimitMiddleware, limit=work_limit,
                   endpoints={CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, TOKENIZE_ENDPOINT, DETOKENIZE_ENDPOINT}),
    ]
    app = Starlette(routes=ROUTES, middleware=middleware, lifespan=lifespan)
    install_error_handlers(app)
    return app
