#!/usr/bin/env bash
# Vision encoder on one lent GPU (H200), at most 8 minutes: parity with transformers at the real InternViT-6B
# and 300M sizes, then tiles/s and fraction of the matmul ceiling at batch 1, 13, 32, 64.
#   bench/vision_gpu.sh            # on the GPU machine, from the repository root
#   bench/vision_gpu.sh --smoke    # tiny size on CPU: checks the script runs
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec timeout 480 "$PY" -m bench.vision_gpu "$@"
