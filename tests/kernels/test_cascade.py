"""Shared-prefix (cascade) decode attention against the padded-SDPA reference, and the host-side
search for groups: rows whose block tables start with the same blocks, as fork leaves them."""

import numpy as np
import pytest
import torch

from kernels.attention import paged_attention_ref
from kernels.cascade import cascade_decode_attention, find_shared_prefixes
from kernels.dispatch import HAS_TRITON

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 3e-3}


def _forked_batch(groups, prompt_lens, tails, num_kv_heads, head_dim, block_size, seed):
    """groups[i] samples forked from prompt i (prompt_lens[i] tokens): they share the prompt's
    full blocks; the prompt's last partial block was copied on write into each sample's own block,
    followed by the sample's tails[i][j] own tokens. Unused slots hold a large value."""
    g = torch.Generator().manual_seed(seed)
    rows, next_block = [], 0
    k_parts, v_parts = {}, {}
    for n, plen, tail in zip(groups, prompt_lens, tails):
        full = plen // block_size
        shared = list(range(next_block, next_block + full))
        next_block += full
        pk = torch.randn(plen, num_kv_heads, head_dim, generator=g)
        pv = torch.randn(plen, num_kv_heads, head_dim, generator=g)
        for j in range(n):
            ctx = plen + tail[j]
            own = -(-ctx // block_size) - full
            table = shared + list(range(next_block, next_block + own))
            next_block += own
            k = torch.cat([pk, torch.randn(tail[j], num_kv_heads, head_dim, generator=g)])
            v = torch.cat([pv, torch.randn(tail[j], num_kv_heads, head_dim, generator=g)])
            rows.append((table, ctx))
            for p in range(ctx):
                slot = table[p // block_size] * block_size + p % block_size
                k_parts[slot], v_parts[slot] = k[p], v[p]
    slots = (next_block + 2) * block_size
    k_cache = torch.full((slots, num_kv_heads, head_dim), 1e3)
    v_cache = torch.full_like(k_cache, 1e3)
    for slot in k_parts:
        k_cache[slot], v_cache[slot] = k_parts[slot], v_parts[slot]
    width = max(len(t) for t, _ in rows)
    tables = np.zeros((len(rows), width), dtype=np.int32)
    for i, (t, _) in enumerate(rows):
        tables[i, :len(t)] = t
    ctx = np.array([c for _, c in rows], dtype=np.int64)
    return k_cache, v_cache, tables, ctx


def test_find_shared_prefixes_groups_forked_rows():
    # 3 samples of a 100-token prompt (6 shared blocks of 16), one lone request, 2 samples of a
    # 40-token prompt (2 blocks: below min_prefix, so not grouped).
    _, _, tables, ctx = _forked_batch([3, 1, 2], [100, 70, 40], [[5, 1, 30], [4], [3, 9]], 1, 8, 16, 0)
    order = np.random.default_rng(0).permutation(len(ctx))  # the batch's row order is arbitrary
    shared = find_shared_prefixes(tables[order], ctx[order], 16, min_prefix=64)
    prefix = shared.prefix_len.numpy()
    expect = np.array([96, 96, 96, 0, 0, 0])[order]
    assert prefix.tolist() == expect.tolist()
    leaders = shared.leader.numpy()
    grouped = np.flatnonzero(prefix)
    assert len(set(leaders[grouped])) == 1 and prefix[leaders[grouped][0]] == 96
    lead = leaders[grouped][0]
    start, count = shared.member_start[lead].item(), shared.member_count[lead].item()
    assert sorted(shared.members[start:start + count].tolist()) == sorted(grouped.tolist())
    assert shared.max_members == 3 and shared.max_prefix_len == 96
    assert shared.max_tail_len == int((ctx[order] - expect).max())
    assert find_shared_prefixes(tables[3:4], ctx[3:4], 16) is None


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,group", [(64, 1), (128, 4), (64, 8)])
def test_cascade_matches_reference(dtype, head_dim, group):
    # Groups of 5 and 3 samples, a lone request, a pair below min_prefix, and a group of 40 whose
    # query heads take more than one tile of rows (40 x group > 128 for group 4 and 8).
    sizes, prompts = [5, 1, 3, 2, 40], [300, 90, 129, 20, 70]
    rng = np.random.default_rng(head_dim + group)
    tails = [rng.integers(1, 50, n).tolist() for n in sizes]
    num_kv_heads = 2
    kc, vc, tables, ctx = _forked_batch(sizes, prompts, tails, num_kv_heads, head_dim, 16, seed=group)
    shared = find_shared_prefixes(tables, ctx, 16, min_prefix=48)
    assert shared is not None and shared.prefix_len.count_nonzero().item() == 5 + 3 + 40
    g = torch.Generator().manual_seed(1)
    q = torch.randn(len(ctx), num_kv_heads * group, head_dim, generator=g)
    to = lambda t: t.to(DEVICE)  # noqa: E731
    q, kc, vc = to(q.to(dtype)), to(kc.to(dtype)), to(vc.to(dtype))
    bt, cl = to(torch.from_numpy(tables)), to(torch.from_numpy(ctx).int())
    qsl = to(torch.arange(len(ctx) + 1, dtype=torch.int32))
    scale = head_dim**-0.5
    out = cascade_decode_attention(q, kc, vc, bt, cl, 16, scale, shared.to(q.device), block_n=16,
                                   prefix_block_n=32)
    ref = paged_attention_ref(q, kc, vc, bt, cl, qsl, 16, scale)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_reduce_ignores_unwritten_empty_splits():
    # The prefix kernel marks a row without a shared prefix empty (lse -inf) and leaves its output
    # slot as torch.empty left it: the reduce must not turn that memory into the answer (0 * NaN).
    from kernels.attention import reduce_partials_triton
    g = torch.Generator().manual_seed(0)
    part_o = torch.randn(3, 4, 3, 64, generator=g)
    part_lse = torch.randn(3, 4, 3, generator=g)
    part_o[:, :, 0] = float("nan")
    part_lse[:, :, 0] = float("-inf")
    part_o, part_lse = part_o.to(DEVICE), part_lse.to(DEVICE)
    out = reduce_partials_triton(part_o, part_lse, torch.empty(3, 4, 64, device=DEVICE))
    w = torch.softmax(part_lse[:, :, 1:], dim=-1)
    ref = (part_o[:, :, 1:] * w[..., None]).sum(2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_reduce_of_a_row_without_any_key_is_zero():
    from kernels.attention import reduce_partials_triton
    part_o = torch.full((1, 2, 3, 16), float("nan"), device=DEVICE)
    part_lse = torch.full((1, 2, 3), float("-inf"), device=DEVICE)
    out = reduce_partials_triton(part_o, part_lse, torch.full((1, 2, 16), 5.0, device=DEVICE))
    assert torch.equal(out, torch.zeros_like(out))
