"""`python -m protos.orphan_guard PID TMPDIR [--log-json]`: when process PID ends, however it ends, stop what it
left running.

Started by each stage beside itself (`protos.lifetime.start_orphan_guard`). While the stage lives, the guard
notes its descendants every `SCAN_INTERVAL_S` once a process may have started (the pid namespace's last pid has
moved; finding them reads every process's /proc entry, milliseconds on a busy host), and the shared-memory segments
they map whenever the processes or the names in /dev/shm change (and every `MAPS_INTERVAL_S` regardless): the kernel
takes milliseconds to render a large process's maps, and an idle replica should cost nothing. Once the stage is gone
(a pidfd tells at once), its orphans get SIGTERM, then SIGKILL after `GRACE_S`; then the segments that no living
process maps any more are removed, and so is the stage's own temporary directory. After a clean stop there is nothing
else to do. Light: it starts in milliseconds, and a scan with no new pid reads a few bytes and lists /dev/shm.
"""

import contextlib
import logging
import os
import select
import shutil
import signal
import sys
import time

from protos.lifetime import descendants, last_pid, mapped_shared_memory, snapshot, still_running
from protos.logs import configure_logging

SCAN_INTERVAL_S = 0.5
MAPS_INTERVAL_S = 5.0
SHM_DIR = "/dev/shm"
# After a clean stop, helpers such as multiprocessing's resource tracker take a moment to notice and exit.
SETTLE_S = 2.0
GRACE_S = 5.0

log = logging.getLogger("orphan_guard")


class Watched:
    """The stage's descendants (pid -> start time) and the shared memory they mapped, as last seen."""

    def __init__(self, stage: int):
        self.stage = stage
        self.processes: dict[int, int] = {}
        self.shared_memory: set[str] = set()
        self._below: list[int] = []  # the descendants at the last look
        self._last_pid: int | None = None  # the namespace's last pid then
        self._seen: tuple[frozenset[int], frozenset[str]] | None = None  # processes and names at the last maps read
        self._maps_read_at = 0.0
        self._read_again = False

    def scan(self) -> None:
        latest = last_pid()  # read first: a process that starts during the look moves it again for the next scan
        if latest is None or latest != self._last_pid:
            self._below = [pid for pid in descendants(self.stage) if pid != os.getpid()]
            self.processes.update(snapshot(self._below))
            self._last_pid = latest
        seen = (frozenset(self._below), frozenset(_shared_memory_names()))
        changed = seen != self._seen
        if changed or self._read_again or time.monotonic() - self._maps_read_at >= MAPS_INTERVAL_S:
            for pid in [self.stage, *self._below]:
                self.shared_memory |= mapped_shared_memory(pid)
            self._seen, self._maps_read_at = seen, time.monotonic()
            # A segment is created, then mapped: read once more next time in case the first read fell between.
            self._read_again = changed

    def alive(self) -> list[int]:
        """Watched processes still running, and their children."""
        living = still_running(self.processes)
        return list(dict.fromkeys(living + [child for pid in living for child in descendants(pid)]))


def _shared_memory_names() -> list[str]:
    try:
        return os.listdir(SHM_DIR)
    except OSError:
        return []


def stop(pids: list[int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not (pids := wait_for_exit(pids, GRACE_S)):
            return


def wait_for_exit(pids: list[int], timeout_s: float) -> list[int]:
    """The processes still running after up to `timeout_s`."""
    processes = snapshot(pids)
    deadline = time.monotonic() + timeout_s
    while (left := still_running(processes)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def remove_unmapped(paths: set[str]) -> list[str]:
    in_use = set().union(*(mapped_shared_memory(int(p)) for p in os.listdir("/proc") if p.isdigit()))
    removed = []
    for path in sorted(paths - in_use):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    return removed


def guard(stage: int) -> None:
    try:
        stage_fd = os.pidfd_open(stage)
    except ProcessLookupError:
        return
    watched = Watched(stage)
    while True:
        watched.scan()
        if select.select([stage_fd], [], [], SCAN_INTERVAL_S)[0]:
            break
    orphans = wait_for_exit(watched.alive(), SETTLE_S)
    if orphans:
        log.warning("stage %d ended and left %d processes running (%s): stopping them", stage, len(orphans),
                    ", ".join(map(str, orphans)))
        stop(orphans)
    removed = remove_unmapped(watched.shared_memory)
    if removed:
        log.warning("stage %d ended: removed shared memory it left: %s", stage, ", ".join(removed))


def main() -> None:
    # Neither a terminal's Ctrl-C nor a SIGTERM meant for the stage may end the guard before the stage.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    configure_logging(json_lines="--log-json" in sys.argv[3:])  # as the stage logs
    stage, private_tmp = int(sys.argv[1]), sys.argv[2]
    try:
        guard(stage)
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
