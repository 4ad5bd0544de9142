"""`python -m gateway --llm HOST:PORT[,...] --port P`: serves the OpenAI API in front of llm_svc."""

import os

# grpc reads this once, when it is imported. Its EventEngine client reads each message on a thread of its own and
# hands it to the completion-queue thread; its older I/O manager reads on the completion-queue thread itself: 3-4
# fewer thread wake-ups for every message from llm_svc, a message per token at low concurrency (bench/RESULTS.md,
# "grpc's client I/O"). A user's own GRPC_EXPERIMENTS is kept.
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_client")

import signal  # noqa: E402

import uvicorn  # noqa: E402

from gateway.app import create_app  # noqa: E402
from gateway.config import config_from_args  # noqa: E402
from protos.heap import freeze_startup_heap  # noqa: E402
from protos.logs import configure_logging  # noqa: E402
from protos.tracing import start_tracing  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    config = config_from_args(argv)
    configure_logging(config.log_level, config.log_json)
    stop_tracing = start_tracing(config.otlp_traces_endpoint, "gateway")
    flush_before_dying_of(signal.SIGTERM, stop_tracing)
    try:
        # log_config=None keeps the handler configured above for uvicorn's loggers too.
        app = create_app(config, before_serving=freeze_startup_heap)
        uvicorn.run(app, host=config.host, port=config.port, loop="uvloop", log_config=None,
                    timeout_graceful_shutdown=config.shutdown_grace_s,
                    timeout_keep_alive=config.keep_alive_timeout_s)
    finally:
        stop_tracing()  # exports the spans still queued



def flush_before_dying_of(sig: signal.Signals, flush) -> None:
    """Once shut down, uvicorn raises again the signal that stopped it, to the handler in place before it ran: by
    default SIGTERM would end the process there, before the spans still queued are exported."""
    def handler(signum, _frame):
        flush()
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)  # the end the signal would have had: killed by it

    signal.signal(sig, handler)


if __name__ == "__main__":
    main()
