"""Tensors on the wire: dtype and shape in a `TensorHeader`, row-major little-endian bytes in chunks.

gRPC messages are bounded (4 MB by default), while one 13-tile image of a 38B model is 34 MB of bf16
embeddings, so a tensor always travels as a sequence of chunks and is reassembled with size checks.
"""

import math
from collections.abc import Iterator

import numpy as np
import torch

from protos import vision_pb2

DEFAULT_CHUNK_BYTES = 1 << 20

_TO_PROTO = {
    torch.float32: vision_pb2.DTYPE_FLOAT32,
    torch.float16: vision_pb2.DTYPE_FLOAT16,
    torch.bfloat16: vision_pb2.DTYPE_BFLOAT16,
}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}


class TensorFormatError(ValueError):
    """Bytes and header do not describe a valid tensor."""


def dtype_to_proto(dtype: torch.dtype) -> int:
    if dtype not in _TO_PROTO:
        raise TensorFormatError(f"dtype {dtype} cannot travel on the wire (float32, float16, bfloat16 only)")
    return _TO_PROTO[dtype]


def dtype_from_proto(value: int) -> torch.dtype:
    if value not in _FROM_PROTO:
        raise TensorFormatError(f"unknown wire dtype {value}")
    return _FROM_PROTO[value]


def header_of(tensor: torch.Tensor) -> vision_pb2.TensorHeader:
    return vision_pb2.TensorHeader(dtype=dtype_to_proto(tensor.dtype), shape=list(tensor.shape))


def to_chunks(tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Row-major bytes of a CPU tensor in chunks of at most `chunk_bytes`; at least one chunk."""
    raw = memoryview(tensor.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy())
    if len(raw) == 0:
        yield b""
        return
    for start in range(0, len(raw), chunk_bytes):
        yield bytes(raw[start:start + chunk_bytes])


def checked_spec(header: vision_pb2.TensorHeader, max_bytes: int) -> tuple[torch.dtype, tuple[int, ...], int]:
    """The dtype, shape and byte size that `header` announces; TensorFormatError when malformed or over `max_bytes`."""
    dtype = dtype_from_proto(header.dtype)
    shape = tuple(header.shape)
    if any(d < 0 for d in shape):
        raise TensorFormatError(f"negative dimension in shape {shape}")
    # Python integers: a hostile shape cannot wrap around to a small size.
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise TensorFormatError(f"tensor of shape {shape} needs {nbytes} bytes, over the limit of {max_bytes}")
    return dtype, shape, nbytes


class TensorAssembler:
    """Collects the chunks of one tensor announced by a header and checks they add up exactly."""

    def __init__(self, header: vision_pb2.TensorHeader, max_bytes: int):
        self.dtype, self.shape, self.nbytes = checked_spec(header, max_bytes)
        self._buffer = np.empty(self.nbytes, dtype=np.uint8)
        self._filled = 0

    def add(self, chunk: bytes) -> None:
        end = self._filled + len(chunk)
        if end > self.nbytes:
            raise TensorFormatError(f"received {end} bytes for a tensor of {self.nbytes} bytes")
        self._buffer[self._filled:end] = np.frombuffer(chunk, dtype=np.uint8)
        self._filled = end

    def finish(self) -> torch.Tensor:
        if self._filled != self.nbytes:
            raise TensorFormatError(f"received {self._filled} of {self.nbytes} bytes for shape {self.shape}")
        if self.nbytes == 0:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.from_numpy(self._buffer).view(self.dtype).reshape(self.shape)
