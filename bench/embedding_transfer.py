"""The embedding transfer alone: one 13-tile image of a 38B model (3328 x 5120 bf16, 34 MB) from vision_svc's
process into a tensor in llm_svc's process, per transport of the data plane.

    python -m bench.embedding_transfer [--repeats 10] [--no-veth] [--plot PNG]

The sender is vision_svc's real `EmbeddingSender` behind the real gRPC bootstrap in a spawned process; the
receiver is llm_svc's real `VisionClient`, forced onto each transport in turn: gRPC inline (the reference),
shared memory, the direct socket (and Mooncake where it imports; device IPC from GPU to GPU where CUDA is). A
plain TCP socket from the same kind of process is the reference for sockets: blocking `recv_into` straight into
a tensor (the best a socket does here), and asyncio streams' `readexactly` (what this bench measured before the
data plane). Every received tensor is checked bit for bit; each transfer starts after a pause of `SETTLE_S`.
A first table times the copies that shared memory is made of, in one process: vision_svc's write before
(`pwrite`), a memcpy into the slot's mapping it keeps on one thread, the same copy shared by the writer's threads
(now: one per idle core, up to 4), and the copy out of the slot that llm_svc avoids by handing on a view.
As root, the same runs again with the sender in a network namespace behind a veth pair (another host's
addresses; /dev/shm is still shared, so the probe still proves one host and shared memory still applies). A bar
chart of GB/s per transport and path goes beside the tables.
"""

import argparse
import asyncio
import contextlib
import mmap
import os
import pathlib
import tempfile
import time

import numpy as np
import torch

from bench import netns, plots
from bench.common import markdown_table, median, ratio, work_dir
from protos.transport import mooncake_plane, shared_memory, slot_writer
from bench.data_plane import (DataPlaneTimer, ServerProcess, serve_data_plane, serve_tcp, time_tcp,
                              time_tcp_blocking)

SHAPE = (13 * 256, 5120)  # [tiles * tokens_per_tile, llm_hidden] of InternVL3.5-38B
SHM_DIR = "/dev/shm"
# A pause before each transfer: the two processes finish freeing the previous transport's buffers (a gRPC inline
# transfer leaves 34 MB of messages to free on both sides) before the next is timed.
SETTLE_S = 0.1
# Mooncake Transfer Engine (over TCP here) too, where its package imports; device IPC where CUDA is (the sender's
# embeddings on its GPU, copied into the receiver's).
TRANSPORTS = (("grpc", "shm", "socket") + (("mooncake",) if mooncake_plane.unavailable_reason() is None else ())
              + (("device_ipc",) if torch.cuda.is_available() else ()))


def fixed_embeddings() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(SHAPE).to(torch.bfloat16)  # [3328, 5120], 34 MB


def measure(host: str, namespace: str | None, repeats: int) -> dict[str, float]:
    """Median seconds per transfer of each transport and of a plain socket, sender at `host`. The transports take
    turns, one transfer each per round, so that a load that comes and goes weighs on all of them alike."""
    expected = fixed_embeddings()
    with ServerProcess(serve_data_plane, host, SHM_DIR, namespace, fixed_embeddings) as port, \
            ServerProcess(serve_tcp, host, namespace, fixed_embeddings) as tcp_port:
        return asyncio.run(_rounds(host, port, tcp_port, expected, repeats))


async def _rounds(host: str, port: int, tcp_port: int, expected: torch.Tensor, repeats: int) -> dict[str, float]:
    timers = [DataPlaneTimer(host, port, transport, SHM_DIR, expected) for transport in TRANSPORTS]
    seconds: dict[str, list[float]] = {name: [] for name in (*TRANSPORTS, "plain TCP", "plain TCP, asyncio streams")}
    try:
        for n in range(repeats + 1):  # round 0 opens the channels and negotiates: not counted
            for timer in timers:
                await asyncio.sleep(SETTLE_S)
                elapsed = await timer.once()
                seconds[timer.transport] += [elapsed] if n else []
            await asyncio.sleep(SETTLE_S)
            [elapsed] = await asyncio.to_thread(time_tcp_blocking, host, tcp_port, expected.nbytes, SHAPE, 1)
            seconds["plain TCP"] += [elapsed] if n else []
            await asyncio.sleep(SETTLE_S)
            [elapsed] = await time_tcp(host, tcp_port, expected.nbytes, SHAPE, 1)
            seconds["plain TCP, asyncio streams"] += [elapsed] if n else []
    finally:
        for timer in timers:
            await timer.close()
    return {name: median(values) for name, values in seconds.items()}


