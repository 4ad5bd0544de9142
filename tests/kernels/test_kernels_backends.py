"""Backend choice, and every backend that runs on this machine against the reference.

Tolerances, as max|backend - reference| / max|reference|: fp32 1e-5, bf16 2e-2 (bf16 keeps 8 mantissa bits;
a backend may round at different points than the reference).
"""

import pytest
import torch

import kernels
from kernels import reference

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def relative_error(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return ((ours.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def test_each_device_kind_gets_its_own_backend_once():
    assert kernels.get_backend("cpu").name == "cpu"
    assert kernels.get_backend(torch.device("cpu")) is kernels.get_backend("cpu")
    assert kernels.get_backend("cpu", force="reference").name == "reference"


def test_unknown_backends_and_devices_are_refused():
    with pytest.raises(kernels.KernelBackendError, match="unknown kernels backend 'tpu'"):
        kernels.get_backend("cpu", force="tpu")
    with pytest.raises(kernels.KernelBackendError, match="no kernels backend for device type 'meta'"):
        kernels.get_backend("meta")


def test_npu_backend_without_torch_npu_says_what_is_missing(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "torch_npu", None)  # makes `import torch_npu` fail
    from kernels import npu
    with pytest.raises(kernels.KernelBackendError, match="needs torch_npu"):
        npu.build()


def qkv_views(tiles: int, tokens: int, heads: int, head_dim: int, dtype):
    """q, k, v as the encoder makes them: [B, H, N, D] views of one fused [B, N, 3*H*D] projection."""
    fused = torch.randn(tiles, tokens, 3 * heads * head_dim, dtype=dtype)
    return [t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in fused.split(heads * head_dim, -1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_backend_equals_reference(dtype):
    ops = kernels.get_backend("cpu")
    q, k, v = qkv_views(2, 65, 4, 32, dtype)
    assert relative_error(ops.attention(q, k, v), reference.attention(q, k, v)) <= TOLERANCE[dtype]
    x, w, b = torch.randn(2, 65, 96, dtype=dtype), torch.randn(96, dtype=dtype), torch.randn(96, dtype=dtype)
    assert relative_error(ops.rms_norm(x, w, 1e-6), reference.rms_norm(x, w, 1e-6)) <= TOLERANCE[dtype]
    assert relative_error(ops.layer_norm(x, w, b, 1e-6), reference.layer_norm(x, w, b, 1e-6)) <= TOLERANCE[dtype]
    update = torch.randn_like(x)
    assert relative_error(ops.residual_scale_add(x, w, update),
                          reference.residual_scale_add(x, w, update)) <= TOLERANCE[dtype]
    grid, w4, b4 = torch.randn(2, 8, 8, 24, dtype=dtype), torch.randn(96, dtype=dtype), torch.randn(96, dtype=dtype)
    assert relative_error(ops.pixel_shuffle_layer_norm(grid, 0.5, w4, b4, 1e-5),
                          reference.pixel_shuffle_layer_norm(grid, 0.5, w4, b4, 1e-5)) <= TOLERANCE[dtype]


def cpu_matmul_inputs(dtype):
    x, w, b = torch.randn(2, 65, 96, dtype=dtype), torch.randn(48, 96, dtype=dtype), torch.randn(48, dtype=dtype)
    pixels, kernel, kernel_bias = (torch.randn(2, 3, 56, 56, dtype=dtype), torch.randn(32, 3, 14, 14, dtype=dtype),
                                   torch.randn(32, dtype=dtype))
    return (x, w, b), (pixels, kernel, kernel_bias)


@pytest.mark.parametrize("native", [True, False], ids=["onednn", "through-fp32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cpu_matmuls_equal_reference_whether_or_not_the_cpu_runs_the_dtype_natively(monkeypatch, dtype, native):
    # Which path a dtype takes depends on the machine (bf16 needs AVX-512): both are forced here, on any machine.
    from kernels import cpu
    monkeypatch.setattr(cpu, "NATIVE_MATMUL_DTYPES", frozenset({dtype} if native else ()))
    (x, w, b), (pixels, kernel, kernel_bias) = cpu_matmul_inputs(dtype)
    ours = cpu.linear(x, w, b)
    assert ours.dtype == dtype and relative_error(ours, reference.linear(x, w, b)) <= TOLERANCE[dtype]
    assert relative_error(cpu.linear(x, w, None), reference.linear(x, w, None)) <= TOLERANCE[dtype]
    ours = cpu.patch_embed(pixels, kernel, kernel_bias)
    expected = reference.patch_embed(pixels, kernel, kernel_bias)
    assert ours.dtype == dtype and ours.shape == expected.shape == (2, 32, 4, 4)
    assert relative_error(ours, expected) <= TOLERANCE[dtype]

