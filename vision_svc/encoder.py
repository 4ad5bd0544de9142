"""InternViT + pixel shuffle + MLP projector: pixel tiles in, the language model's image embeddings out.

Parameters carry the original OpenGVLab names (`vision_model.*`, `mlp1.{0,1,3}`) so an original checkpoint
loads as is; `vision_svc.checkpoint` renames the hf layout into them. Both block styles are one module:
InternViT-6B (RMSNorm, full-width qk-norm, no qkv bias) and InternViT-300M (LayerNorm, qkv bias). Every
operator, the matmuls included, comes from the `kernels` backend chosen for the device, so this file holds the
model's structure and nothing device-specific.
"""

import importlib
import pathlib

import torch
from torch import nn

from kernels import Backend, get_backend
from vision_svc.checkpoint import CheckpointError, read_vision_tensors
from vision_svc.model_spec import VisionSpec

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# nn.LayerNorm's default, which both layouts' projectors are built with.
_PROJECTOR_NORM_EPS = 1e-5


class EncoderInputError(ValueError):
    """Pixel values the encoder cannot take (wrong shape)."""


class _Linear(nn.Linear):
    """nn.Linear's parameters, the backend's matmul."""

    def __init__(self, width_in: int, width_out: int, ops: Backend, bias: bool = True):
        super().__init__(width_in, width_out, bias=bias)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class _PatchEmbedding(nn.Conv2d):
    """nn.Conv2d's parameters (kernel = stride = patch size), the backend's patch embedding."""

    def __init__(self, spec: VisionSpec, ops: Backend):
        super().__init__(3, spec.hidden, kernel_size=spec.patch_size, stride=spec.patch_size)
        self.ops = ops

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.ops.patch_embed(pixels, self.weight, self.bias)


class _Norm(nn.Module):
    def __init__(self, width: int, kind: str, eps: float, ops: Backend):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width))
        self.bias = nn.Parameter(torch.empty(width)) if kind == "layer" else None
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


class _Embeddings(nn.Module):
    def __init__(self, spec: VisionSpec, ops: Backend):
        super().__init__()
        self.spec = spec
        self.class_embedding = nn.Parameter(torch.empty(1, 1, spec.hidden))
        self.patch_embedding = _PatchEmbedding(spec, ops)
        self.position_embedding = nn.Parameter(torch.empty(1, 1 + spec.patches_per_side ** 2, spec.hidden))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        size = self.spec.image_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, size, size):
            # InternVL would interpolate the position embedding for other sizes; tiles are always this size.
            raise EncoderInputError(f"pixel values {tuple(pixel_values.shape)}: expected [tiles, 3, {size}, {size}]")
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [T, C, P, P]
        patches = patches.flatten(2).transpose(1, 2)  # [T, P*P, C]
        cls = self.class_embedding.expand(patches.shape[0], -1, -1)  # [T, 1, C]
        return torch.cat([cls, patches], dim=1) + self.position_embedding  # [T, 1 + P*P, C]


class _Attention(nn.Module):
    def __init__(self, spec: VisionSpec, ops: Backend):
        super().__init__()
        self.heads = spec.heads
        self.ops = ops
        # One fused projection: one large matmul instead of three, and q/k/v come out as views of it.
        self.qkv = _Linear(spec.hidden, 3 * spec.hidden, ops, bias=spec.qkv_bias)
        self.proj = _Linear(spec.hidden, spec.hidden, ops)
        self.q_norm = _Norm(spec.hidden, "rms", spec.qk_norm_eps, ops) if spec.qk_norm else None
        self.k_norm = _Norm(spec.hidden, "rms", spec.qk_norm_eps, ops) if spec.qk_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tiles, tokens, width = x.shape
        q, k, v = self.qkv(x).split(width, dim=-1)  # each [T, N, C]
        if self.q_norm is not None:
            # InternViT-6B normalizes q and k over the full hidden width, before the split into heads.
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # [T, H, N, D]
        out = self.ops.attention(q, k, v)  # [T, H, N, D]
        return self.proj(out.transpose(1, 2).reshape(tiles, tokens, width))  # [T, N, C]


class _Mlp(nn.Module):
    def __init__(self, spec: VisionSpec, ops: Backend):
        super().__init__()
        self.ops = ops
        self.fc1 = _Linear(spec.hidden, spec.mlp, ops)
        self.fc2 = _Linear(spec.mlp, spec.hidden, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.ops.gelu(self.fc1(x)))


