"""Child processes end with their stage: by the parent-death signal for our own workers, by the orphan guard
for everything else (with the shared memory they mapped)."""

import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from protos import lifetime

ROOT = pathlib.Path(__file__).resolve().parents[2]


def wait_until(condition, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def running(pid: int) -> bool:
    return bool(lifetime.still_running(lifetime.snapshot([pid])))


def private_tmp_dirs(pid: int) -> list[pathlib.Path]:
    return list(pathlib.Path(tempfile.gettempdir()).glob(f"{lifetime.TMP_PREFIX}{pid}-*"))


def ignored_signals(pid: int) -> set[signal.Signals]:
    status = pathlib.Path(f"/proc/{pid}/status").read_text()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return {sig for sig in signal.Signals if mask >> (sig - 1) & 1}


def start_stage(script: str, tmp_path: pathlib.Path) -> tuple[subprocess.Popen, list[int]]:
    """A stand-in stage running `script`, which writes the pids of the children it started, one per line, to
    a file; returns once they are written."""
    pids_file = tmp_path / "pids"
    stage = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), str(pids_file)], cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    wait_until(lambda: pids_file.exists() and pids_file.read_text().endswith("\n"))
    return stage, [int(line) for line in pids_file.read_text().split()]


# A child that ignores SIGTERM, started by a library as far as the stage knows: nothing tells it to stop.
STUBBORN_CHILD = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"


def test_guard_stops_what_a_killed_stage_left_and_removes_its_shared_memory(tmp_path):
    stage, (guard, child) = start_stage(f"""
        import subprocess, sys, time
        from multiprocessing import shared_memory
        from protos.lifetime import start_orphan_guard
        guard = start_orphan_guard()
        child = subprocess.Popen([sys.executable, "-c", {STUBBORN_CHILD!r}])
        segment = shared_memory.SharedMemory(create=True, size=4096, name="lifetime-test-{os.getpid()}")
        time.sleep(1.5)  # the guard scans every 0.5 s
        open(sys.argv[1], "w").write(f"{{guard.pid}}\\n{{child.pid}}\\n")
        time.sleep(600)
    """, tmp_path)
    segment = pathlib.Path(f"/dev/shm/lifetime-test-{os.getpid()}")
    private_tmp, = private_tmp_dirs(stage.pid)
    assert segment.exists() and running(child)
    stage.kill()
    stage.wait()
    wait_until(lambda: not running(child) and not running(guard))  # SIGTERM ignored: SIGKILL after the grace
    assert not segment.exists() and not private_tmp.exists()


def test_guard_leaves_nothing_behind_and_kills_nothing_after_a_clean_exit(tmp_path):
    stage, (guard,) = start_stage("""
        import sys, time
        from protos.lifetime import start_orphan_guard
        guard = start_orphan_guard()
        open(sys.argv[1], "w").write(f"{guard.pid}\\n")
        time.sleep(1)
    """, tmp_path)
    private_tmp, = private_tmp_dirs(stage.pid)
    assert stage.wait(10) == 0
    wait_until(lambda: not running(guard), timeout_s=5)
    assert not private_tmp.exists()


def test_guard_ignores_the_signals_meant_for_the_stage(tmp_path):
    stage, (guard,) = start_stage("""
        import sys, time
        from protos.lifetime import start_orphan_guard
        guard = start_orphan_guard()
        open(sys.argv[1], "w").write(f"{guard.pid}\\n")
        time.sleep(600)
    """, tmp_path)
    wait_until(lambda: ignored_signals(guard) >= {signal.SIGINT, signal.SIGTERM}, timeout_s=5)
    os.kill(guard, signal.SIGINT)
    os.kill(guard, signal.SIGTERM)
    time.sleep(0.5)
    assert running(guard)
    stage.kill()
    stage.wait()
    wait_until(lambda: not running(guard), timeout_s=5)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_worker_that_dies_with_its_parent_goes_at_once(tmp_path, sig):
    parent, (worker,) = start_stage("""
        import multiprocessing, sys, time
        from protos.lifetime import die_with_parent
        if __name__ == "__main__":
            pool = multiprocessing.get_context("spawn").Pool(1, initializer=die_with_parent)
            open(sys.argv[1], "w").write(f"{pool.apply(__import__('os').getpid)}\\n")
            time.sleep(600)
    """, tmp_path)
    os.kill(worker, signal.SIGINT)  # a terminal's Ctrl-C is the parent's to handle
    time.sleep(0.3)
    assert running(worker)
    parent.send_signal(sig)
    parent.wait()
    wait_until(lambda: not running(worker), timeout_s=5)


