"""Device-specific operators of the vision stage.

`kernels.reference` is the specification; a backend is a table of the same operators (`kernels.backend.Backend`)
for one kind of device. `get_backend` chooses one per device, once; tests and benchmarks force one by name.
"""

import functools

import torch

from kernels.backend import REFERENCE, Backend, KernelBackendError

BACKEND_NAMES = ("reference", "cpu", "cuda", "npu")
_DEFAULT_FOR_DEVICE = {"cpu": "cpu", "cuda": "cuda", "npu": "npu"}

__all__ = ["BACKEND_NAMES", "Backend", "KernelBackendError", "get_backend"]


def get_backend(device: torch.device | str, force: str | None = None) -> Backend:
    """The backend for `device`: `force` if given (one of BACKEND_NAMES), else the device kind's own."""
    device_type = torch.device(device).type
    name = force or _DEFAULT_FOR_DEVICE.get(device_type)
    if name is None:
        raise KernelBackendError(f"no kernels backend for device type {device_type!r}; "
                                 f"force one of {BACKEND_NAMES}")
    return _build(name)


@functools.cache
def _build(name: str) -> Backend:
    """Each backend is built once per process (the npu one imports torch_npu, the cuda one compiles lazily)."""
    if name == "reference":
        return REFERENCE
    if name == "cpu":
        from kernels.cpu import CPU
        return CPU
    if name == "cuda":
        from kernels import cuda
        return cuda.build()
    if name == "npu":
        from kernels import npu
        return npu.build()
    raise KernelBackendError(f"unknown kernels backend {name!r}; expected one of {BACKEND_NAMES}")
