#!/usr/bin/env bash
# Part 2 of bench/gpu_check.sh (the 8B-shape benchmarks: prefix caching, self-evaluation cost,
# throughput, fork) made to fit one 600 s device call:
# each bench's timeout comes from what is left of LIMIT seconds (default 570) after install and
# build; selfeval_cost.py and throughput.py print each row / phase as it finishes (their tables
# come only at the end), so a bench killed at its limit still leaves its figures; everything is
# packed into $OUT/gpu-part2.tgz on exit, killed or not (the device returns at most 8 files).
#   export OUT; bash bench/gpu_check_part2.sh        (run timeout_s 600)
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT="${OUT:-bench/results}"; mkdir -p "$OUT"
R=$(mktemp -d)
LIMIT=${LIMIT:-570}
ARCHIVE=${ARCHIVE:-gpu-part2.tgz}
pack() { tar czf "$OUT/$ARCHIVE" -C $R . ; ls -la $R; }
trap pack EXIT
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  date -u; } 2>&1 | tee $R/gpu.txt
[[ -n "${SKIP_INSTALL:-}" ]] || source bench/device_install.sh > $R/install.txt 2>&1
echo "install+build: ${SECONDS}s" | tee -a $R/gpu.txt
python -c "import engine._cuda; print('engine._cuda built')" 2>&1 | tee -a $R/gpu.txt
left() { echo $(( LIMIT - SECONDS )); }
if [[ -n "${QUICK:-}" ]]; then
  # One call for everything (bench/gpu_check.sh without a part): the GPU kernel and model tests,
  # the kernel bench, then self-evaluation cost on a small grid and throughput; no prefix_cache/fork.
  T=$(( $(left) - 420 )); (( T > 100 )) && T=100
  echo "pytest timeout ${T}s at ${SECONDS}s" | tee -a $R/gpu.txt
  (( T > 20 )) && timeout $T python -m pytest tests/kernels tests/model -q -p no:cacheprovider -rs -x \
    tests/engine/test_async_scheduling.py::test_async_on_cuda_matches_the_synchronous_loop \
    > $R/pytest-gpu.txt 2>&1
  echo "pytest rc=$? at ${SECONDS}s: $(tail -n 1 $R/pytest-gpu.txt)" | tee -a $R/gpu.txt
  T=$(( $(left) - 300 )); (( T > 120 )) && T=120
  echo "kernel_bench timeout ${T}s at ${SECONDS}s" | tee -a $R/gpu.txt
  (( T > 20 )) && timeout $T python bench/kernel_bench.py --out $R > $R/kernels-gpu.txt 2>&1
  echo "kernel_bench rc=$? at ${SECONDS}s" | tee -a $R/gpu.txt
fi
GRID=()
[[ -n "${QUICK:-}" ]] && GRID=(--grid 64:512,64:2048,16:8192)
# Prefix caching first (issue 13's GPU figure; about a minute): shared 1,024-token system prompt.
if [[ -z "${QUICK:-}" ]]; then
  T=$(( $(left) - 300 )); (( T > 120 )) && T=120
  echo "prefix_cache timeout ${T}s at ${SECONDS}s" | tee -a $R/gpu.txt
  (( T > 20 )) && timeout $T python bench/prefix_cache.py --repeats 1 --out $R > $R/prefix_cache-gpu.txt 2>&1
  echo "prefix_cache rc=$? at ${SECONDS}s" | tee -a $R/gpu.txt
fi
# Rows as they finish (the scripts print their tables only at the end).
T=$(( $(left) - 200 )); (( T > 240 )) && T=240
echo "selfeval_cost timeout ${T}s at ${SECONDS}s" | tee -a $R/gpu.txt
timeout $T python - $R "${GRID[@]}" > $R/selfeval_cost-gpu.txt 2>&1 <<'PY'
import sys; sys.path.insert(0, "bench"); sys.argv = ["selfeval_cost.py", "--out", *sys.argv[1:]]
import selfeval_cost as m
f, g = m.measure, m.measure_copy
def measure(eng, b, c, reps):
    o = f(eng, b, c, reps); print("ROW", b, c, o, flush=True); return o
def measure_copy(hf, v, s, b, c, reps, dev):
    o = g(hf, v, s, b, c, reps, dev); print("COPY", b, c, o, flush=True); return o
m.measure, m.measure_copy = measure, measure_copy
m.main()
PY
echo "selfeval_cost rc=$? at ${SECONDS}s" | tee -a $R/gpu.txt
T=$(( $(left) - 45 )); (( T > 240 )) && T=240
echo "throughput timeout ${T}s" | tee -a $R/gpu.txt
timeout $T python - $R > $R/throughput-gpu.txt 2>&1 <<'PY'
import sys; sys.path.insert(0, "bench"); sys.argv = ["throughput.py", "--requests", "64", "--out", sys.argv[1]]
import throughput as m
f, g, h = m.run_engine, m.roofline_seconds, m.bs1_latency
def run_engine(eng, work):
    s, t, p = f(eng, work); print("ENGINE seconds", s, "tokens", t, "tok/s", t / s, flush=True); return s, t, p
def roofline_seconds(*a):
    o = g(*a); print("ROOFLINE seconds", o, flush=True); return o
def bs1_latency(*a):
    o = h(*a); print("BS1 ms/token", o, flush=True); return o
m.run_engine, m.roofline_seconds, m.bs1_latency = run_engine, roofline_seconds, bs1_latency
m.main()
PY
echo "throughput rc=$? at ${SECONDS}s" | tee -a $R/gpu.txt
if [[ -z "${QUICK:-}" ]]; then
  T=$(( $(left) )); (( T > 90 )) && T=90
  (( T > 5 )) && timeout $T python bench/fork.py --out $R > $R/fork-gpu.txt 2>&1
  echo "fork rc=$? at ${SECONDS}s" | tee -a $R/gpu.txt
fi
tail -n 5 $R/*-gpu.txt
