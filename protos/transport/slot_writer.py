"""vision_svc's writer into its callers' shared-memory slots: each slot is mapped once and stays mapped between
transfers, so that moving an image is one memcpy into pages that are already this process's.

Why a mapping kept between transfers: `pwrite` into tmpfs goes page by page through the page cache (about
5.5 GB/s for 34 MB here), and a fresh mapping takes a page fault per 4 KiB page on its first write (about
3.3 GB/s); a copy into a mapping already faulted in runs at memory speed (11-14 GB/s on a quiet core). The
receiver reuses its slots, so the mapping of a slot serves every later image written into it.

Why the copy is shared between threads: one core's memcpy is bounded by what one core can have in flight (4-7
GB/s here); two cores moved 34 MB in 2.5 ms against 3.0 ms. The copy is cut into 2 MiB parts that the writing
thread and its helpers take in turn (`_SharedCopy`), so that a helper that starts late leaves its parts to the
others. Helpers join only while cores are idle (by the load average): on a busy machine a helper is preempted
holding a part and the copy waits for it (two threads took 7.8 ms against one's 3.4 ms with both cores busy
here; torch's `copy_` over its OpenMP threads is worse still).

Why no SIGBUS: a write through a mapping into a page tmpfs has not allocated yet kills the writer with SIGBUS
when tmpfs is full (where `pwrite` would return ENOSPC). The receiver allocates each slot whole when it creates
it (`shared_memory.Slot`), and only a slot whose blocks cover its whole size is mapped; any other (a receiver
that did not allocate it) is written with `pwrite`.

Why nothing leaks: mappings are made with libc's mmap and the descriptor is closed at once (Python's
`mmap.mmap` keeps a duplicate open). A mapping pins its pages, so `drop_stale` (run by the sender's sweep)
unmaps every mapping whose slot name is gone (its owner retired the slot, or died and was swept) or that went
unused for `idle_s`.
"""

import concurrent.futures
import ctypes
import mmap
import os
import stat
import threading
import time

import numpy as np

from protos import vision_pb2
from protos.transport import shared_memory
from protos.transport.errors import TransferError

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value
# Page tables filled when mapping: the first write into a reused slot then takes no fault either.
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
# The copy's unit of work: small enough that a helper preempted mid-part holds up little, large enough that taking
# a part costs nothing next to copying it.
PART_BYTES = 2 << 20


