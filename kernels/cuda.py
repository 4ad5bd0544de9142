"""CUDA backend: SDPA (FlashAttention for bf16/fp16 at head dims 64 and 128) and the Triton kernels of
`kernels.triton_ops` where eager torch makes extra memory passes. Without Triton the norms fall back to the
reference ops, which stay correct."""

import logging

import torch.nn.functional as F

from kernels.backend import Backend
from kernels.cpu import residual_scale_add

log = logging.getLogger(__name__)


def attention(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D]; default scale is D**-0.5


def build() -> Backend:
    try:
        from kernels import triton_ops
    except ImportError:
        log.warning("triton is not installed: the cuda backend uses torch ops for its norms")
        return Backend(name="cuda", attention=attention, residual_scale_add=residual_scale_add)
    return Backend(name="cuda", attention=attention, residual_scale_add=residual_scale_add,
                   rms_norm=triton_ops.rms_norm, pixel_shuffle_layer_norm=triton_ops.pixel_shuffle_layer_norm)
