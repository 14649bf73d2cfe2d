#!/usr/bin/env bash
# One call on a lent GPU: build engine._cuda, run every test (GPU paths in bf16 included), then time
# the kernels. Results land in $OUT (or bench/results); copy them into the repository afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
pip install --no-build-isolation --no-deps -e . -q 2>&1 | tail -3
python -c "import engine._cuda" || echo "engine._cuda did not build"
python -m pytest tests bench -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -25
python bench/kernels.py --out "$OUT" 2>&1 | tee "$OUT/kernels-gpu.txt" | tail -25
