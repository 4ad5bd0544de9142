"""Shared memory between the two stages on one host: segments the receiver creates, the sender writes into.

Receiver (llm_svc): a `SlotPool` keeps segments (files of the shared-memory directory, /dev/shm by default),
each allocated whole and mapped when it is made (so no transfer pays for page allocation or page faults) and
held with a shared flock for as long as the pool holds it. A request leases one slot per image (`SlotLease`); a
received embedding is a tensor that views its slot (no copy), and the slot goes back to the pool when that
tensor is freed: a slot is never written again while a tensor still views it. A slot that a writer may still be
filling (the call failed, was cancelled or timed out) is never reused: it is retired (name unlinked, mapping and
descriptor closed) and the kernel frees its pages when the writer lets go of them, so a late write lands in
memory nobody reads.

Sender (vision_svc): `slot_writer.SlotWriter` keeps each slot it wrote into mapped and copies into the mapping;
`write_slot` (open, `pwrite`, close) is its fallback for slots that were not allocated whole.

When a process dies the kernel drops its flocks, descriptors and mappings; `sweep_orphans` (run by both
stages) unlinks the names of segments whose owner holds no flock any more. Segments are plain files rather
than `multiprocessing.shared_memory`, whose resource tracker (Python < 3.13) unlinks segments behind the
owner's back.
"""

import fcntl
import hmac
import logging
import mmap
import os
import re
import secrets
import stat
import threading
import time
import weakref

import numpy as np
import torch

from protos import vision_pb2
from protos.transport.errors import TransferError

log = logging.getLogger(__name__)

DEFAULT_DIRECTORY = "/dev/shm"
SLOT_PREFIX = "dvd-emb-"
PROBE_PREFIX = "dvd-probe-"
_SLOT_NAME = re.compile(r"^dvd-emb-[0-9a-f]{16}-[0-9a-f]{1,16}$")
_PROBE_NAME = re.compile(r"^dvd-probe-[0-9a-f]{16}-[0-9a-f]{16}$")
PROBE_NONCE_BYTES = 32
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
# A segment younger than this may be between its creation and its owner's flock: the sweeper leaves it.
_SWEEP_MIN_AGE_S = 2.0


def new_instance_id() -> str:
    return secrets.token_hex(8)


