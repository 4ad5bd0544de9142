"""The CPU fast path: torch's fused SDPA kernel (its flash path beats matmul+softmax several-fold on CPU) and
a one-pass layer-scaled residual. Matmuls run in the module's dtype; bf16 uses the CPU's bf16 dot products
(AVX512-BF16 / AMX) through oneDNN, which is where most of the speed over fp32 comes from.

A CPU whose oneDNN kernels cannot take bf16 (no AVX-512: AVX2-only x86 such as many AMD EPYCs) or fp16 (no
AVX512-FP16 / AMX-FP16) leaves torch a reference loop for those dtypes instead. On such a CPU (AVX2, one thread,
9 tiles of InternViT-300M) one 1024x4096 projection took 9.5 s in bf16 against 1.1 s in fp32, and the patch
embedding's convolution 10.4 s against 0.16 s. There the matmuls and the convolution run in fp32 on the values
as they are, and round once to the module's dtype: what oneDNN's own bf16 kernels do, accumulating in fp32.
"""

import torch
import torch.nn.functional as F

from kernels.backend import Backend


def _onednn_dtypes() -> frozenset[torch.dtype]:
    """The dtypes this CPU's oneDNN matmuls run natively; fixed per machine, so read once at import. A torch
    without these (private) checks is taken to run all three, as before they were asked."""
    try:
        bf16, fp16 = torch.ops.mkldnn._is_mkldnn_bf16_supported(), torch.ops.mkldnn._is_mkldnn_fp16_supported()
    except (AttributeError, RuntimeError):
        bf16 = fp16 = True
    return frozenset({torch.float32} | ({torch.bfloat16} if bf16 else set()) | ({torch.float16} if fp16 else set()))


NATIVE_MATMUL_DTYPES = _onednn_dtypes()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.dtype in NATIVE_MATMUL_DTYPES:
        return F.linear(x, weight, bias)
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


def patch_embed(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    stride = weight.shape[-2:]
    if pixels.dtype in NATIVE_MATMUL_DTYPES:
        return F.conv2d(pixels, weight, bias, stride=stride)
    return F.conv2d(pixels.float(), weight.float(), bias.float(), stride=stride).to(pixels.dtype)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v)  # [B, H, N, D]; default scale is D**-0.5


def residual_scale_add(residual: torch.Tensor, scale: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    # One pass, rounding once, instead of a multiply then an add.
    return torch.addcmul(residual, scale, update)


CPU = Backend(name="cpu", linear=linear, patch_embed=patch_embed, attention=attention,
              residual_scale_add=residual_scale_add)
