"""`python -m gateway --llm HOST:PORT[,...] --port P`: serves the OpenAI API in front of llm_svc."""

import signal

import uvicorn

from gateway.app import create_app
from gateway.config import config_from_args
from protos.heap import freeze_startup_heap
from protos.logs import configure_logging
from protos.tracing import start_tracing


def main(argv: list[str] | None = None) -> None:
    config = config_from_args(argv)
    configure_logging(config.log_level, config.log_json)
    stop_tracing = start_tracing(config.otlp_traces_endpoint, "gateway")
    flush_before_dying_of(signal.SIGTERM, stop_tracing)
    try:
        # log_config=None keeps the handler configured above for uvicorn's loggers too.
        app = create_app(config, before_serving=freeze_startup_heap)
        uvicorn.run(app, host=config.host, port=config.port, loop="uvloop", log_config=None,
                    timeout_graceful_shutdown=config.shutdown_grace_s)
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
