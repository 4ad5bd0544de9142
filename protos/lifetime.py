"""A stage's helper processes end with it, however it ends.

Two mechanisms, because a stage starts two kinds of child processes:
- children whose code we own (vision_svc's preprocessing workers) call `die_with_parent()` first: the kernel
  kills them the moment their parent dies, even by SIGKILL, and a terminal's Ctrl-C is left to the parent,
  which stops them in order;
- children started by libraries (vLLM's engine core and its workers, multiprocessing's resource tracker) are
  watched by an orphan guard (`protos.orphan_guard`): a small process that `start_orphan_guard()` starts
  beside the stage, which notices the stage's end and stops whatever it left behind, and removes the
  shared-memory segments they had mapped and the stage's own temporary directory.

Linux only, as the stages are.
"""

import ctypes
import os
import signal
import subprocess
import sys
import tempfile

_PR_SET_PDEATHSIG = 1
# A stage's own temporary directory is named after it: TMP_PREFIX + its pid + a random suffix.
TMP_PREFIX = "internvl-stage-"
# Resolved once, here: `set_parent_death_signal` may run between fork and exec, where loading is unsafe.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def set_parent_death_signal(sig: signal.Signals) -> None:
    """The kernel sends `sig` to this process when the thread that started it ends (with its process)."""
    if _prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def die_with_parent() -> None:
    """For a child process: SIGKILL when the parent dies; SIGINT ignored (the parent decides when to stop).
    Call it first thing in the child (e.g. as a process pool's initializer)."""
    parent = os.getppid()
    set_parent_death_signal(signal.SIGKILL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if os.getppid() != parent:  # the parent died before the signal was armed
        os._exit(1)


def start_orphan_guard(log_json: bool = False) -> subprocess.Popen:
    """Starts the guard of this process's descendants, and gives the stage a temporary directory of its own
    (TMPDIR, for its children too), which the guard removes when the stage ends: vLLM, for one, leaves its
    IPC sockets in the temporary directory. The guard lives in a session of its own, so that the signals sent
    to the stage's process group (a terminal's Ctrl-C) do not reach it, and exits once the stage and
    everything the stage left are gone."""
    private_tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{os.getpid()}-")
    os.environ["TMPDIR"] = tempfile.tempdir = private_tmp
    command = [sys.executable, "-m", "protos.orphan_guard", str(os.getpid()), private_tmp]
    return subprocess.Popen([*command, "--log-json"] if log_json else command, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 on (the command name, field 2, is in parentheses and may hold spaces)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None


def process_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, which tells it apart from a later process that
    reuses its pid; None when it is gone."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def snapshot(pids: list[int]) -> dict[int, int]:
    """pid -> start time of those of `pids` that exist."""
    return {pid: started for pid in pids if (started := process_start_time(pid)) is not None}


def still_running(processes: dict[int, int]) -> list[int]:
    """Those of a snapshot's processes that still run: the same process (not a later one with its pid), and
    not a zombie (dead, waiting for its parent to collect it)."""
    return [pid for pid, started in processes.items()
            if (fields := _stat_fields(pid)) and int(fields[19]) == started and fields[0] != b"Z"]


def last_pid() -> int | None:
    """The pid this pid namespace gave out last, to a process or a thread (a file of a few bytes): while it stays the
    same, no process has started. None where the kernel does not say."""
    try:
        with open("/proc/sys/kernel/ns_last_pid", "rb") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def children_by_parent() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))):
            tree.setdefault(int(fields[1]), []).append(int(entry))
    return tree


def descendants(pid: int) -> list[int]:
    """Every living process below `pid`, children first."""
    tree = children_by_parent()
    found, frontier = [], [pid]
    while frontier:
        children = tree.get(frontier.pop(), [])
        found.extend(children)
        frontier.extend(children)
    return found


def mapped_shared_memory(pid: int) -> set[str]:
    """Paths under /dev/shm that `pid` has mapped: POSIX shared memory and named semaphores."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return set()
    return {path for line in lines
            if (path := line.split(maxsplit=5)[-1]).startswith("/dev/shm/") and not path.endswith(" (deleted)")}
