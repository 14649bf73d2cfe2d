"""Every benchmark script runs end to end at toy sizes on any device and writes its results file."""

import importlib.util
import json
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernels_bench_times_every_kernel(tmp_path):
    pytest.importorskip("triton")
    metrics = _load("kernels").main(["--toy", "--reps", "1", "--out", str(tmp_path)])
    [path] = tmp_path.glob("kernels-*.json")
    record = json.loads(path.read_text())
    assert {"device", "torch", "triton", "date", "metrics"} <= record.keys()
    ops = {(r["op"], r["impl"]) for r in metrics["kernels"]}
    for op in ("rms_norm+residual", "silu_and_mul", "rotary", "store_kv", "decode_attention",
               "extend_attention", "sample", "lora_masked (1/8 rows)"):
        assert (op, "torch") in ops and (op, "triton") in ops
    assert all(r["ms"] > 0 and r["floor_ms"] > 0 for r in metrics["kernels"])
