"""engine._cuda kernels against their references (GPU only; CI compiles them with nvcc), and the
measured dispatch that races them against Triton."""

import time

import pytest
import torch

from kernels import autotune, cuda_ops
from kernels.block_copy import copy_blocks_ref
from kernels.kv_store import store_kv_ref

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and cuda_ops.extension() is not None),
                         reason="needs a GPU and engine._cuda")


def test_dispatch_picks_the_faster_candidate_once_per_key():
    calls = {"slow": 0, "fast": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.002)

    def fast():
        calls["fast"] += 1

    def unsupported():
        raise ValueError("no")

    key = ("test-op", 1)
    runs = {"slow": slow, "none": unsupported, "fast": fast}
    assert autotune.fastest(key, runs, torch.device("cpu")) == "fast"
    before = dict(calls)
    assert autotune.fastest(key, runs, torch.device("cpu")) == "fast"
    assert calls == before  # decided once
    assert autotune.winners()[key] == "fast"
    assert [autotune.bucket(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]


def test_launch_warps_uses_the_first_count_off_the_gpu_and_the_fastest_on_it(monkeypatch):
    seen = []
    assert autotune.launch_warps(("test-warps", 0), lambda w: seen.append(w) or w, torch.device("cpu")) == 4
    assert seen == [4]  # no timing off the GPU: one launch
    # On a GPU autotune.fastest runs every candidate (stood in for here: each once, 8 wins), and
    # the winner is launched.
    def fastest(key, runs, device):
        for run in runs.values():
            run()
        return "8"

    monkeypatch.setattr(autotune, "fastest", fastest)
    seen.clear()
    assert autotune.launch_warps(("test-warps", 1), lambda w: seen.append(w) or w, torch.device("cuda")) == 8
    assert seen == [4, 8, 16, 8]


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_store_kv_and_block_copy_match_reference(dtype):
    fused = torch.randn(11, 3, 4, 64, dtype=dtype, device="cuda")  # k, v are views of a fused qkv
    k, v = fused[:, 1], fused[:, 2]
    slots = torch.randperm(40, device="cuda")[:11]
    caches = [torch.full((40, 4, 64), float("nan"), dtype=dtype, device="cuda") for _ in range(4)]
    cuda_ops.store_kv_cuda(k, v, caches[0], caches[1], slots)
    store_kv_ref(k, v, caches[2], caches[3], slots)
    assert torch.equal(caches[0][slots], caches[2][slots])
    assert torch.equal(caches[1][slots], caches[3][slots])

    kv = torch.randn(6, 10, 128, dtype=dtype, device="cuda")
    pairs = torch.tensor([[0, 5], [3, 7], [9, 1]], dtype=torch.int32, device="cuda")
    expect = kv.clone()
    copy_blocks_ref(expect, pairs)
    cuda_ops.copy_blocks_cuda(kv, pairs)
    assert torch.equal(kv, expect)
