"""The CUDA backend's Triton kernels, run by Triton's interpreter on CPU tensors.

`TRITON_INTERPRET` must be set before `triton` itself is imported (its standard library is decorated at
import), so the kernels run in a child process that sets it; the child reports each case's error.
Tolerances vs the reference, as max|kernel - reference| / max|reference|: fp32 1e-5, bf16 1e-2.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = pathlib.Path(__file__).resolve().parents[2]

CHILD = r"""
import json, torch
from kernels import reference, triton_ops

def relative_error(ours, expected):
    return ((ours.float() - expected.float()).abs().max() / expected.float().abs().max()).item()

results = {}
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    for width in (96, 3200):  # 3200: InternViT-6B's full-width qk-norm
        fused = torch.randn(2, 3, 3 * width, dtype=dtype)  # [T, N, 3C]
        q = fused[..., :width]  # a strided view, as the qk-norm receives it
        w = torch.randn(width, dtype=dtype)
        out = triton_ops.rms_norm(q, w, 1e-6)
        assert out.shape == q.shape and out.dtype == dtype
        results[f"rms_norm/{width}/{dtype}"] = relative_error(out, reference.rms_norm(q, w, 1e-6))
    features = torch.randn(2, 1 + 8 * 8, 24, dtype=dtype)  # [T, 1 + P*P, C], the CLS row first
    grid = features[:, 1:].unflatten(1, (8, 8))  # [T, P, P, C], a view
    w, b = torch.randn(96, dtype=dtype), torch.randn(96, dtype=dtype)
    out = triton_ops.pixel_shuffle_layer_norm(grid, 0.5, w, b, 1e-5)
    assert out.shape == (2, 4, 4, 96) and out.dtype == dtype
    results[f"pixel_shuffle_layer_norm/{dtype}"] = relative_error(
        out, reference.pixel_shuffle_layer_norm(grid, 0.5, w, b, 1e-5))
print(json.dumps(results))
"""


def test_triton_kernels_equal_reference_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == 0, child.stderr[-3000:]
    errors = json.loads(child.stdout.strip().splitlines()[-1])
    assert len(errors) == 6
    for case, error in errors.items():
        assert error <= (1e-5 if "float32" in case else 1e-2), (case, error)
