"""The operator table every backend fills: same names, same signatures as `kernels.reference`."""

import dataclasses
from collections.abc import Callable

import torch

from kernels import reference


class KernelBackendError(RuntimeError):
    """A backend was asked for that does not exist or cannot run on this machine."""


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor] = reference.linear
    patch_embed: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = reference.patch_embed
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = reference.rms_norm
    layer_norm: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor] = reference.layer_norm
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = reference.attention
    gelu: Callable[[torch.Tensor], torch.Tensor] = reference.gelu
    pixel_shuffle: Callable[[torch.Tensor, float], torch.Tensor] = reference.pixel_shuffle
    pixel_shuffle_layer_norm: Callable[..., torch.Tensor] = reference.pixel_shuffle_layer_norm
    residual_scale_add: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = (
        reference.residual_scale_add)


REFERENCE = Backend(name="reference")