def test_descendants_and_start_times(tmp_path):
    stage, (child,) = start_stage(f"""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {STUBBORN_CHILD!r}])
        open(sys.argv[1], "w").write(f"{{child.pid}}\\n")
        time.sleep(600)
    """, tmp_path)
    try:
        assert lifetime.descendants(stage.pid) == [child]
        assert lifetime.process_start_time(child) >= lifetime.process_start_time(stage.pid)
    finally:
        os.kill(child, signal.SIGKILL)
        stage.kill()
        stage.wait()
    wait_until(lambda: not running(child))


def test_guard_reads_the_maps_only_when_processes_or_segments_change(tmp_path, monkeypatch):
    from protos import orphan_guard
    reads = []
    monkeypatch.setattr(orphan_guard, "SHM_DIR", str(tmp_path))
    monkeypatch.setattr(orphan_guard, "mapped_shared_memory", lambda pid: reads.append(pid) or set())
    stage = subprocess.Popen(["sleep", "60"])  # a stage without children: one maps read per scan that reads
    watched = orphan_guard.Watched(stage.pid)
    watched.scan()
    watched.scan()  # once more after a change: a new segment may be mapped a moment after it is created
    assert len(reads) == 2
    watched.scan()
    watched.scan()
    assert len(reads) == 2
    (tmp_path / "psm_new").touch()
    watched.scan()
    watched.scan()
    watched.scan()
    assert len(reads) == 4
    monkeypatch.setattr(orphan_guard, "MAPS_INTERVAL_S", 0.0)
    watched.scan()
    assert len(reads) == 5
    stage.kill()
    stage.wait()


def test_guard_walks_the_processes_only_once_a_new_pid_was_given_out(monkeypatch):
    from protos import orphan_guard
    walks, pid = [], [100]
    monkeypatch.setattr(orphan_guard, "last_pid", lambda: pid[0])
    monkeypatch.setattr(orphan_guard, "descendants", lambda stage: walks.append(stage) or [])
    watched = orphan_guard.Watched(os.getpid())
    watched.scan()
    watched.scan()
    assert len(walks) == 1
    pid[0] = 101
    watched.scan()
    watched.scan()
    assert len(walks) == 2
    pid[0] = None  # a kernel that does not say: every scan walks
    watched.scan()
    watched.scan()
    assert len(walks) == 4


def test_guard_finds_a_child_started_after_its_last_walk():
    from protos import orphan_guard
    stage = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; input(); "
                              f"subprocess.Popen([sys.executable, '-c', {STUBBORN_CHILD!r}]); time.sleep(600)"],
                             stdin=subprocess.PIPE, text=True)
    try:
        watched = orphan_guard.Watched(stage.pid)
        watched.scan()
        watched.scan()
        assert set(watched.processes) == set()
        stage.stdin.write("\n")
        stage.stdin.flush()
        wait_until(lambda: lifetime.descendants(stage.pid))
        watched.scan()
        assert set(watched.processes) == set(lifetime.descendants(stage.pid))
    finally:
        for pid in lifetime.descendants(stage.pid):
            os.kill(pid, signal.SIGKILL)
        stage.kill()
        stage.wait()
