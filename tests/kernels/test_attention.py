"""Paged decode (split-K) and extend attention, Triton and the CPU path, against the padded-SDPA
reference: random block tables, odd context lengths crossing page and split boundaries, GQA ratios
1/2/4/8, unused cache slots and outputs poisoned."""

import pytest
import torch

from kernels.attention import (
    paged_attention_cpu,
    paged_attention_ref,
    paged_decode_attention_triton,
    paged_extend_attention_triton,
)
from kernels.dispatch import HAS_TRITON

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
POISON = 1e3  # unused slots hold a large finite value: read by mistake, it shows


def _paged_batch(context_lens, q_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """A cache whose sequences own shuffled blocks, and queries for the last q_lens positions."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=g)
    width = max(blocks_per_seq)
    tables = torch.zeros(len(context_lens), width, dtype=torch.int32)
    k_cache = torch.full((num_blocks * block_size, num_kv_heads, head_dim), POISON)
    v_cache = torch.full_like(k_cache, POISON)
    used = 0
    for i, (ctx, nb) in enumerate(zip(context_lens, blocks_per_seq)):
        tables[i, :nb] = order[used:used + nb].int()
        used += nb
        pos = torch.arange(ctx)
        slots = tables[i, pos // block_size].long() * block_size + pos % block_size
        k_cache[slots] = torch.randn(ctx, num_kv_heads, head_dim, generator=g)
        v_cache[slots] = torch.randn(ctx, num_kv_heads, head_dim, generator=g)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    q = torch.randn(int(qsl[-1]), num_heads, head_dim, generator=g)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    return (to(q.to(dtype)), to(k_cache.to(dtype)), to(v_cache.to(dtype)), to(tables),
            to(torch.tensor(context_lens, dtype=torch.int32)), to(qsl))


def _close(a, b, dtype):
    torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype], rtol=TOL[dtype])


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 4), (64, 8)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_attention_matches_reference(dtype, block_size, head_dim, group, num_splits):
    context_lens = [1, 17, 33, 70, 129][: 5 if block_size > 1 else 3]
    num_kv_heads = 2
    q, kc, vc, bt, ctx, qsl = _paged_batch(context_lens, [1] * len(context_lens), num_kv_heads * group,
                                           num_kv_heads, head_dim, block_size, dtype,
                                           seed=block_size * 100 + head_dim + group)
    scale = head_dim**-0.5
    out = paged_decode_attention_triton(q, kc, vc, bt, ctx, block_size, scale, max(context_lens),
                                        num_splits=num_splits, block_n=16)
    _close(out, paged_attention_ref(q, kc, vc, bt, ctx, qsl, block_size, scale), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 4), (64, 8)])
def test_extend_attention_matches_reference(dtype, block_size, head_dim, group):
    # A prefill, a suffix extend over a cached prefix, a decode and a chunk crossing tiles.
    context_lens, q_lens = [37, 60, 18, 50], [37, 21, 1, 40]
    num_kv_heads = 1 if group == 8 else 2
    q, kc, vc, bt, ctx, qsl = _paged_batch(context_lens, q_lens, num_kv_heads * group, num_kv_heads,
                                           head_dim, block_size, dtype, seed=block_size + head_dim + group)
    scale = head_dim**-0.5
    out = paged_extend_attention_triton(q, kc, vc, bt, ctx, qsl, block_size, scale, max(q_lens),
                                        block_m=16, block_n=16)
    _close(out, paged_attention_ref(q, kc, vc, bt, ctx, qsl, block_size, scale), dtype)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 4), (96, 3)])
def test_extend_attention_with_the_engines_tiles(dtype, head_dim, group):
    # The tile sizes the engine launches (extend_config): prefills spanning several query tiles
    # and whole unmasked KV tiles before the diagonal, a long extend over a cached prefix, a
    # sequence with no new tokens beside them, a decode, and a group that does not divide the tile.
    context_lens, q_lens = [300, 200, 129, 77, 40], [300, 64, 129, 0, 1]
    q, kc, vc, bt, ctx, qsl = _paged_batch(context_lens, q_lens, 2 * group, 2, head_dim, 16, dtype,
                                           seed=head_dim + group)
    scale = head_dim**-0.5
    out = paged_extend_attention_triton(q, kc, vc, bt, ctx, qsl, 16, scale, max(q_lens))
    _close(out, paged_attention_ref(q, kc, vc, bt, ctx, qsl, 16, scale), dtype)


@needs_triton
def test_decode_split_count_does_not_change_the_result():
    q, kc, vc, bt, ctx, _ = _paged_batch([200, 5], [1, 1], 4, 2, 64, 16, torch.float32, seed=7)
    outs = [paged_decode_attention_triton(q, kc, vc, bt, ctx, 16, 0.125, 200, num_splits=s, block_n=16)
            for s in (1, 2, 7, 13)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


# (context_lens, q_lens): decodes whose contexts cross pages; a prefill of a few hundred, suffix extends
# over cached prefixes (two of the same length, different contexts) and a short prompt; and both in
# one batch, with contexts far enough apart that the decodes run as two batches.
CPU_LAYOUTS = {
    "decode": ([1, 17, 33, 70, 129, 45], [1] * 6),
    "extend": ([300, 60, 100, 90, 37], [300, 21, 21, 40, 37]),
    "mixed": ([5, 700, 129, 250, 60, 83, 19], [1, 1, 1, 250, 21, 21, 1]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 2), (64, 4), (96, 4)])
@pytest.mark.parametrize("layout", list(CPU_LAYOUTS))
def test_cpu_attention_matches_reference(dtype, block_size, head_dim, group, layout):
    context_lens, q_lens = CPU_LAYOUTS[layout]
    num_kv_heads = 2
    q, kc, vc, bt, ctx, qsl = _paged_batch(context_lens, q_lens, num_kv_heads * group, num_kv_heads,
                                           head_dim, block_size, dtype, seed=block_size + head_dim + group)
    q, kc, vc, bt, ctx, qsl = (t.cpu() for t in (q, kc, vc, bt, ctx, qsl))
    scale = head_dim**-0.5
    out = paged_attention_cpu(q, kc, vc, bt, ctx, qsl, block_size, scale)
    assert out.dtype == dtype and out.shape == q.shape
    _close(out, paged_attention_ref(q, kc, vc, bt, ctx, qsl, block_size, scale), dtype)


def test_cpu_attention_batching_does_not_change_the_result():
    context_lens, q_lens = [3, 900, 40, 333, 16, 71], [1, 1, 1, 5, 5, 1]
    q, kc, vc, bt, ctx, qsl = (t.cpu() for t in _paged_batch(context_lens, q_lens, 8, 2, 64, 16,
                                                              torch.float32, seed=11))
    outs = [paged_attention_cpu(q, kc, vc, bt, ctx, qsl, 16, 0.125, min_split=m) for m in (0, 256, 10**9)]
    for o in outs[1:]:
        torch.testing.assert_close(o, outs[0], atol=1e-5, rtol=1e-5)


def test_cpu_attention_empty_batch_and_rows_without_queries():
    q, kc, vc, bt, ctx, qsl = (t.cpu() for t in _paged_batch([20, 7, 33], [3, 0, 1], 4, 2, 64, 4,
                                                              torch.float32, seed=5))
    out = paged_attention_cpu(q, kc, vc, bt, ctx, qsl, 4, 0.125)
    _close(out, paged_attention_ref(q, kc, vc, bt, ctx, qsl, 4, 0.125), torch.float32)
    q, kc, vc, bt, ctx, qsl = (t.cpu() for t in _paged_batch([20, 7, 33], [2, 0, 2], 4, 2, 64, 4,
                                                              torch.float32, seed=6))
    out = paged_attention_cpu(q, kc, vc, bt, ctx, qsl, 4, 0.125)
    _close(out, paged_attention_ref(q, kc, vc, bt, ctx, qsl, 4, 0.125), torch.float32)
    empty = paged_attention_cpu(q[:0], kc, vc, bt[:0], ctx[:0], qsl[:1], 4, 0.125)
    assert empty.shape == (0, 4, 64)
    assert paged_attention_ref(q[:0], kc, vc, bt[:0], ctx[:0], qsl[:1], 4, 0.125).shape == (0, 4, 64)


@pytest.mark.parametrize("lens,group", [([5, 1, 17, 9], 3), ([8, 8, 8], 1), ([1], 2), ([30, 2], 4)])
def test_packed_causal_attention_matches_each_sequence_alone(lens, group):
    """Training's attention over packed sequences of unequal length (padded per batch, not one
    T x T mask) equals causal attention over each sequence on its own, values and gradients."""
    from kernels.attention import packed_causal_attention

    g = torch.Generator().manual_seed(sum(lens) + group)
    heads_kv, d, t = 2, 16, sum(lens)
    q, k, v = (torch.randn(t, h, d, generator=g, dtype=torch.float64, requires_grad=True)
               for h in (heads_kv * group, heads_kv, heads_kv))
    qsl = torch.tensor([0] + lens).cumsum(0).int()
    out = packed_causal_attention(q, k, v, qsl, 0.25)
    ref = []
    for a, b in zip(qsl[:-1].tolist(), qsl[1:].tolist()):
        qh = q[a:b].transpose(0, 1)
        kh, vh = (x[a:b].transpose(0, 1).repeat_interleave(group, dim=0) for x in (k, v))
        ref.append(torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=0.25)
                   .transpose(0, 1))
    ref = torch.cat(ref)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((out * w).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