def copy_alone(repeats: int) -> dict[str, float]:
    """Median seconds of the copies shared memory is made of, in turns in this process on one reused slot: the
    sender's write before (open, pwrite, close), a memcpy into the mapping it keeps on one thread and shared by
    the writer's threads (now), and what a receiver that copied the embeddings out of its slot would add (it hands
    on a view instead)."""
    expected = fixed_embeddings()
    data = memoryview(expected.view(torch.uint8).reshape(-1).numpy())
    directory = tempfile.mkdtemp(prefix="dvd-bench-", dir=SHM_DIR)
    pool = shared_memory.SlotPool(directory, expected.nbytes, 1)
    writer, one_thread = slot_writer.SlotWriter(directory), slot_writer.SlotWriter(directory, copy_threads=1)
    split = f"memcpy into the kept mapping, shared by {writer.threads_now()} threads (now)"
    lease = pool.lease(1, lease_s=3600)
    [slot] = lease.offer().slots
    fd = shared_memory.open_slot(directory, slot.name)
    received = np.frombuffer(mmap.mmap(fd, expected.nbytes), dtype=np.uint8)  # [nbytes], as the receiver sees it
    os.close(fd)
    seconds: dict[str, list[float]] = {"pwrite (before)": [], "memcpy into the kept mapping, 1 thread": [],
                                       split: [], "copy out of the slot (not done)": []}
    try:
        for n in range(repeats + 1):
            for name, step in (("pwrite (before)", lambda: shared_memory.write_slot(directory, slot, data)),
                               ("memcpy into the kept mapping, 1 thread", lambda: one_thread.write(slot, data)),
                               (split, lambda: writer.write(slot, data)),
                               ("copy out of the slot (not done)", lambda: torch.from_numpy(received).clone())):
                started = time.perf_counter()
                step()
                seconds[name] += [time.perf_counter() - started] if n else []
        if not np.array_equal(received, np.frombuffer(data, dtype=np.uint8)):
            raise AssertionError("the slot holds other bytes than those written")
    finally:
        del received
        lease.close(writer_finished=True)
        writer.close()
        one_thread.close()
        pool.close()
        os.rmdir(directory)
    return {name: median(values) for name, values in seconds.items()}


def table(title: str, seconds: dict[str, float], nbytes: int) -> str:
    rows = [[name, s * 1e3, nbytes / 1e9 / s, ratio(seconds["grpc"], s), ratio(seconds["plain TCP"], s)]
            for name, s in seconds.items()]
    return f"{title}\n\n" + markdown_table(["transport", "ms", "GB/s", "x gRPC inline", "x plain TCP"], rows)


def run(repeats: int, veth: bool = True, plot: pathlib.Path | None = None) -> str:
    """Markdown tables of every transport, measured now (across a veth pair too, when namespaces can be made);
    with `plot`, a PNG of their rates too."""
    nbytes = SHAPE[0] * SHAPE[1] * 2
    copies = copy_alone(repeats)
    measured = {"loopback": measure("127.0.0.1", None, repeats)}
    sections = [f"{nbytes / 1e6:.1f} MB ({SHAPE[0]} x {SHAPE[1]} bf16), median of {repeats}, bit-exact",
                "the copies of shared memory alone, in turns in one process\n\n" + markdown_table(
                    ["copy", "ms", "GB/s"], [[name, s * 1e3, nbytes / 1e9 / s] for name, s in copies.items()]),
                table("loopback (127.0.0.1)", measured["loopback"], nbytes)]
    reason = netns.unavailable_reason() if veth else "not asked (--no-veth)"
    if reason is None:
        space = netns.VethNamespace("x").create()
        try:
            measured["veth"] = measure(space.inside_address, space.name, repeats)
            sections.append(table(f"veth pair (sender in namespace {space.name})", measured["veth"], nbytes))
        finally:
            with contextlib.suppress(Exception):
                space.delete()
    else:
        sections.append(f"veth pair: skipped ({reason})")
    if plot:
        rates = {f"{name}\n{path}": nbytes / 1e9 / s for path, seconds in measured.items()
                 for name, s in seconds.items()}
        title = f"{nbytes / 1e6:.0f} MB of embeddings between two processes"
        sections.append(f"plot: {plots.bars(plot, title, 'GB/s', rates)}")
    return "\n\n".join(sections)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10, help="timed transfers per transport")
    parser.add_argument("--no-veth", action="store_true", help="loopback only, even as root")
    parser.add_argument("--plot", type=pathlib.Path, default=work_dir(None) / "embedding_transfer.png",
                        help="where the PNG of GB/s per transport goes")
    args = parser.parse_args()
    print(run(args.repeats, veth=not args.no_veth, plot=args.plot))


if __name__ == "__main__":
    main()
