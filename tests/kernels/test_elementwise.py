"""Triton kernels against their torch references (interpreter on CPU, native on GPU):
fresh random inputs, odd sizes, non-contiguous views, poisoned outputs."""

import pytest
import torch

pytest.importorskip("triton")

from kernels.activation import silu_and_mul_ref, silu_and_mul_triton  # noqa: E402
from kernels.kv_store import (  # noqa: E402
    rotary_store_kv_ref,
    rotary_store_kv_triton,
    store_kv_ref,
    store_kv_triton,
)
from kernels.rmsnorm import rms_norm_ref, rms_norm_triton  # noqa: E402
from kernels.rotary import apply_rotary_ref, apply_rotary_triton, rotary_cache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 64), (7, 96), (13, 200)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(dtype, tokens, hidden, with_residual):
    x = torch.randn(tokens, hidden, dtype=dtype, device=DEVICE)
    w = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    res = torch.randn_like(x) if with_residual else None
    out, new_res = rms_norm_triton(x, w, 1e-6, res)
    ref, ref_res = rms_norm_ref(x, w, 1e-6, res)
    _close(out, ref, dtype)
    _close(new_res, ref_res, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 64), (5, 200), (9, 1100)])
def test_silu_and_mul(dtype, tokens, inter):
    x = torch.randn(tokens, 2 * inter, dtype=dtype, device=DEVICE)
    _close(silu_and_mul_triton(x), silu_and_mul_ref(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (8, 1)])
def test_rotary_on_views_of_a_fused_projection(dtype, head_dim, heads, kv_heads):
    tokens = 11
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q, k, _ = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k = q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim)
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    table = rotary_cache(inv_freq, 4096).to(DEVICE)
    positions = torch.randint(0, 4096, (tokens,), device=DEVICE)
    got_q, got_k = apply_rotary_triton(q, k, positions, table)
    ref_q, ref_k = apply_rotary_ref(q, k, positions, table)
    _close(got_q, ref_q, dtype)
    _close(got_k, ref_k, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kv_heads,head_dim", [(1, 64), (2, 128), (8, 64)])
def test_store_kv_writes_only_its_slots(dtype, kv_heads, head_dim):
    tokens, slots = 9, 64
    k = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    v = torch.randn(tokens, kv_heads, head_dim, dtype=dtype, device=DEVICE)
    slot_mapping = torch.randperm(slots, device=DEVICE)[:tokens]
    caches = [torch.full((slots, kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
              for _ in range(4)]
    store_kv_triton(k, v, caches[0], caches[1], slot_mapping)
    store_kv_ref(k, v, caches[2], caches[3], slot_mapping)
    for got, ref in ((caches[0], caches[2]), (caches[1], caches[3])):
        assert torch.equal(got[slot_mapping], ref[slot_mapping])
        untouched = torch.ones(slots, dtype=torch.bool, device=DEVICE)
        untouched[slot_mapping] = False
        assert got[untouched].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache_dtype", [None, torch.float32])
@pytest.mark.parametrize("head_dim,heads,kv_heads", [(64, 4, 4), (128, 8, 2), (64, 24, 1), (96, 6, 3)])
def test_rotary_store_kv_fused(dtype, cache_dtype, head_dim, heads, kv_heads):
    # q, k, v are views of one fused projection, as the model passes them; positions repeat and
    # jump; the caches are poisoned so a stray write or a missed slot shows.
    tokens, slots = 13, 80
    cache_dtype = cache_dtype or dtype
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=DEVICE)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(tokens, heads, head_dim)
    k, v = k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    table = rotary_cache(inv_freq, 4096).to(DEVICE)
    positions = torch.tensor([0, 1, 2, 3, 4095, 7, 7, 100, 2048, 5, 6, 9, 1000], device=DEVICE)
    slot_mapping = torch.randperm(slots, device=DEVICE)[:tokens]
    caches = [torch.full((slots, kv_heads, head_dim), float("nan"), dtype=cache_dtype, device=DEVICE)
              for _ in range(6)]
    got_q = rotary_store_kv_triton(q, k, v, caches[0], caches[1], slot_mapping, positions, table)
    # the unfused Triton path (rotary, then store) gives the same bits; the reference agrees to
    # rounding (it rotates in the activations' dtype)
    sep_q, sep_k = apply_rotary_triton(q, k, positions, table)
    store_kv_triton(sep_k, v, caches[2], caches[3], slot_mapping)
    ref_q = rotary_store_kv_ref(q, k, v, caches[4], caches[5], slot_mapping, positions, table)
    assert torch.equal(got_q, sep_q)
    _close(got_q, ref_q, dtype)
    untouched = torch.ones(slots, dtype=torch.bool, device=DEVICE)
    untouched[slot_mapping] = False
    for got, sep, ref in ((caches[0], caches[2], caches[4]), (caches[1], caches[3], caches[5])):
        assert torch.equal(got[slot_mapping], sep[slot_mapping])
        _close(got[slot_mapping], ref[slot_mapping], dtype)
        assert got[untouched].isnan().all()


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU with ~10 GB free")
def test_row_offsets_past_2_31_elements():
    # 80k tokens of an 8B model's MLP input: row * stride passes 2^31 (int32 offsets wrap).
    tokens, inter = 80_000, 14_336
    x = torch.empty(tokens, 2 * inter, dtype=torch.bfloat16, device=DEVICE).normal_()
    assert x.numel() > 2**31
    tail = slice(tokens - 4, tokens)
    _close(silu_and_mul_triton(x)[tail], silu_and_mul_ref(x[tail]), torch.bfloat16)
    del x
    h = torch.empty(600_000, 4096, dtype=torch.bfloat16, device=DEVICE).normal_()
    assert h.numel() > 2**31
    w = torch.ones(4096, dtype=torch.bfloat16, device=DEVICE)
    out, _ = rms_norm_triton(h, w, 1e-6)
    _close(out[-4:], rms_norm_ref(h[-4:], w, 1e-6)[0], torch.bfloat16)
