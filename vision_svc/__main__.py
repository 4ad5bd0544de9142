"""`python -m vision_svc --model DIR ...`: serve the vision stage until SIGTERM, then drain."""

import asyncio
import logging
import sys

from protos.heap import freeze_startup_heap
from protos.lifetime import start_orphan_guard
from protos.logs import configure_logging
from protos.malloc import limit_fragmentation
from protos.server import wait_for_shutdown_signal
from protos.tracing import start_tracing
from vision_svc.config import parse_config
from vision_svc.server import VisionServer

ENCODER_MMAP_THRESHOLD = 4 << 20

log = logging.getLogger("vision_svc")


async def serve(config) -> None:
    server = VisionServer(config)
    try:
        port = await server.start(before_serving=freeze_startup_heap)
    except OSError as error:
        await server.stop()
        sys.exit(f"vision_svc: cannot start: {error}")
    log.info("vision_svc ready on %s:%d", config.host, port)
    await wait_for_shutdown_signal()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    # Before any thread or child process exists. Blocks up to 4 MiB (most of the encoder's activations) come from
    # the two arenas and are reused: mapped and zero-filled anew at each layer, a CPU pass took 1.16x as long. Up
    # to 32 MiB was faster still, but the soak saw vision_svc creep again (bench/RESULTS.md, soak).
    limit_fragmentation(mmap_threshold=ENCODER_MMAP_THRESHOLD)
    config = parse_config(argv)
    configure_logging(config.log_level, config.log_json)
    start_orphan_guard(config.log_json)  # before any child process exists
    stop_tracing = start_tracing(config.otlp_traces_endpoint, "vision_svc")
    try:
        asyncio.run(serve(config))
    finally:
        stop_tracing()  # exports the spans still queued


if __name__ == "__main__":
    main()
