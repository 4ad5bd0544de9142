"""The reference ops are the specification: they equal transformers' InternVL pieces and plain math."""

import torch
from transformers.models.internvl.modeling_internvl import InternVLModel, InternVLVisionRMSNorm

from kernels import reference


def test_pixel_shuffle_equals_transformers():
    x = torch.randn(2, 8, 8, 6)  # [B, w, h, C]
    expected = InternVLModel.pixel_shuffle(None, x, scale_factor=0.5)  # uses nothing of self
    assert torch.equal(reference.pixel_shuffle(x, 0.5), expected)
    assert reference.pixel_shuffle(x, 0.5).shape == (2, 4, 4, 24)


def test_pixel_shuffle_rows_are_the_documented_2x2_neighbourhood():
    x = torch.randn(1, 4, 4, 3)
    out = reference.pixel_shuffle(x, 0.5)
    i, j = 1, 0
    assert torch.equal(out[0, i, j], torch.cat([x[0, 2 * i, 2 * j], x[0, 2 * i, 2 * j + 1],
                                                x[0, 2 * i + 1, 2 * j], x[0, 2 * i + 1, 2 * j + 1]]))


def test_rms_norm_equals_transformers_in_both_dtypes():
    for dtype in (torch.float32, torch.bfloat16):
        norm = InternVLVisionRMSNorm(96, eps=1e-6).to(dtype)
        torch.nn.init.normal_(norm.weight, 1.0, 0.1)
        x = torch.randn(3, 7, 96, dtype=dtype)
        assert torch.equal(reference.rms_norm(x, norm.weight.detach(), 1e-6), norm(x).detach())


def test_attention_is_scaled_softmax_attention():
    q, k, v = (torch.randn(2, 3, 17, 32, dtype=torch.float64) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-2, -1) / 32 ** 0.5, dim=-1) @ v
    torch.testing.assert_close(reference.attention(q, k, v), expected)


def test_pixel_shuffle_layer_norm_and_residual_compose_the_plain_ops():
    x, w, b = torch.randn(2, 4, 4, 8), torch.randn(32), torch.randn(32)
    expected = torch.nn.functional.layer_norm(reference.pixel_shuffle(x, 0.5), (32,), w, b, 1e-5)
    assert torch.equal(reference.pixel_shuffle_layer_norm(x, 0.5, w, b, 1e-5), expected)
    r, s, u = torch.randn(5, 8), torch.randn(8), torch.randn(5, 8)
    assert torch.equal(reference.residual_scale_add(r, s, u), r + s * u)
