"""`python -m gateway --llm HOST:PORT[,...] --port P`: serves the OpenAI API in front of llm_svc."""

import uvicorn

from gateway.app import create_app
from gateway.config import config_from_args
from protos.logs import configure_logging


def main(argv: list[str] | None = None) -> None:
    config = config_from_args(argv)
    configure_logging(config.log_level, config.log_json)
    # log_config=None keeps the handler configured above for uvicorn's loggers too.
    uvicorn.run(create_app(config), host=config.host, port=config.port, loop="uvloop", log_config=None,
                timeout_graceful_shutdown=config.shutdown_grace_s)


if __name__ == "__main__":
    main()
