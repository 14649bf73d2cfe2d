"""Shared-prefix (cascade) decode attention: the samples of one request share their prompt's
blocks (fork), and prefix caching shares blocks between requests, yet plain paged decode reads
a shared block once per sequence per step. Here each group of sequences whose block tables start
with the same blocks reads that prefix once for all its members (the members' query heads are
the rows of one tensor-core tile), each sequence then reads only its own tail, and the two
partial results merge by log-sum-exp (the cascade idea FlashInfer made known).

find_shared_prefixes (host, numpy) finds the groups; cascade_decode_attention runs the prefix
kernel, the plain decode kernel over the tails, and one reduce over both."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels.attention import decode_num_splits, decode_partials_triton, dot_precision, reduce_partials_triton
from kernels.dispatch import HAS_TRITON

if HAS_TRITON:
    from kernels.attention import attend_kv_tile, partial_result


@dataclass
class SharedPrefixes:
    """Per sequence of a decode batch (int32 [B] tensors): prefix_len, the keys it shares with its
    group (0: none); leader, the group's first row; for a leader, members[member_start :
    member_start + member_count] are its group's rows (itself included)."""

    prefix_len: torch.Tensor
    leader: torch.Tensor
    member_start: torch.Tensor
    member_count: torch.Tensor
    members: torch.Tensor
    max_members: int
    max_prefix_len: int
    max_tail_len: int  # the longest context_len - prefix_len
    saved_keys: int  # keys per layer and KV head that plain decode would read again

    def to(self, device: torch.device) -> SharedPrefixes:
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return SharedPrefixes(move(self.prefix_len), move(self.leader), move(self.member_start),
                              move(self.member_count), move(self.members), self.max_members,
                              self.max_prefix_len, self.max_tail_len, self.saved_keys)


