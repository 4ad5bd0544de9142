"""`python -m llm_svc --model DIR --vision HOST:PORT ...`: serve the language stage until SIGTERM, then drain."""

import asyncio
import logging
import os
import sys

from vllm import envs

from llm_svc import vllm_plugin
from llm_svc.config import parse_config
from llm_svc.cpu_defaults import check_parallel_layout
from llm_svc.limits import WorkLimitTooSmall
from llm_svc.server import IncompatibleVisionStage, LlmServer
from protos.errors import Unavailable
from protos.heap import freeze_startup_heap
from protos.lifetime import start_orphan_guard
from protos.logs import configure_logging
from protos.malloc import limit_fragmentation
from protos.server import wait_for_shutdown_signal
from protos.tracing import configure, settings_from

log = logging.getLogger("llm_svc")


async def serve(config, engine_args) -> None:
    server = LlmServer(config, engine_args)
    try:
        port = await server.start(before_serving=freeze_startup_heap)
    except (IncompatibleVisionStage, WorkLimitTooSmall, Unavailable, OSError) as error:
        await server.stop()
        sys.exit(f"llm_svc: cannot start: {error}")
    # vLLM's output path reads its environment variables at every engine step (os.environ, ~5 a step); vLLM's own
    # engine processes cache them once up, and nothing changes this process's environment after start-up either.
    envs.enable_envs_cache()
    log.info("llm_svc ready on %s:%d, vision stage at %s", config.host, port, ",".join(config.vision))
    await wait_for_shutdown_signal()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    limit_fragmentation()  # before any thread or child process exists
    vllm_plugin.keep_enabled()  # before vLLM reads its environment
    config, engine_args = parse_config(argv)
    if config.cpu_defaults is not None:
        try:
            check_parallel_layout(engine_args)  # else vLLM starts, then fails on the first token
        except ValueError as error:
            sys.exit(f"llm_svc: cannot start: {error}")
    configure_logging(config.log_level, config.log_json)
    if not vllm_plugin.installed():
        log.warning("the project's vLLM plugin is not installed (pip install the project): two concurrent "
                    "requests with images of different sizes would stop the engine")
    if config.cpu_defaults is not None:
        config.cpu_defaults.apply(log)  # logs what llm_svc picked; the engine's workers inherit its environment
    start_orphan_guard(config.log_json)  # before any child process exists
    try:
        tracing = settings_from(engine_args.otlp_traces_endpoint, "llm_svc")
    except ValueError as error:
        sys.exit(f"llm_svc: cannot start: {error}")
    if tracing is not None:
        # vLLM's --otlp-traces-endpoint is this stage's flag. Set from OTEL_* alone, vLLM gets it too: only then
        # does it take the trace context, so that its own span of each request joins the trace.
        engine_args.otlp_traces_endpoint = tracing.endpoint
        # vLLM's engine and worker processes set up their own tracing (start-up spans) from the environment.
        os.environ.setdefault("OTEL_SERVICE_NAME", tracing.service_name)
    # Before the engine, so that vLLM's spans go through it too (vLLM's own attempt to set one only logs a warning).
    stop_tracing = configure(tracing)
    try:
        asyncio.run(serve(config, engine_args))
    finally:
        stop_tracing()  # exports the spans still queued


if __name__ == "__main__":
    main()
