"""The npu backend on CPU, through a stand-in `torch_npu` whose functions have the documented signatures
(`npu_fusion_attention(query, key, value, head_num, input_layout, *, scale=1.0, ...) -> (out, ...)`,
`npu_rms_norm(x, gamma, epsilon=1e-6) -> (y, rstd)`) and compute with the reference. The calls it receives
prove the backend passes layout, head count and scale right (the kernel's own default scale is 1.0)."""

import types

import pytest
import torch

from kernels import npu, reference


class FakeTorchNpu(types.ModuleType):
    def __init__(self):
        super().__init__("torch_npu")
        self.calls = []

    def npu_fusion_attention(self, query, key, value, head_num, input_layout, *, pse=None, padding_mask=None,
                             atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                             next_tockens=2147483647, inner_precise=0, prefix=None, sparse_mode=0,
                             gen_mask_parallel=True, sync=False):
        self.calls.append(dict(fn="attention", layout=input_layout, head_num=head_num, scale=scale,
                               shape=tuple(query.shape)))
        to_bnsd = (lambda t: t.transpose(1, 2)) if input_layout == "BSND" else (lambda t: t)
        scores = to_bnsd(query).float() @ to_bnsd(key).float().transpose(-2, -1) * scale
        out = (scores.softmax(-1) @ to_bnsd(value).float()).to(query.dtype)
        return to_bnsd(out), None, None, None, 0, 0, 0

    def npu_rms_norm(self, x, gamma, epsilon=1e-6):
        self.calls.append(dict(fn="rms_norm", epsilon=epsilon, contiguous=x.is_contiguous()))
        return reference.rms_norm(x, gamma, epsilon), None


@pytest.fixture
def fake_npu(monkeypatch):
    fake = FakeTorchNpu()
    monkeypatch.setitem(__import__("sys").modules, "torch_npu", fake)
    return fake


def test_attention_on_views_of_the_fused_projection_uses_bsnd(fake_npu):
    fused = torch.randn(2, 33, 3 * 4 * 16)  # [B, N, 3*H*D]
    q, k, v = (t.unflatten(-1, (4, 16)).transpose(1, 2) for t in fused.split(64, -1))  # [B, H, N, D] views
    out = npu.build().attention(q, k, v)
    assert fake_npu.calls == [dict(fn="attention", layout="BSND", head_num=4, scale=16 ** -0.5, shape=(2, 33, 4, 16))]
    torch.testing.assert_close(out, reference.attention(q, k, v))
    assert out.shape == (2, 4, 33, 16)


def test_attention_on_head_major_tensors_uses_bnsd(fake_npu):
    q, k, v = (torch.randn(2, 4, 33, 16) for _ in range(3))  # [B, H, N, D], contiguous
    out = npu.build().attention(q, k, v)
    assert fake_npu.calls == [dict(fn="attention", layout="BNSD", head_num=4, scale=16 ** -0.5, shape=(2, 4, 33, 16))]
    torch.testing.assert_close(out, reference.attention(q, k, v))


def test_rms_norm_passes_eps_and_a_contiguous_input(fake_npu):
    x = torch.randn(2, 5, 3 * 32)[..., :32]  # a column slice, as the qk-norm receives it
    w = torch.randn(32)
    out = npu.build().rms_norm(x, w, 1e-5)
    assert fake_npu.calls == [dict(fn="rms_norm", epsilon=1e-5, contiguous=True)]
    torch.testing.assert_close(out, reference.rms_norm(x, w, 1e-5))
