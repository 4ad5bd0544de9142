"""Assembles the language stage: vision client (checked), vLLM engine (warmed), gRPC server."""

import asyncio
import logging
from collections.abc import Callable

import torch
import vllm
from prometheus_client import start_http_server
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.v1.engine.async_llm import AsyncLLM

from llm_svc.admission import AdmissionCheck
from llm_svc.config import LlmConfig
from llm_svc.image_tokens import ImageTokenCounter, TilingPolicy
from llm_svc.limits import ModelDimensions, RequestLimits, check_work_limit
from llm_svc.output_parsing import OutputParsers, ParserFlags
from llm_svc.prompts import ImageRef, Message, PromptRenderer
from llm_svc.sampling_defaults import NO_DEFAULTS, SamplingDefaults
from llm_svc.service import LanguageService
from llm_svc.servicer import LanguageModelServicer
from llm_svc.tokenization import TokenizationService
from llm_svc.embedding_receiver import ReceiverSettings, largest_embedding_bytes
from llm_svc.vision_client import VisionClient
from protos import llm_pb2, llm_pb2_grpc, server_version
from protos.server import GrpcServer

log = logging.getLogger(__name__)

SERVICE_NAME = llm_pb2.DESCRIPTOR.services_by_name["LanguageModel"].full_name
ENGINE_WATCH_INTERVAL_S = 1.0


class IncompatibleVisionStage(RuntimeError):
    """vision_svc serves embeddings the language model cannot take."""


class LlmServer:
    def __init__(self, config: LlmConfig, engine_args: AsyncEngineArgs):
        self.config = config
        self.engine_args = engine_args
        self.vision = VisionClient(list(config.vision), config.max_message_bytes, config.max_embedding_bytes,
                                   tls=config.tls, server_name=config.tls_server_name, token=config.vision_auth_token,
                                   retire_s=config.vision_timeout_s,
                                   data_plane=ReceiverSettings(config.embedding_transport, config.shm_dir,
                                                               config.shm_max_bytes,
                                                               mooncake_protocol=config.mooncake_protocol,
                                                               device=config.embedding_device))
        self.engine: AsyncLLM | None = None
        self.grpc: GrpcServer | None = None
        self._engine_watch: asyncio.Task | None = None

    async def start(self, before_serving: Callable[[], object] = lambda: None) -> int:
        """Checks the vision stage, starts the engine, warms it, runs `before_serving` (what the process does once up:
        `llm_svc.__main__` freezes its heap), then serves; returns the bound port."""
        await self.vision.start()
        info = await self.vision.get_info(self.config.vision_start_timeout_s)
        self.vision.receiver.set_slot_bytes(largest_embedding_bytes(info))
        self.engine = AsyncLLM.from_engine_args(self.engine_args)
        model_config = self.engine.model_config
        hidden = model_config.hf_text_config.hidden_size
        if info.llm_hidden != hidden:
            self.engine.shutdown()
            raise IncompatibleVisionStage(
                f"vision_svc serves {info.model!r} with embeddings {info.llm_hidden} wide, but the language "
                f"model {model_config.model!r} has hidden size {hidden}: they are not the same InternVL model")
        dims = ModelDimensions(hidden_size=hidden, tokens_per_tile=info.tokens_per_tile,
                               max_model_len=model_config.max_model_len)
        check_work_limit(self.config, info, dims)
        limits = RequestLimits.agreed(self.config, info, dims)
        admission = AdmissionCheck(self.engine.renderer, self.engine.input_processor,
                                   await self.engine.get_supported_tasks(),
                                   ImageTokenCounter(TilingPolicy.from_info(info)), hidden)
        parser_flags = ParserFlags(self.engine.vllm_config.structured_outputs_config.reasoning_parser or None,
                                   self.config.tool_call_parser, self.config.enable_auto_tool_choice)
        parsers = OutputParsers(parser_flags, self.engine.renderer.get_tokenizer(), model_config)
        sampling_defaults = SamplingDefaults.from_model_config(model_config)
        if sampling_defaults != NO_DEFAULTS:
            log.info("sampling defaults (--generation-config %s): %s, max_tokens cap %s",
                     model_config.generation_config, sampling_defaults.values, sampling_defaults.max_tokens_cap)
        self.service = LanguageService(self.engine, self.vision, PromptRenderer(self.engine.renderer), admission,
                                       dims, limits, parsers, sampling_defaults)
        model_info = llm_pb2.GetModelInfoResponse(
            model=model_config.served_model_name, max_model_len=dims.max_model_len, hidden_size=hidden,
            max_images_per_request=limits.max_images_per_request, vocab_size=model_config.get_vocab_size(),
            max_request_bytes=limits.max_request_bytes,
            # Videos are the vision stage's to limit; its figures, so that a client can refuse early.
            max_videos_per_request=info.max_videos_per_request, max_video_frames=info.max_video_frames,
            max_video_bytes=info.max_video_bytes)
        self.grpc = GrpcServer(self.config.host, self.config.port, self.config.max_message_bytes,
                               self.config.grace_s, tls=self.config.tls, auth_token=self.config.auth_token,
                               reflection=self.config.reflection, health_port=self.config.health_port)
        tokenization = TokenizationService(self.engine.renderer, self.service.renderer, admission, limits)
        version = llm_pb2.GetVersionResponse(vllm_version=vllm.__version__, server_version=server_version())
        self.grpc.add_service(llm_pb2_grpc.add_LanguageModelServicer_to_server,
                              LanguageModelServicer(self.service, model_info, tokenization, version), SERVICE_NAME)
        port = await self.grpc.start()
        if self.config.metrics_port is not None:
            start_http_server(self.config.metrics_port, addr=self.config.host)
        await self._warm_up()
        before_serving()
        await self.grpc.set_serving()
        self._engine_watch = asyncio.create_task(self._watch_engine())
        return port

    async def _watch_engine(self) -> None:
        """A dead engine cannot recover: health turns NOT_SERVING so that balancers and liveness probes act."""
        while not self.engine.errored:
            await asyncio.sleep(ENGINE_WATCH_INTERVAL_S)
        await self.grpc.set_not_serving(f"the engine died: {self.engine.dead_error}")

    async def _warm_up(self) -> None:
        """A text request and an image request: the first image request builds vLLM's multimodal processor,
        which takes seconds that no client should wait for."""
        image = ImageRef("0" * 64)
        prompts = [{"prompt": "warm up"}, {
            "prompt": self.service.renderer.render([Message("user", (image, "warm up"))]),
            "multi_modal_data": {"image": [torch.zeros(self.service.dims.tokens_per_tile,
                                                       self.service.dims.hidden_size)]},
            "multi_modal_uuids": {"image": [image.content_hash]}}]
        for n, prompt in enumerate(prompts):
            engine_input = await self.service.renderer.engine_input(prompt)
            async for _ in self.engine.generate(engine_input, SamplingParams(max_tokens=2), f"warm-up-{n}"):
                pass
        log.info("engine warm: %s, max_model_len %d", self.engine.model_config.served_model_name,
                 self.engine.model_config.max_model_len)

    async def stop(self) -> None:
        if self._engine_watch is not None:
            self._engine_watch.cancel()
        if self.grpc is not None:
            await self.grpc.drain()
        if self.engine is not None:
            self.engine.shutdown()
        await self.vision.close()
