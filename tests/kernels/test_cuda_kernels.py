"""engine._cuda kernels against their references (GPU only; CI compiles them with nvcc), and the
measured dispatch that races them against Triton."""

import time

import pytest
import torch

from kernels import autotune, cuda_ops
from kernels.attention import paged_attention_ref
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


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim,group,block_size", [(64, 1, 1), (128, 4, 16), (128, 8, 4),
                                                       (256, 2, 16)])
def test_cuda_decode_attention_matches_reference(dtype, head_dim, group, block_size):
    from tests.kernels.test_attention import _paged_batch

    lens = [1, 15, 16, 17, 300, 1025]
    q, kc, vc, bt, ctx, qsl = _paged_batch(lens, [1] * len(lens), 2 * group, 2, head_dim, block_size,
                                           dtype, seed=head_dim + group)
    out = cuda_ops.decode_attention_cuda(q, kc, vc, bt, ctx, block_size, head_dim**-0.5)
    ref = paged_attention_ref(q, kc, vc, bt, ctx, qsl, block_size, head_dim**-0.5)
    tol = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


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
