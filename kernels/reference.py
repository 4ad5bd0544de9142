"""The specification of the vision stage's operators, in plain torch.

Every backend implements these same signatures and is tested against them. Semantics follow InternViT and
transformers' InternVL exactly (RMSNorm rounds to the input dtype before the weight; pixel shuffle is the v2
variant), so the reference is also what checkpoint parity is measured with.
"""

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias, in x's dtype: every projection of the encoder and the projector."""
    return F.linear(x, weight, bias)


def patch_embed(pixels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """InternViT's patch embedding, a convolution whose stride is its kernel: [T, 3, S, S] -> [T, C, S/p, S/p]."""
    return F.conv2d(pixels, weight, bias, stride=weight.shape[-2:])


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Over the last dim, statistics in fp32; InternViT's qk-norm calls this on the full hidden width."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal softmax attention on [B, H, N, D], scale D**-0.5, computed in at least fp32 -> [B, H, N, D]."""
    compute = torch.promote_types(q.dtype, torch.float32)
    q, k, v, out_dtype = q.to(compute), k.to(compute), v.to(compute), q.dtype
    scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)  # [B, H, N, N]
    return (scores.softmax(-1) @ v).to(out_dtype)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """The exact (erf) GELU of InternViT's MLP and projector."""
    return F.gelu(x)


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """InternVL's v2 pixel shuffle: [B, w, h, C] -> [B, w*ratio, h*ratio, C/ratio**2].

    The same sequence of views and permutes as transformers' `InternVLModel.pixel_shuffle`; with ratio 0.5 the
    output row (i, j) is the concatenation of input rows (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1).
    """
    batch, width, height, channels = x.shape
    if not (height * ratio).is_integer() or not (width * ratio).is_integer():
        raise ValueError(f"pixel shuffle ratio {ratio} does not divide a {width}x{height} grid")
    x = x.reshape(batch, width, int(height * ratio), int(channels / ratio))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(batch, int(height * ratio), int(width * ratio), int(channels / ratio**2))
    return x.permute(0, 2, 1, 3).contiguous()


def pixel_shuffle_layer_norm(x: torch.Tensor, ratio: float, weight: torch.Tensor, bias: torch.Tensor,
                             eps: float) -> torch.Tensor:
    """The projector's first step: pixel shuffle, then LayerNorm over the shuffled channels."""
    return layer_norm(pixel_shuffle(x, ratio), weight, bias, eps)


def residual_scale_add(residual: torch.Tensor, scale: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """residual + scale * update: the block's layer-scaled residual connection, in the input dtype."""
    return residual + scale * update
