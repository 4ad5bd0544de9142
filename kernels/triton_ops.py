"""Triton kernels of the CUDA backend, for the steps eager torch runs as several memory passes.

- `rms_norm`: one pass per row, reading rows in place from a strided view. InternViT-6B's qk-norm normalizes
  the full 3200-wide q and k, which are column slices of the fused qkv output: no copy is made to get them.
- `pixel_shuffle_layer_norm`: the projector's LayerNorm reads the four source rows of each shuffled row
  directly (from a view that still holds the CLS row) instead of materializing the shuffle twice.
Both follow `kernels.reference` (statistics in fp32; RMSNorm rounds to the input dtype before the weight).
With TRITON_INTERPRET=1 set before this module is imported, the same kernels run on CPU tensors.

No bias+GELU kernel: the MLP's bias is already added inside its matmul (addmm), so a Triton bias+GELU pass
would cost what torch's GELU pass costs (about 3% of an InternViT-6B batch of 13 at HBM speed). Fusing GELU
into the matmul itself needs cuBLASLt's GELU epilogue, which is the tanh approximation where InternViT uses
the exact erf GELU, or a Triton matmul that beats cuBLAS. Under `--compile`, inductor fuses it anyway.
"""

import torch
import triton
import triton.language as tl

from kernels import reference


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, x_row_stride, width, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < width
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
    normed = (x * inv_rms).to(x_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * width + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    width = x.shape[-1]
    try:
        rows = x.view(-1, width)  # a column slice of a wider tensor stays a view, with a longer row stride
    except RuntimeError:
        rows = x.reshape(-1, width)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, out, rows.stride(0), width, eps,
                                       BLOCK=triton.next_power_of_2(width))
    return out.view(x.shape)


@triton.jit
def _shuffle_layer_norm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, stride_b, stride_w, stride_h, out_w, out_h,
                               channels, eps, BLOCK_C: tl.constexpr):
    # One program per output row (b, i, j) of [B, w/2, h/2, 4C]: chunk q of that row is the input row
    # (2i + q // 2, 2j + q % 2), as `reference.pixel_shuffle` documents.
    pid = tl.program_id(0).to(tl.int64)
    b = pid // (out_w * out_h)
    i = (pid // out_h) % out_w
    j = pid % out_h
    chunk = tl.arange(0, 4)[:, None]  # [4, 1]
    cols = tl.arange(0, BLOCK_C)[None, :]  # [1, BLOCK_C]
    mask = (cols < channels) & (chunk < 4)  # [4, BLOCK_C]
    src = x_ptr + b * stride_b + (2 * i + chunk // 2) * stride_w + (2 * j + chunk % 2) * stride_h + cols
    x = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # [4, BLOCK_C]
    width = 4 * channels
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / width
    centered = tl.where(mask, x - mean, 0.0)
    inv_std = tl.rsqrt(tl.sum(tl.sum(centered * centered, axis=1), axis=0) / width + eps)
    out_cols = chunk * channels + cols  # [4, BLOCK_C]
    w = tl.load(w_ptr + out_cols, mask=mask, other=0.0).to(tl.float32)
    bias = tl.load(b_ptr + out_cols, mask=mask, other=0.0).to(tl.float32)
    y = centered * inv_std * w + bias
    tl.store(out_ptr + pid * width + out_cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def pixel_shuffle_layer_norm(x: torch.Tensor, ratio: float, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    batch, width, height, channels = x.shape
    if ratio != 0.5 or width % 2 or height % 2:
        return reference.pixel_shuffle_layer_norm(x, ratio, weight, bias, eps)
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(batch, width // 2, height // 2, 4 * channels, dtype=x.dtype, device=x.device)
    _shuffle_layer_norm_kernel[(out.shape[0] * out.shape[1] * out.shape[2],)](
        x, weight, bias, out, x.stride(0), x.stride(1), x.stride(2), width // 2, height // 2, channels, eps,
        BLOCK_C=triton.next_power_of_2(channels))
    return out