class _Layer(nn.Module):
    def __init__(self, spec: VisionSpec, ops: Backend):
        super().__init__()
        self.ops = ops
        self.attn = _Attention(spec, ops)
        self.mlp = _Mlp(spec, ops)
        self.norm1 = _Norm(spec.hidden, spec.norm, spec.eps, ops)
        self.norm2 = _Norm(spec.hidden, spec.norm, spec.eps, ops)
        self.ls1 = nn.Parameter(torch.empty(spec.hidden))  # layer scale
        self.ls2 = nn.Parameter(torch.empty(spec.hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ops.residual_scale_add(x, self.ls1, self.attn(self.norm1(x)))
        return self.ops.residual_scale_add(x, self.ls2, self.mlp(self.norm2(x)))


class _Encoder(nn.Module):
    def __init__(self, spec: VisionSpec, ops: Backend):
        super().__init__()
        self.layers = nn.ModuleList(_Layer(spec, ops) for _ in range(spec.layers))


class _VisionModel(nn.Module):
    def __init__(self, spec: VisionSpec, ops: Backend):
        super().__init__()
        self.layers_used = spec.layers_used
        self.embeddings = _Embeddings(spec, ops)
        self.encoder = _Encoder(spec, ops)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)  # [T, 1 + P*P, C]
        for layer in self.encoder.layers[:self.layers_used]:
            x = layer(x)
        return x


class _Projector(nn.ModuleDict):
    """`mlp1` of the original layout: 0 LayerNorm, 1 Linear, (2 GELU, no weights), 3 Linear."""

    def __init__(self, spec: VisionSpec, ops: Backend):
        super().__init__({
            "0": _Norm(spec.projector_in, "layer", _PROJECTOR_NORM_EPS, ops),
            "1": _Linear(spec.projector_in, spec.llm_hidden, ops),
            "3": _Linear(spec.llm_hidden, spec.llm_hidden, ops),
        })
        self.ratio = spec.downsample_ratio
        self.ops = ops

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        norm = self["0"]
        x = self.ops.pixel_shuffle_layer_norm(grid, self.ratio, norm.weight, norm.bias, norm.eps)  # [T, p, p, 4C]
        x = x.flatten(1, 2)  # [T, tokens_per_tile, 4C]
        return self["3"](self.ops.gelu(self["1"](x)))  # [T, tokens_per_tile, llm_hidden]


class InternVisionEncoder(nn.Module):
    def __init__(self, spec: VisionSpec, ops: Backend):
        super().__init__()
        self.spec = spec
        self.ops = ops
        self.vision_model = _VisionModel(spec, ops)
        self.mlp1 = _Projector(spec, ops)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[tiles, 3, 448, 448] -> [tiles, tokens_per_tile (256), llm_hidden]."""
        features = self.vision_model(pixel_values)  # [T, 1 + P*P, C]
        side = self.spec.patches_per_side
        grid = features[:, 1:].unflatten(1, (side, side))  # [T, P, P, C]: the CLS token is dropped
        return self.mlp1(grid)


def load_encoder(model_dir: pathlib.Path | str, device: torch.device | str, dtype: torch.dtype,
                 backend: str | None = None) -> tuple[InternVisionEncoder, VisionSpec]:
    """The checkpoint's vision stage on `device` in `dtype`, ops from `backend` (default: the device's own)."""
    spec = VisionSpec.from_model_dir(model_dir)
    return build_encoder(spec, read_vision_tensors(model_dir), device, dtype, backend, source=str(model_dir)), spec


def build_encoder(spec: VisionSpec, tensors: dict[str, torch.Tensor], device: torch.device | str,
                  dtype: torch.dtype, backend: str | None = None, source: str = "tensors") -> InternVisionEncoder:
    """The encoder made of `tensors` (original names). Strict: every parameter must be there with its shape,
    and no tensor may be left over."""
    device = torch.device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype}: expected one of {DTYPES}")
    if device.type == "npu":
        importlib.import_module("torch_npu")  # registers the npu device with torch
    with torch.device("meta"):  # shapes only: the checkpoint's tensors become the parameters
        encoder = InternVisionEncoder(spec, get_backend(device, backend))
    _check_tensors(encoder, tensors, source)
    encoder.load_state_dict(tensors, strict=True, assign=True)
    return encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _check_tensors(encoder: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    expected = {name: tuple(p.shape) for name, p in encoder.state_dict().items()}
    missing = sorted(expected.keys() - tensors.keys())
    leftover = sorted(tensors.keys() - expected.keys())
    wrong = sorted(f"{name} {tuple(tensors[name].shape)} (expected {shape})" for name, shape in expected.items()
                   if name in tensors and tuple(tensors[name].shape) != shape)
    problems = [f"{label} ({len(names)}): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                for label, names in (("missing", missing), ("not part of the model", leftover),
                                     ("wrong shape", wrong)) if names]
    if problems:
        raise CheckpointError(f"{source}: vision tensors do not match the config: " + "; ".join(problems))
