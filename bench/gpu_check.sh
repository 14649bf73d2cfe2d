#!/usr/bin/env bash
# On a lent GPU: build engine._cuda, run every test (GPU paths in bf16 included), time the kernels
# and profile each policy on the testbed model (part 1, ~6 minutes on an H100); then prefix
# caching, self-evaluation cost, throughput and fork at the 8B shape (part 2: gpu_check_part2.sh,
# one 600 s call). Run the two parts as two device calls; `all` runs both. Results land in $OUT
# (or bench/results); copy them into the repository afterwards.
# Part 3 (its own call): the HTTP server under load at the 8B shape (bench/serve_load.py).
# Part 4 (its own call): host time per decode step at the 8B shape (bench/host_overhead.py).
#   bash bench/gpu_check.sh 1|2|3|4|all
set -uo pipefail
cd "$(dirname "$0")/.."
PART="${1:-all}"
OUT="${OUT:-bench/results}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
date -u | tee -a "$OUT/gpu.txt"
SECONDS=0
source bench/device_install.sh
echo "install+build: ${SECONDS}s"
python -c "import engine._cuda; print('engine._cuda built')" || echo "engine._cuda did not build"

if [[ "$PART" == 1 || "$PART" == all ]]; then
  SECONDS=0
  timeout 360 python -m pytest tests bench -q -p no:cacheprovider -rs --durations=15 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -45
  echo "pytest: ${SECONDS}s"
  timeout 150 python bench/kernel_bench.py --out "$OUT" 2>&1 | tee "$OUT/kernels-gpu.txt" | tail -30
  timeout 150 selfeval profile --device cuda --problems 256 -n 16 --out "$OUT/profile" 2>&1 | tail -12
fi
if [[ "$PART" == 2 || "$PART" == all ]]; then
  # The 8B-shaped benchmarks (random bf16 weights), with timeouts fitted to one device call.
  SKIP_INSTALL=1 OUT="$OUT" bash bench/gpu_check_part2.sh
fi
if [[ "$PART" == 3 ]]; then
  # The HTTP server under load at the 8B shape vs offline at the same concurrency (issue 14).
  timeout 420 python bench/serve_load.py --out "$OUT" 2>&1 | tee "$OUT/serve_load-gpu.txt" | tail -8
fi
if [[ "$PART" == 4 ]]; then
  # Host time per decode step as a share of an 8B-shape step (issue 17's <= 15% target).
  timeout 480 python bench/host_overhead.py --device cuda --steps 50 --out "$OUT" 2>&1 | tee "$OUT/host_overhead-gpu.txt" | tail -8
fi
if [[ -n "${GPU_CHECK_TAR:-}" ]]; then
  # The device returns at most 8 files: pack everything into one archive.
  tar czf "/tmp/gpu-part$PART.tgz" -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv "/tmp/gpu-part$PART.tgz" "$OUT/"
fi
