"""Same-host device IPC: embeddings that the sender holds in device memory go to the receiver's device without
a trip through host memory.

The mechanism is torch's own storage sharing, what `torch.multiprocessing` uses to pass device tensors between
processes: CUDA's `UntypedStorage._share_cuda_()` on the sender and `UntypedStorage._new_shared_cuda(...)` on
the receiver (cudaIpcGetMemHandle / cudaIpcOpenMemHandle underneath); torch_npu's `_share_npu_()` /
`_new_shared_npu(...)` with the same arguments on Ascend NPUs (which have no IPC events: the sender synchronizes
its device before exporting, as it does for CUDA here too).

Sender (`DeviceExports`): exports one image's tensor and keeps a reference to it under a lease id, so that its
memory is neither freed nor reused by the sender's allocator while the receiver may read it; the reference goes
when the receiver releases the lease (the ReleaseDeviceMemory call) or when the lease is over (a receiver killed
mid-transfer), whichever comes first. Receiver (`open_copy`): opens the handle, copies the tensor into memory of
its own device, waits for the copy, and lets go of the opened memory; only then may the lease be released.

Both processes must see the exporting device under the same index (the handle's `device_index` is the sender's),
and torch's IPC reference counter of an export opened by a receiver that was then killed stays raised: the
sender's allocator keeps that block until the sender exits (torch's limitation, not this lease's).
"""

import dataclasses
import functools
import secrets
import threading
import time
from collections.abc import Callable

import torch

from protos import vision_pb2
from protos.transport.errors import TransferError


@dataclasses.dataclass(frozen=True)
class DeviceBackend:
    """One kind of device's IPC: how a storage is exported, opened, and its device waited for."""
    kind: str  # torch.device.type: "cuda", "npu"
    available: Callable[[], bool]
    share: Callable[[torch.UntypedStorage], tuple]  # -> (device, handle, size, offset, ref counter handle,
    #                                                     ref counter offset, event handle, event sync required)
    open: Callable[..., torch.UntypedStorage]  # the same eight, as `share` returned them
    synchronize: Callable[[torch.device], None]


def _cuda_open(*shared) -> torch.UntypedStorage:
    torch.cuda._lazy_init()
    return torch.UntypedStorage._new_shared_cuda(*shared)


@functools.cache
def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers torch.npu and the storage methods)
    except ImportError:
        return False
    return torch.npu.is_available()


def _npu_open(*shared) -> torch.UntypedStorage:
    return torch.UntypedStorage._new_shared_npu(*shared)


BACKENDS: dict[str, DeviceBackend] = {
    "cuda": DeviceBackend("cuda", torch.cuda.is_available, lambda storage: storage._share_cuda_(), _cuda_open,
                          lambda device: torch.cuda.synchronize(device)),
    "npu": DeviceBackend("npu", _npu_available, lambda storage: storage._share_npu_(), _npu_open,
                         lambda device: torch.npu.synchronize(device)),
}


def backend(kind: str) -> DeviceBackend | None:
    """The IPC of device kind `kind` when this process can use it."""
    found = BACKENDS.get(kind)
    return found if found is not None and found.available() else None


def available_kinds() -> tuple[str, ...]:
    return tuple(kind for kind in BACKENDS if backend(kind) is not None)


class DeviceExports:
    """The sender's exported tensors, each held until its receiver releases it or its lease is over."""

    def __init__(self):
        self._lock = threading.Lock()  # exports run on worker threads, releases on the event loop
        self._held: dict[str, tuple[torch.Tensor, float]] = {}

    @property
    def held(self) -> int:
        return len(self._held)

    def export(self, tensor: torch.Tensor, deadline: float) -> vision_pb2.DeviceMemoryHandle:
        """A handle to `tensor`'s memory, held until `deadline` (time.monotonic) at the latest."""
        ipc = backend(tensor.device.type)
        if ipc is None:
            raise TransferError(f"device IPC: the embeddings are on {tensor.device}, which has no IPC here")
        tensor = tensor.detach().contiguous()
        ipc.synchronize(tensor.device)  # the kernels that wrote it are done before another process reads
        device, handle, size, offset, counter, counter_offset, event, event_sync = ipc.share(tensor.untyped_storage())
        lease_id = secrets.token_hex(16)
        with self._lock:
            self._held[lease_id] = (tensor, deadline)
        return vision_pb2.DeviceMemoryHandle(
            lease_id=lease_id, device_index=int(device), handle=handle, storage_size_bytes=size,
            storage_offset_bytes=offset, ref_counter_handle=counter, ref_counter_offset=counter_offset,
            event_handle=event or b"", event_sync_required=bool(event_sync), tensor_offset=tensor.storage_offset())

    def release(self, lease_ids) -> int:
        """Drops the references of these leases; how many were still held."""
        with self._lock:
            return sum(self._held.pop(lease_id, None) is not None for lease_id in lease_ids)

    def drop_expired(self, now: float | None = None) -> int:
        """Drops the references whose lease is over (their receiver never released them); how many."""
        now = time.monotonic() if now is None else now
        with self._lock:
            expired = [lease_id for lease_id, (_, deadline) in self._held.items() if deadline <= now]
            for lease_id in expired:
                del self._held[lease_id]
        return len(expired)


def open_copy(handle: vision_pb2.DeviceMemoryHandle, kind: str, dtype: torch.dtype, shape: tuple[int, ...],
              nbytes: int, device: torch.device) -> torch.Tensor:
    """The exported tensor, copied into a new tensor on `device` (this process's memory); blocking."""
    ipc = backend(kind)
    if ipc is None:
        raise TransferError(f"device IPC: no {kind} IPC in this process")
    end = handle.tensor_offset * dtype.itemsize + nbytes
    if end > handle.storage_size_bytes:
        raise TransferError(f"device IPC: {nbytes} bytes announced past an export of {handle.storage_size_bytes}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype, device=device)
    try:
        storage = ipc.open(handle.device_index, handle.handle, handle.storage_size_bytes,
                           handle.storage_offset_bytes, handle.ref_counter_handle, handle.ref_counter_offset,
                           handle.event_handle or None, handle.event_sync_required)
    except RuntimeError as error:  # a handle of a sender that is gone, or of another host's device
        raise TransferError(f"device IPC: cannot open the handle of lease {handle.lease_id}: {error}") from None
    source = torch.empty(0, dtype=dtype, device=storage.device).set_(storage, handle.tensor_offset, shape)
    copy = torch.empty(shape, dtype=dtype, device=device)
    copy.copy_(source)
    ipc.synchronize(copy.device)  # copied before the sender may let go of its memory
    return copy