def _create_segment(directory: str, name: str, size: int, allocate: bool = False) -> int:
    """A new segment's descriptor, flocked (shared) so that sweepers know its owner lives; with `allocate`, its
    pages are taken now (OSError ENOSPC when tmpfs is full), else when written."""
    fd = os.open(os.path.join(directory, name), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        os.ftruncate(fd, size)
        if allocate:
            os.posix_fallocate(fd, 0, size)
    except BaseException:
        os.close(fd)
        os.unlink(os.path.join(directory, name))
        raise
    return fd


def _open_checked(directory: str, name: str, pattern: re.Pattern, flags: int) -> int:
    """A descriptor of segment `name` (a name a peer sent: checked against `pattern`, no path, a regular file)."""
    if not pattern.match(name):
        raise TransferError(f"shared memory: {name!r} is not a segment name of this data plane")
    try:
        fd = os.open(os.path.join(directory, name), flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as error:
        raise TransferError(f"shared memory: cannot open {name}: {error.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TransferError(f"shared memory: {name} is not a regular file")
    return fd


def check_slot_name(name: str) -> None:
    """TransferError unless `name` (sent by a peer) is a slot name of this data plane: no path, no other file."""
    if not _SLOT_NAME.match(name):
        raise TransferError(f"shared memory: {name!r} is not a segment name of this data plane")


def open_slot(directory: str, name: str) -> int:
    """A writable descriptor of the peer's slot `name`; TransferError when it is not one, or not here."""
    return _open_checked(directory, name, _SLOT_NAME, os.O_RDWR)


def write_slot(directory: str, slot: vision_pb2.SharedMemorySlot, data: memoryview) -> None:
    """Writes `data` at the start of the peer's slot with `pwrite`; TransferError when it cannot."""
    if len(data) > slot.size_bytes:
        raise TransferError(f"shared memory: {len(data)} bytes do not fit slot {slot.name} of {slot.size_bytes}")
    fd = open_slot(directory, slot.name)
    try:
        if os.fstat(fd).st_size < len(data):
            raise TransferError(f"shared memory: slot {slot.name} is smaller than announced")
        written = 0
        while written < len(data):  # pwrite may stop short (a signal); tmpfs full raises ENOSPC
            written += os.pwrite(fd, data[written:], written)
    except OSError as error:
        raise TransferError(f"shared memory: writing slot {slot.name}: {error.strerror}") from None
    finally:
        os.close(fd)


def sweep_orphans(directory: str) -> list[str]:
    """Unlinks the segments of this data plane whose owner is gone (nobody holds their flock); their names."""
    removed = []
    try:
        names = [n for n in os.listdir(directory) if n.startswith((SLOT_PREFIX, PROBE_PREFIX))]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or time.time() - info.st_ctime < _SWEEP_MIN_AGE_S:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.stat(path, follow_symlinks=False).st_ino == info.st_ino:
                os.unlink(path)
                removed.append(name)
        except OSError:  # BlockingIOError: its owner holds it
            pass
        finally:
            os.close(fd)
    if removed:
        log.info("shared memory: removed %d segments of processes that are gone", len(removed))
    return removed


class SameHostProbe:
    """Receiver side of the proof of one host: a segment holding a random nonce that only a process seeing the
    same shared-memory directory can read back. Addresses prove nothing (network namespaces share /dev/shm)."""

    def __init__(self, directory: str, instance_id: str):
        self.name = f"{PROBE_PREFIX}{instance_id}-{secrets.token_hex(8)}"
        self._nonce = secrets.token_bytes(PROBE_NONCE_BYTES)
        self._directory = directory
        self._fd = _create_segment(directory, self.name, PROBE_NONCE_BYTES)
        os.pwrite(self._fd, self._nonce, 0)

    def matches(self, read_back: bytes) -> bool:
        return hmac.compare_digest(read_back, self._nonce)

    def close(self) -> None:
        if self._fd >= 0:
            os.unlink(os.path.join(self._directory, self.name))
            os.close(self._fd)
            self._fd = -1


def read_probe(directory: str, name: str) -> bytes:
    """Sender side of the proof: the nonce in the peer's probe segment; TransferError when it is not here."""
    fd = _open_checked(directory, name, _PROBE_NAME, os.O_RDWR)  # a slot will need writing too
    try:
        return os.pread(fd, PROBE_NONCE_BYTES, 0)
    finally:
        os.close(fd)


class Slot:
    """One segment of the pool: its name, descriptor (holding the flock) and mapping."""

    def __init__(self, directory: str, name: str, size: int):
        self.name = name
        self.path = os.path.join(directory, name)
        self.size = size
        self.fd = _create_segment(directory, name, size, allocate=True)
        try:  # page tables filled now: reading a received tensor takes no fault
            self.mapping = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | _MAP_POPULATE)
        except BaseException:
            os.close(self.fd)
            os.unlink(self.path)
            raise
        self._linked = True

    def unlink(self) -> None:
        """Removes the name (no new writer can open it); the memory stays for whoever maps it."""
        if self._linked:
            self._linked = False
            os.unlink(self.path)

    def close(self) -> None:
        """Unlinks, unmaps and closes; the pages live on only in a writer that still has the segment open."""
        self.unlink()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.mapping.close()
        except BufferError:
            pass  # called as the last tensor viewing it goes: the mapping goes with that view


class SlotPool:
    """The receiver's segments, each `slot_bytes` (the largest embedding of one image), at most `max_slots`."""

    def __init__(self, directory: str, slot_bytes: int, max_slots: int, instance_id: str | None = None):
        if slot_bytes < 1 or max_slots < 1:
            raise ValueError("a slot pool needs slot_bytes >= 1 and max_slots >= 1")
        self.directory = directory
        self.slot_bytes = slot_bytes
        self.max_slots = max_slots
        self.instance_id = instance_id or new_instance_id()
        self._lock = threading.Lock()  # slots come back from tensor finalizers, on whatever thread frees them
        self._free: list[Slot] = []
        self._all: set[Slot] = set()
        self._live = 0
        self._made = 0
        self._closed = False
        sweep_orphans(directory)

    @property
    def live_slots(self) -> int:
        """Slots that exist: free, leased, or viewed by a received tensor."""
        return self._live

    @property
    def free_slots(self) -> int:
        return len(self._free)

    @property
    def pressed(self) -> bool:
        """Fewer than half the slots are available: received tensors then copy out of their slot, so that a
        consumer holding embeddings for long (vLLM's multimodal cache) cannot drive every call inline."""
        return len(self._free) + self.max_slots - self._live < self.max_slots / 2

    def lease(self, count: int, lease_s: float) -> "SlotLease | None":
        """`count` slots for one request, or None when the pool cannot hold them now (the request goes inline)."""
        with self._lock:
            if self._closed or count > len(self._free) + self.max_slots - self._live:
                return None
            taken = [self._free.pop() for _ in range(min(count, len(self._free)))]
            needed = count - len(taken)
            self._live += needed
            names = [f"{SLOT_PREFIX}{self.instance_id}-{self._made + i:x}" for i in range(needed)]
            self._made += needed
        made: list[Slot] = []
        try:
            for name in names:
                made.append(Slot(self.directory, name, self.slot_bytes))
        except OSError as error:
            with self._lock:
                self._live -= needed - len(made)
                self._all.update(made)
            for slot in taken + made:
                self._give_back(slot)
            log.warning("shared memory: cannot create a slot in %s: %s", self.directory, error)
            return None
        with self._lock:
            self._all.update(made)
        return SlotLease(self, taken + made, time.monotonic() + lease_s)

    def _give_back(self, slot: Slot) -> None:
        with self._lock:
            if not self._closed:
                self._free.append(slot)
                return
            self._live -= 1
            self._all.discard(slot)
        slot.close()

    def _retire(self, slot: Slot) -> None:
        with self._lock:
            self._live -= 1
            self._all.discard(slot)
        slot.close()

    def close(self) -> None:
        """Retires the free slots now and unlinks every name; slots still viewed by tensors are unmapped when
        those are freed (or the process ends)."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
            self._live -= len(free)
            self._all.difference_update(free)
            viewed = list(self._all)
        for slot in free:
            slot.close()
        for slot in viewed:
            slot.unlink()


class SlotLease:
    """The slots of one request, one per image in request order, writable by the peer until `deadline`."""

    def __init__(self, pool: SlotPool, slots: list[Slot], deadline: float):
        self._pool = pool
        self._slots: list[Slot | None] = list(slots)
        self.deadline = deadline

    def offer(self) -> vision_pb2.DataPlaneOffer:
        lease_ms = max(int((self.deadline - time.monotonic()) * 1000), 1)
        return vision_pb2.DataPlaneOffer(
            transport=vision_pb2.TRANSPORT_SHARED_MEMORY, lease_ms=lease_ms,
            slots=[vision_pb2.SharedMemorySlot(name=s.name, size_bytes=s.size) for s in self._slots])

    def take(self, index: int, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int) -> torch.Tensor:
        """The tensor the peer wrote into slot `index`, viewing the slot; the slot is the tensor's until it is freed."""
        slot = self._slots[index] if 0 <= index < len(self._slots) else None
        if slot is None:
            raise TransferError(f"shared memory: image {index} has no slot, or its slot was already read")
        if nbytes > slot.size:
            raise TransferError(f"shared memory: {nbytes} bytes announced for a slot of {slot.size}")
        if time.monotonic() > self.deadline:
            raise TransferError(f"shared memory: the lease of slot {slot.name} expired before its bytes were announced")
        self._slots[index] = None
        if nbytes == 0:
            self._pool._give_back(slot)
            return torch.empty(shape, dtype=dtype)
        if self._pool.pressed:
            copy = torch.empty(nbytes, dtype=torch.uint8)
            copy.numpy()[:] = np.frombuffer(slot.mapping, dtype=np.uint8, count=nbytes)
            self._pool._give_back(slot)
            return copy.view(dtype).reshape(shape)
        flat = np.frombuffer(slot.mapping, dtype=np.uint8, count=nbytes)
        weakref.finalize(flat, self._pool._give_back, slot)
        return torch.from_numpy(flat).view(dtype).reshape(shape)

    def close(self, writer_finished: bool) -> None:
        """Ends the lease: slots not read go back to the pool when the writer has finished (its stream ended),
        and are retired otherwise (it may still be writing)."""
        for i, slot in enumerate(self._slots):
            if slot is not None:
                self._slots[i] = None
                if writer_finished:
                    self._pool._give_back(slot)
                else:
                    self._pool._retire(slot)
