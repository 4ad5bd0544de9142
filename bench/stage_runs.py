"""What the benches that start the stages share: a log directory per run, the checkpoint, and a clean exit when
the run is interrupted (Ctrl-C, or SIGTERM, which acts as Ctrl-C from `prepare` on: the bench stops its stages
in its `finally`)."""

import argparse
import pathlib
import signal
import sys
import time
from collections.abc import Callable

from bench.common import work_dir


def _interrupted(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def prepare(args: argparse.Namespace, name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """(this run's log directory, the checkpoint): `--model`, or the tiny checkpoint built under `--work-dir`."""
    from deploy.tiny_model.build import build  # transformers: imported here, so that --help and refusals are quick

    signal.signal(signal.SIGTERM, _interrupted)
    directory = work_dir(args.work_dir)
    logs = directory / "logs" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    logs.mkdir(parents=True)
    model = args.model.absolute() if args.model else build(directory / "tiny", layout="original")
    return logs, model


def run(main: Callable[[], int], cleaned_up: str = "stages stopped") -> None:
    """Exits with `main`'s status, or 130 when interrupted, saying what was cleaned up."""
    try:
        sys.exit(main())
    except KeyboardInterrupt as interrupt:
        print(f"\ninterrupted ({interrupt or 'SIGINT'}): {cleaned_up}", file=sys.stderr)
        sys.exit(130)
