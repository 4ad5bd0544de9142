"""The shared-memory slots between the two stages, without servers: the receiver's slots are allocated whole and
reused, the sender's `SlotWriter` maps each slot once and writes the exact bytes into it, and lets go of every
mapping whose slot is gone, so that nothing stays pinned; a large copy split over threads lands whole."""

import contextlib
import os

import numpy as np
import pytest
import torch

from protos import vision_pb2
from protos.transport import shared_memory
from protos.transport.slot_writer import PART_BYTES, SlotWriter

from tests.protos.transport_peer import embeddings_of


def bytes_of(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.view(torch.uint8).reshape(-1).numpy())


def mappings_into(directory: str) -> int:
    """Mappings of this process onto files of `directory` (an unlinked one still shows, marked deleted)."""
    with open("/proc/self/maps") as maps:
        return sum(1 for line in maps if f" {directory}/" in line)


@contextlib.contextmanager
def pool_and_writer(directory: str, slot_bytes: int, max_slots: int, **writer_settings):
    """The receiver's pool and the sender's writer over `directory`, both closed on the way out."""
    pool = shared_memory.SlotPool(directory, slot_bytes, max_slots)
    writer = SlotWriter(directory, **writer_settings)
    try:
        yield pool, writer
    finally:
        writer.close()
        pool.close()


def test_a_reused_slot_is_mapped_once_and_receives_the_exact_bytes_each_time(shm_dir):
    first, second = embeddings_of(0), embeddings_of(1)
    with pool_and_writer(shm_dir, first.nbytes, 1) as (pool, writer):
        for expected in (first, second):  # the second lease gets the same slot back
            lease = pool.lease(1, lease_s=10)
            [slot] = lease.offer().slots
            info = os.stat(os.path.join(shm_dir, slot.name))
            assert info.st_blocks * 512 >= info.st_size == first.nbytes  # allocated whole when made
            writer.write(slot, bytes_of(expected))
            received = lease.take(0, torch.bfloat16, tuple(expected.shape), expected.nbytes)
            assert torch.equal(received.view(torch.int16), expected.view(torch.int16))
            del received  # the slot goes back to the pool with the last tensor viewing it
            lease.close(writer_finished=True)
            assert writer.mapped == 1 and mappings_into(shm_dir) == 2  # the pool's and the writer's
        assert pool.live_slots == 1
    assert mappings_into(shm_dir) == 0


def test_a_slot_the_receiver_retires_is_unmapped_by_the_next_sweep(shm_dir):
    with pool_and_writer(shm_dir, 4096, 2, idle_s=3600) as (pool, writer):
        kept, retired = pool.lease(1, lease_s=10), pool.lease(1, lease_s=10)
        for lease in (kept, retired):
            writer.write(lease.offer().slots[0], memoryview(b"x" * 4096))
        retired.close(writer_finished=False)  # unlinked: the writer's mapping would pin its pages
        assert writer.drop_stale() == 1
        kept.close(writer_finished=True)
        assert writer.drop_stale() == 1  # its name still names the same file: kept mapped
    assert mappings_into(shm_dir) == 0


def test_an_idle_mapping_is_let_go(shm_dir):
    pool = shared_memory.SlotPool(shm_dir, 4096, 1)
    writer = SlotWriter(shm_dir, idle_s=0)
    lease = pool.lease(1, lease_s=10)
    writer.write(lease.offer().slots[0], memoryview(b"y" * 100))
    assert writer.drop_stale() == 0
    lease.close(writer_finished=True)
    pool.close()
    assert mappings_into(shm_dir) == 0


def test_a_slot_not_allocated_whole_is_written_with_pwrite_not_mapped(shm_dir):
    name = f"{shared_memory.SLOT_PREFIX}{'0' * 16}-1"  # sparse: a mapped write could meet a full tmpfs (SIGBUS)
    fd = os.open(os.path.join(shm_dir, name), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.ftruncate(fd, 1 << 20)
        writer = SlotWriter(shm_dir)
        writer.write(vision_pb2.SharedMemorySlot(name=name, size_bytes=1 << 20), memoryview(b"z" * 5000))
        assert writer.mapped == 0
        assert os.pread(fd, 5001, 0) == b"z" * 5000 + b"\0"
    finally:
        os.close(fd)


def allocated_segment(directory: str, name: str, size: int) -> int:
    fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.posix_fallocate(fd, 0, size)
    return fd


def test_a_name_that_comes_to_name_another_file_is_mapped_afresh(shm_dir):
    slot = vision_pb2.SharedMemorySlot(name=f"{shared_memory.SLOT_PREFIX}{'0' * 16}-2", size_bytes=4096)
    writer = SlotWriter(shm_dir)
    old = allocated_segment(shm_dir, slot.name, 4096)
    writer.write(slot, memoryview(b"a" * 10))
    os.unlink(os.path.join(shm_dir, slot.name))
    new = allocated_segment(shm_dir, slot.name, 4096)
    try:
        writer.write(slot, memoryview(b"b" * 10))
        assert (os.pread(old, 10, 0), os.pread(new, 10, 0)) == (b"a" * 10, b"b" * 10)
        assert writer.mapped == 1
    finally:
        os.close(old)
        os.close(new)
        os.unlink(os.path.join(shm_dir, slot.name))
        writer.close()
    assert mappings_into(shm_dir) == 0


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("nbytes", [0, 1, PART_BYTES - 1, 2 * PART_BYTES + 7, 3 * PART_BYTES + 1])
def test_a_copy_split_over_threads_writes_the_exact_bytes_and_nothing_past_them(shm_dir, threads, nbytes,
                                                                               monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # idle cores: the helpers take part
    size = 3 * PART_BYTES + 4096
    with pool_and_writer(shm_dir, size, 1, copy_threads=threads) as (pool, writer):
        lease = pool.lease(1, lease_s=10)
        [slot] = lease.offer().slots
        data = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
        writer.write(slot, memoryview(data))
        received = lease.take(0, torch.uint8, (size,), size).numpy()
        assert np.array_equal(received[:nbytes], data) and not received[nbytes:].any()
        del received
        lease.close(writer_finished=True)


def test_helpers_copy_only_while_cores_are_idle(shm_dir, monkeypatch):
    writer = SlotWriter(shm_dir, copy_threads=4)
    try:
        cores = os.cpu_count()
        for load, threads in ((0.0, min(4, 1 + cores)), (cores - 1.4, 2), (cores - 0.4, 1), (10 * cores, 1)):
            monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
            assert writer.threads_now() == threads
    finally:
        writer.close()
