"""Ascend NPU backend: torch_npu's fused attention and RMSNorm. `torch_npu` is imported only when this
backend is built, so nothing else in the project needs it installed."""

import importlib

import torch

from kernels.backend import Backend, KernelBackendError
from kernels.cpu import residual_scale_add


def build() -> Backend:
    try:
        torch_npu = importlib.import_module("torch_npu")
    except ImportError as error:
        raise KernelBackendError("the npu backend needs torch_npu (pip install torch-npu)") from error

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        heads, head_dim = q.shape[1], q.shape[-1]
        # npu_fusion_attention's default scale is 1.0, not D**-0.5: always pass it.
        scale = head_dim ** -0.5
        if q.stride(1) < q.stride(2):
            # [B, H, N, D] views of sequence-major memory (as the fused qkv projection makes them): hand the
            # kernel that BSND layout rather than permuting every head into BNSD.
            q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, N, H, D]
            return torch_npu.npu_fusion_attention(q, k, v, heads, "BSND", scale=scale)[0].transpose(1, 2)
        q, k, v = (t.contiguous() for t in (q, k, v))
        return torch_npu.npu_fusion_attention(q, k, v, heads, "BNSD", scale=scale)[0]  # [B, H, N, D]

    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return torch_npu.npu_rms_norm(x.contiguous(), weight, epsilon=eps)[0]

    return Backend(name="npu", attention=attention, rms_norm=rms_norm, residual_scale_add=residual_scale_add)
