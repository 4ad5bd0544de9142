"""The prepared GPU script runs: a lent GPU's minutes must not be spent finding a broken script.

`--smoke` runs every step of bench/vision_gpu.sh (device preprocessing with device decode, parity with
transformers, each implementation's timing, vision_svc's compiled encoder) at a tiny size on CPU.
"""

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_vision_gpu_script_runs_every_step_at_smoke_size():
    result = subprocess.run(["bash", "bench/vision_gpu.sh", "--smoke"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PY": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "cpu JPEG decode vs Pillow: max 0 levels" in out  # torchvision's CPU decoder is Pillow's, bit for bit
    assert "decode on cpu, tile on cpu" in out
    assert "16 of 16 images' tiles equal to those made on an idle device" in out
    assert "parity with transformers (bf16): relative error" in out and "OK" in out and "FAIL" not in out
    for row in ("transformers", "ours reference", "ours cpu", "ours compiled layers", "vision_svc --compile"):
        assert f"  {row} " in out, row
