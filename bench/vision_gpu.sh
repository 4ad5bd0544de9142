#!/usr/bin/env bash
# Vision stage on one lent GPU (H200), at most 8 minutes: preprocessing of 1080p JPEGs on the device (nvJPEG
# decode included, and its distance from Pillow), then parity with transformers at the real InternViT-6B and
# 300M sizes and tiles/s with the fraction of the measured matmul ceiling at batch 1, 13, 32, 64.
#   bench/vision_gpu.sh            # on the GPU machine, from the repository root
#   bench/vision_gpu.sh --smoke    # tiny size on CPU: checks the script runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# A failed preprocessing run must not cost the encoder's tables: report it and go on.
if [[ "${1:-}" == "--smoke" ]]; then
  timeout 120 "$PY" -m bench.preprocess_device --images 2 --workers 1 || echo "bench.preprocess_device failed: $?"
else
  timeout 120 "$PY" -m bench.preprocess_device --device cuda --images 50 --workers 8 ||
    echo "bench.preprocess_device failed: $?"
fi
exec timeout 360 "$PY" -m bench.vision_gpu "$@"