def default_copy_threads() -> int:
    """The cores this process may run on, at most 4 (a fifth adds nothing to one socket's bandwidth)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


class _Mapping:
    """One slot mapped writable into this process; `users` writes are under way in it."""

    def __init__(self, name: str, fd: int, identity: tuple[int, int], size: int):
        address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_POPULATE, fd, 0)
        if address in (None, _MAP_FAILED):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self.address = address
        self.name = name
        self.identity = identity  # (st_dev, st_ino) of the slot's file
        self.size = size
        self.users = 0
        self.used = time.monotonic()

    def copy_in(self, data: memoryview, helpers: concurrent.futures.Executor | None, threads: int) -> None:
        """Copies `data` to the start of the slot, on this thread and up to `threads - 1` of `helpers`."""
        target = np.frombuffer((ctypes.c_char * len(data)).from_address(self.address), dtype=np.uint8)
        copy = _SharedCopy(target, np.frombuffer(data, dtype=np.uint8))
        for _ in range(min(threads, copy.parts) - 1 if helpers is not None else 0):
            helpers.submit(copy.run)
        copy.run()
        copy.wait()

    def unmap(self) -> None:
        _libc.munmap(self.address, self.size)


class _SharedCopy:
    """One copy cut into parts that whichever thread is free takes next. The caller copies too, and then waits only
    for the parts helpers have taken: a helper that starts late finds nothing left and touches nothing."""

    def __init__(self, target: np.ndarray, source: np.ndarray):
        self._target, self._source = target, source
        self.parts = max(1, len(source) // PART_BYTES)
        self._bounds = [len(source) * i // self.parts for i in range(self.parts + 1)]
        self._taken = self._copied = 0
        self._lock = threading.Condition()

    def run(self) -> None:
        while True:
            with self._lock:
                part, self._taken = self._taken, self._taken + 1
            if part >= self.parts:
                return
            start, end = self._bounds[part], self._bounds[part + 1]
            np.copyto(self._target[start:end], self._source[start:end])  # numpy lets go of the GIL
            with self._lock:
                self._copied += 1
                if self._copied == self.parts:
                    self._lock.notify_all()

    def wait(self) -> None:
        with self._lock:
            self._lock.wait_for(lambda: self._copied == self.parts)


class SlotWriter:
    """The slots of this process's callers that it has written into, by name."""

    def __init__(self, directory: str, idle_s: float = 30.0, copy_threads: int | None = None):
        self.directory = directory
        self.idle_s = idle_s
        self.copy_threads = copy_threads or default_copy_threads()
        self._helpers = concurrent.futures.ThreadPoolExecutor(self.copy_threads - 1, "slot-copy") \
            if self.copy_threads > 1 else None
        self._lock = threading.Lock()  # writes run on worker threads, the sweep on another
        self._mappings: dict[str, _Mapping] = {}

    @property
    def mapped(self) -> int:
        return len(self._mappings)

    def write(self, slot: vision_pb2.SharedMemorySlot, data: memoryview) -> None:
        """Writes `data` at the start of the peer's slot; TransferError when it cannot (the caller sends inline)."""
        if len(data) > slot.size_bytes:
            raise TransferError(f"shared memory: {len(data)} bytes do not fit slot {slot.name} of {slot.size_bytes}")
        if not len(data):
            return
        mapping = self._acquire(slot.name, len(data))
        if mapping is None:
            shared_memory.write_slot(self.directory, slot, data)
            return
        try:
            mapping.copy_in(data, self._helpers, self.threads_now())
        finally:
            self._release(mapping)

    def threads_now(self) -> int:
        """Threads for the next copy: this one, and a helper per core idle on average over the last minute, rounded
        (on a busy machine a helper waits for a core, and the copy for the part it took)."""
        idle = (os.cpu_count() or 1) - os.getloadavg()[0]
        return 1 + min(self.copy_threads - 1, max(int(idle + 0.5), 0))

    def _acquire(self, name: str, nbytes: int) -> _Mapping | None:
        """The mapping of slot `name` (made now if needed), held for one write; None: write it with pwrite."""
        shared_memory.check_slot_name(name)
        try:
            info = os.stat(os.path.join(self.directory, name), follow_symlinks=False)
        except OSError as error:
            raise TransferError(f"shared memory: cannot open {name}: {error.strerror}") from None
        with self._lock:
            known = self._mappings.get(name)
            if known is not None and known.identity == (info.st_dev, info.st_ino) and known.size >= nbytes:
                known.users += 1
                return known
        mapping = self._map(name, nbytes)
        if mapping is None:
            return None
        with self._lock:
            replaced = self._mappings.get(name)
            if replaced is not None and replaced.users == 0:
                replaced.unmap()
            self._mappings[name] = mapping  # a replaced mapping still in use is unmapped by its last user
            mapping.users += 1
        return mapping

    def _release(self, mapping: _Mapping) -> None:
        with self._lock:
            mapping.users -= 1
            mapping.used = time.monotonic()
            replaced = mapping.users == 0 and self._mappings.get(mapping.name) is not mapping
        if replaced:
            mapping.unmap()

    def _map(self, name: str, nbytes: int) -> _Mapping | None:
        fd = shared_memory.open_slot(self.directory, name)
        try:
            info = os.fstat(fd)
            if info.st_size < nbytes:
                raise TransferError(f"shared memory: slot {name} is smaller than announced")
            if info.st_blocks * 512 < info.st_size:
                return None  # not allocated whole: a write through a mapping could meet a full tmpfs
            return _Mapping(name, fd, (info.st_dev, info.st_ino), info.st_size)
        except OSError as error:
            raise TransferError(f"shared memory: mapping slot {name}: {error.strerror}") from None
        finally:
            os.close(fd)

    def drop_stale(self) -> int:
        """Unmaps the mappings not in use whose slot name is gone or names another file, or that went unused for
        `idle_s`; how many are left."""
        now = time.monotonic()
        with self._lock:
            candidates = [(name, m) for name, m in self._mappings.items() if m.users == 0]
        stale = []
        for name, mapping in candidates:
            try:
                info = os.stat(os.path.join(self.directory, name), follow_symlinks=False)
                current = stat.S_ISREG(info.st_mode) and (info.st_dev, info.st_ino) == mapping.identity
            except OSError:
                current = False
            if not current or now - mapping.used > self.idle_s:
                stale.append((name, mapping))
        with self._lock:
            for name, mapping in stale:
                if mapping.users == 0 and self._mappings.get(name) is mapping:
                    del self._mappings[name]
                    mapping.unmap()
            return len(self._mappings)

    def close(self) -> None:
        """Unmaps everything not in use (at shutdown no write is)."""
        if self._helpers is not None:
            self._helpers.shutdown(wait=True)
        with self._lock:
            for name, mapping in list(self._mappings.items()):
                if mapping.users == 0:
                    del self._mappings[name]
                    mapping.unmap()