def find_shared_prefixes(block_tables: np.ndarray, context_lens: np.ndarray, block_size: int,
                         min_prefix: int = 256) -> SharedPrefixes | None:
    """Groups of decode rows whose block tables begin with the same blocks (the same physical
    blocks hold the same keys), sharing at least min_prefix keys; None when no group does.
    A group shares its common leading blocks, capped at its shortest context."""
    batch = len(context_lens)
    if batch < 2 or block_tables.shape[1] == 0:
        return None
    ctx = np.asarray(context_lens, dtype=np.int64)
    order = np.argsort(block_tables[:, 0], kind="stable")
    tables = block_tables[order]
    first = tables[:, 0]
    run_start = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])
    run_len = np.diff(np.r_[run_start, batch])
    if run_len.max() < 2:  # no two rows start with the same block: skip the table comparison
        return None
    lead = np.repeat(run_start, run_len)  # each sorted row's run leader
    same = tables == tables[lead]
    common = np.where(same.all(axis=1), same.shape[1], same.argmin(axis=1))  # leading equal blocks
    shared = np.minimum.reduceat(common, run_start) * block_size
    shared = np.minimum(shared, np.minimum.reduceat(ctx[order], run_start))
    use = (run_len >= 2) & (shared >= min_prefix)
    if not use.any():
        return None
    prefix = np.zeros(batch, dtype=np.int64)
    prefix[order] = np.repeat(np.where(use, shared, 0), run_len)
    leader = np.arange(batch, dtype=np.int64)
    leader[order] = order[lead]
    member_start = np.zeros(batch, dtype=np.int64)
    member_count = np.zeros(batch, dtype=np.int64)
    member_start[order[run_start]] = run_start
    member_count[order[run_start]] = np.where(use, run_len, 1)
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))  # noqa: E731
    return SharedPrefixes(as_t(prefix), as_t(leader), as_t(member_start), as_t(member_count), as_t(order),
                          int(run_len[use].max()), int(shared[use].max()), int((ctx - prefix).max()),
                          int(((run_len - 1) * shared)[use].sum()))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _prefix_partial_kernel(
        q_ptr, kc_ptr, vc_ptr, bt_ptr, plen_ptr, leader_ptr, mstart_ptr, mcount_ptr, members_ptr,
        part_o_ptr, part_lse_ptr, stride_qt, stride_qh, stride_cs, stride_ch, stride_bt, scale,
        split_len, total_splits,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One (sequence, KV head, prefix split). A group's leader attends every member's query
        heads (BLOCK_M // GROUP members a tile) to the split's prefix keys, read once, and
        writes each member's partial slot s; a sequence without a shared prefix marks its slot
        empty; other members return at once."""
        b, kvh, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        num_heads = tl.num_programs(1) * GROUP
        plen = tl.load(plen_ptr + b)
        if plen == 0:
            g = tl.arange(0, GROUP_PAD)
            tl.store(part_lse_ptr + (b * num_heads + kvh * GROUP + g) * total_splits + s, float("-inf"),
                     mask=g < GROUP)
            return
        if tl.load(leader_ptr + b) != b:
            return
        start = s * split_len
        end = tl.minimum(plen, start + split_len)
        first = tl.load(mstart_ptr + b)
        count = tl.load(mcount_ptr + b)
        MEMBERS: tl.constexpr = BLOCK_M // GROUP
        rows = tl.arange(0, BLOCK_M)
        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_DIM
        heads = kvh * GROUP + rows % GROUP
        bt_row = bt_ptr + b * stride_bt
        qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
        for j0 in range(0, count, MEMBERS):
            j = j0 + rows // GROUP
            row_ok = (rows < MEMBERS * GROUP) & (j < count)
            seq = tl.load(members_ptr + first + j, mask=row_ok, other=0).to(tl.int64)
            q = tl.load(q_ptr + seq[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                        mask=row_ok[:, None] & d_mask[None, :], other=0.0)
            m = tl.full([BLOCK_M], float("-inf"), tl.float32)
            den = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
            for n0 in range(start, end, BLOCK_N):
                acc, m, den = attend_kv_tile(q, acc, m, den, kc_ptr, vc_ptr, bt_row, kvh, stride_cs,
                                             stride_ch, n0, end, rows, d, d_mask, qk_scale, BLOCK_N, PAGE,
                                             PRECISION, 1)
            out, lse = partial_result(acc, m, den)  # a split past the prefix is empty
            part = (seq * num_heads + heads) * total_splits + s
            tl.store(part_lse_ptr + part, lse, mask=row_ok)
            tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], out,
                     mask=row_ok[:, None] & d_mask[None, :])


def cascade_decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, block_size: int, scale: float, shared: SharedPrefixes,
    block_n: int = 32, prefix_block_n: int = 64,
) -> torch.Tensor:
    """paged decode attention, q [B, H, D], with each group's shared prefix read once: the prefix
    splits and the tail splits of every sequence go to one partial buffer and one reduce."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    groups = max(1, batch // max(shared.max_members, 1))
    prefix_splits = decode_num_splits(groups, num_kv_heads, shared.max_prefix_len, prefix_block_n)
    tail_splits = decode_num_splits(batch, num_kv_heads, shared.max_tail_len, block_n)
    total = prefix_splits + tail_splits
    part_o = torch.empty(batch, num_heads, total, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, total, dtype=torch.float32, device=q.device)
    split_len = triton.cdiv(triton.cdiv(shared.max_prefix_len, prefix_splits), prefix_block_n)
    split_len *= prefix_block_n
    block_m = max(16, min(128, triton.next_power_of_2(shared.max_members * group)))
    block_m = max(block_m, triton.next_power_of_2(group))
    _prefix_partial_kernel[(batch, num_kv_heads, prefix_splits)](
        q, k_cache, v_cache, block_tables, shared.prefix_len, shared.leader, shared.member_start,
        shared.member_count, shared.members, part_o, part_lse, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), block_tables.stride(0), scale, split_len, total,
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim), BLOCK_M=block_m, BLOCK_N=prefix_block_n, PAGE=block_size,
        PRECISION=dot_precision(q.dtype),
        num_warps=8 if block_m * head_dim >= 8192 else 4)  # sm_90: 4 warps spill a 64 x 128 tile
    decode_partials_triton(q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
                           shared.max_tail_len, tail_splits, part_o, part_lse, split_base=prefix_splits,
                           starts=shared.prefix_len, block_n=block_n)
    return reduce_partials_triton(part_o, part_lse, out)
