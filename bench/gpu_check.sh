#!/usr/bin/env bash
# One call on a lent GPU: build engine._cuda, run every test (GPU paths in bf16 included), then time
# the kernels, then the throughput, self-evaluation cost and fork benchmarks and a profile per
# policy. Results land in $OUT (or bench/results); copy them into the repository afterwards.
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
# Issue 6: the 8B-shaped benchmarks (random bf16 weights) and a profile of each policy.
python bench/fork.py --out "$OUT" 2>&1 | tee "$OUT/fork-gpu.txt" | tail -10
python bench/selfeval_cost.py --out "$OUT" 2>&1 | tee "$OUT/selfeval_cost-gpu.txt" | tail -20
python bench/throughput.py --out "$OUT" 2>&1 | tee "$OUT/throughput-gpu.txt" | tail -20
for p in best-of-n adaptive prune; do
  selfeval profile --policy "$p" --device cuda --problems 256 -n 16 --out "$OUT/profile-$p" 2>&1 | tail -12
done
