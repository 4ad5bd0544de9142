import pytest
import torch

from protos import tensors, vision_pb2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,chunk_bytes", [((512, 64), 1000), ((256, 8), 1 << 20), ((0, 8), 64), ((3, 5), 1)])
def test_roundtrip_is_bit_exact(dtype, shape, chunk_bytes):
    tensor = torch.randn(shape).to(dtype)
    chunks = list(tensors.to_chunks(tensor, chunk_bytes))
    assert all(len(c) <= chunk_bytes for c in chunks)
    assembler = tensors.TensorAssembler(tensors.header_of(tensor), max_bytes=1 << 30)
    for chunk in chunks:
        assembler.add(chunk)
    out = assembler.finish()
    assert out.dtype == dtype and out.shape == tensor.shape
    assert torch.equal(out.view(torch.uint8), tensor.view(torch.uint8))


def test_non_contiguous_tensor_travels_row_major():
    tensor = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assembler = tensors.TensorAssembler(tensors.header_of(tensor), max_bytes=1 << 20)
    for chunk in tensors.to_chunks(tensor, 7):
        assembler.add(chunk)
    assert torch.equal(assembler.finish(), tensor)


def header(shape, dtype=vision_pb2.DTYPE_FLOAT32):
    return vision_pb2.TensorHeader(dtype=dtype, shape=shape)


@pytest.mark.parametrize("make,message", [
    (lambda: tensors.TensorAssembler(header([10, 10]), max_bytes=100), "over the limit of 100"),
    (lambda: tensors.TensorAssembler(header([2], dtype=0), max_bytes=100), "unknown wire dtype"),
    (lambda: tensors.TensorAssembler(header([-1, 2]), max_bytes=100), "negative dimension"),
])
def test_bad_headers_are_refused(make, message):
    with pytest.raises(tensors.TensorFormatError, match=message):
        make()


def test_too_many_or_too_few_bytes_are_refused():
    assembler = tensors.TensorAssembler(header([2]), max_bytes=100)
    with pytest.raises(tensors.TensorFormatError, match="received 12 bytes for a tensor of 8"):
        assembler.add(b"x" * 12)
    assembler.add(b"x" * 4)
    with pytest.raises(tensors.TensorFormatError, match="received 4 of 8 bytes"):
        assembler.finish()


def test_unsupported_dtype_is_refused():
    with pytest.raises(tensors.TensorFormatError, match="cannot travel"):
        tensors.header_of(torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("shape", [[2**62 + 1, 4], [2**32, 2**32]])
def test_shapes_whose_size_overflows_int64_are_refused(shape):
    with pytest.raises(tensors.TensorFormatError, match="over the limit"):
        tensors.TensorAssembler(header(shape), max_bytes=1 << 30)
