"""Paged attention over the block cache: decode (one query per sequence) and extend (a chunk of
new queries attending causally to the cached prefix plus themselves) in one op."""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kernels import autotune, cpu_ops
from kernels.dispatch import HAS_TRITON, use_triton


def _attend_padded(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, query_start_loc: torch.Tensor, seq_rows: torch.Tensor,
    block_size: int, scale: float, out: torch.Tensor,
) -> None:
    """Attention for the sequences seq_rows, padded to their longest query and context."""
    starts = query_start_loc[seq_rows]
    q_lens = query_start_loc[seq_rows + 1] - starts
    ctx = context_lens[seq_rows].long()
    max_q, max_k = int(q_lens.max()), int(ctx.max())
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]

    qi = torch.arange(max_q, device=q.device)
    q_valid = qi[None, :] < q_lens[:, None]  # [B, Lq]
    q_index = (starts[:, None] + qi[None, :]).clamp(max=q.shape[0] - 1)
    qp = q[q_index]  # [B, Lq, H, D]

    tables = block_tables[seq_rows].long()
    kpos = torch.arange(max_k, device=q.device)
    slots = tables.gather(1, (kpos // block_size)[None, :].expand(len(seq_rows), -1))
    slots = slots * block_size + kpos % block_size  # [B, Lk]
    kp = k_cache[slots]  # [B, Lk, Hkv, D]
    vp = v_cache[slots]

    # Query i of a sequence sits at position ctx - q_len + i and sees keys up to it.
    qpos = (ctx - q_lens)[:, None] + qi[None, :]
    mask = (kpos[None, None, :] <= qpos[:, :, None]) & (kpos[None, None, :] < ctx[:, None, None])
    mask |= ~q_valid[:, :, None] & (kpos == 0)[None, None, :]  # padding rows: avoid NaN

    group = num_heads // num_kv_heads
    qh = qp.permute(0, 2, 1, 3)  # [B, H, Lq, D]
    kh = kp.permute(0, 2, 1, 3).repeat_interleave(group, dim=1).to(q.dtype)
    vh = vp.permute(0, 2, 1, 3).repeat_interleave(group, dim=1).to(q.dtype)
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None], scale=scale)
    o = o.permute(0, 2, 1, 3)  # [B, Lq, H, D]
    out[q_index[q_valid]] = o[q_valid].reshape(-1, num_heads, head_dim).to(out.dtype)


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            query_start_loc: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense causal attention over sequences packed back to back (no cache; used for training,
    differentiable): q [T, H, D], k/v [T, Hkv, D], query_start_loc [B + 1]."""
    tokens = q.shape[0]
    lens = (query_start_loc[1:] - query_start_loc[:-1]).long()
    group = q.shape[1] // k.shape[1]
    if len(lens) and bool((lens == lens[0]).all()):  # equal lengths (padded batches): no T x T mask
        b, n = len(lens), int(lens[0])
        qh, kh, vh = (t.view(b, n, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))
        kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale)
        return o.transpose(1, 2).reshape(tokens, q.shape[1], q.shape[2])
    # Unequal lengths: pad each sequence to the longest (B x n x n masks, not one T x T over the
    # whole batch: a batch of 32 sequences of ~95 tokens costs 32x less), attend, and unpad.
    b, n = len(lens), int(lens.max()) if len(lens) else 0
    pos = torch.arange(tokens, device=q.device) - torch.repeat_interleave(query_start_loc[:-1].long(), lens)
    row = torch.repeat_interleave(torch.arange(b, device=q.device), lens) * n + pos  # each token's padded row

    def pad(t):
        out = t.new_zeros(b * n, t.shape[1], t.shape[2])
        return out.index_copy(0, row, t).view(b, n, t.shape[1], t.shape[2]).transpose(1, 2)

    qh, kh, vh = pad(q), pad(k), pad(v)
    kh, vh = kh.repeat_interleave(group, dim=1), vh.repeat_interleave(group, dim=1)
    idx = torch.arange(n, device=q.device)
    mask = (idx[None, :] <= idx[:, None])[None] & (idx[None, None, :] < lens[:, None, None])  # [B, n, n]
    o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask[:, None], scale=scale)
    return o.transpose(1, 2).reshape(b * n, q.shape[1], q.shape[2]).index_select(0, row)


def paged_attention_ref(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: int, scale: float,
) -> torch.Tensor:
    """q: [T, H, D] new queries of B sequences, flattened; k_cache/v_cache: [slots, Hkv, D];
    block_tables: int32 [B, W]; context_lens: [B] cached length including the new tokens;
    query_start_loc: [B + 1] offsets of each sequence's queries in q. Returns [T, H, D]."""
    out = torch.empty_like(q)
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    # Decodes and extends are padded separately so one long chunk does not pad every decode.
    decode = q_lens == 1
    for rows in (torch.nonzero(decode).flatten(), torch.nonzero(~decode & (q_lens > 0)).flatten()):
        if rows.numel():
            _attend_padded(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                           rows, block_size, scale, out)
    return out


@dataclass
class _Batch:
    """Sequences of one query length attended together: their queries' rows in q (None: all of
    q, in order), the cache blocks to gather, and the causal mask over the gathered keys."""

    q_rows: torch.Tensor | None
    q_len: int
    blocks: torch.Tensor  # [B * W] block ids, W blocks per sequence
    mask: torch.Tensor  # [B, 1, Lq, W * block_size]
    seqs: torch.Tensor | None = None  # the sequences (rows of the block table); None: all, in order


@dataclass
class CpuAttentionPlan:
    """What every layer of one step shares on the CPU path (plan_cpu_attention)."""

    batches: list[_Batch]
    num_rows: int


def plan_cpu_attention(
    block_tables: torch.Tensor, context_lens: torch.Tensor, query_start_loc: torch.Tensor,
    block_size: int, min_split: int = 256,
) -> CpuAttentionPlan:
    """Group the step's sequences by query length (all decodes together), cut where padding to a
    batch's longest context would more than double a row's keys, and lay out each batch's block
    gather and causal mask: once a step, not once a layer."""
    dev = block_tables.device
    q_lens = (query_start_loc[1:] - query_start_loc[:-1]).tolist()
    ctx_list = context_lens.tolist()
    groups = _batches(q_lens, ctx_list, min_split)
    whole = len(groups) == 1 and len(groups[0]) == len(q_lens)  # every row, q in order
    batches = []
    for rows in groups:
        q_len = q_lens[rows[0]]
        width = -(-max(ctx_list[r] for r in rows) // block_size)
        index = None
        if whole:
            tables, ctx, q_rows = block_tables[:, :width], context_lens, None
        else:
            index = torch.tensor(rows, device=dev)
            tables, ctx = block_tables[index, :width], context_lens[index]
            q_rows = (query_start_loc[index].long()[:, None] + torch.arange(q_len, device=dev)).flatten()
        # Query i sits at position ctx - q_len + i and sees keys up to it (so none past the context).
        qpos = (ctx.long() - q_len)[:, None] + torch.arange(q_len, device=dev)
        mask = (torch.arange(width * block_size, device=dev)[None, None, :] <= qpos[:, :, None])[:, None]
        batches.append(_Batch(q_rows, q_len, tables.flatten().long(), mask, index))
    return CpuAttentionPlan(batches, len(q_lens))


def _attend_batch(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, batch: _Batch,
                  scale: float) -> torch.Tensor:
    """q [B, Lq, H, D] of one batch; k/v_blocks [blocks, block_size, Hkv, D]. Returns [B * Lq, H, D]."""
    num_seqs, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k_blocks.shape[2]
    keys = batch.mask.shape[-1]
    # Whole blocks, padded only to this batch's longest context; keys past a context are masked.
    k = k_blocks.index_select(0, batch.blocks).view(num_seqs, keys, num_kv_heads, head_dim).transpose(1, 2)
    v = v_blocks.index_select(0, batch.blocks).view(num_seqs, keys, num_kv_heads, head_dim).transpose(1, 2)
    k, v = k.to(q.dtype), v.to(q.dtype)
    if q_len == 1:  # a decode's query heads of one KV head act as its queries: one matmul serves them
        grouped = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
        o = F.scaled_dot_product_attention(grouped, k, v, attn_mask=batch.mask, scale=scale)
        return o.view(num_seqs, num_heads, head_dim)
    # Measured on CPU (torch 2.13): for chunks, enable_gqa beats stacking the group along the queries.
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=batch.mask, scale=scale,
                                       enable_gqa=True)
    return o.transpose(1, 2).reshape(num_seqs * q_len, num_heads, head_dim)


def _batches(q_lens: list[int], context_lens: list[int], min_split: int) -> list[list[int]]:
    """Rows with equal query lengths, sorted by context and cut where padding a row to the batch's
    longest context would more than double its keys (and waste at least min_split keys)."""
    by_len: dict[int, list[int]] = {}
    for row, q_len in enumerate(q_lens):
        if q_len:
            by_len.setdefault(q_len, []).append(row)
    batches = []
    for rows in by_len.values():
        rows.sort(key=context_lens.__getitem__, reverse=True)
        first = 0
        for i, row in enumerate(rows):
            longest, own = context_lens[rows[first]], context_lens[row]
            if 2 * own <= longest and longest - own >= min_split:
                batches.append(rows[first:i])
                first = i
        batches.append(rows[first:])
    return batches


def paged_attention_cpu(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: int, scale: float,
    min_split: int = 256, plan: CpuAttentionPlan | None = None,
) -> torch.Tensor:
    """paged_attention_ref without its padding and KV-head copies (the CPU path): sequences with the
    same query length run as one batch (all decodes together), K/V gathered a block at a time.
    plan: this step's plan_cpu_attention, when the caller made it once for every layer."""
    if plan is None:
        plan = plan_cpu_attention(block_tables, context_lens, query_start_loc, block_size, min_split)
    num_heads, head_dim = q.shape[1], q.shape[2]
    k_blocks = k_cache.view(-1, block_size, k_cache.shape[1], head_dim)
    v_blocks = v_cache.view(-1, block_size, v_cache.shape[1], head_dim)
    if len(plan.batches) == 1 and plan.batches[0].q_rows is None:
        batch = plan.batches[0]
        if batch.q_len == 1:
            fast = cpu_ops.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, block_size,
                                                  scale)
            if fast is not None:
                return fast
        return _attend_batch(q.view(plan.num_rows, batch.q_len, num_heads, head_dim), k_blocks, v_blocks,
                             batch, scale)
    out = torch.empty_like(q)
    for batch in plan.batches:
        rows = batch.q_rows
        if batch.q_len == 1:  # decodes beside chunks: the same C++ kernel as a step of decodes alone
            seqs = batch.seqs
            fast = cpu_ops.paged_decode_attention(q[rows], k_cache, v_cache, block_tables[seqs],
                                                  context_lens[seqs], block_size, scale)
            if fast is not None:
                out[rows] = fast
                continue
        out[rows] = _attend_batch(q[rows].view(-1, batch.q_len, num_heads, head_dim), k_blocks, v_blocks,
                                  batch, scale)
    return out


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def attend_kv_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, kvh, stride_cs, stride_ch, n0, kv_end,
                       qpos, d, d_mask, qk_scale, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
                       PRECISION: tl.constexpr, MASK: tl.constexpr):
        """One KV tile of the online softmax (base 2: qk_scale holds log2(e)) for the rows of q,
        keys n0.. read through the block table row bt_row. MASK 0: every key is visible; 1: keys
        below kv_end; 2: those and causal (key position <= each row's qpos)."""
        pos = n0 + tl.arange(0, BLOCK_N)
        if MASK > 0:
            p_mask = pos < kv_end
            page = tl.load(bt_row + pos // PAGE, mask=p_mask, other=0)
            kv_mask = p_mask[:, None] & d_mask[None, :]
        else:
            page = tl.load(bt_row + pos // PAGE)
            kv_mask = d_mask[None, :]
        kv_off = (page.to(tl.int64) * PAGE + pos % PAGE)[:, None] * stride_cs + kvh * stride_ch + d[None, :]
        k = tl.load(kc_ptr + kv_off, mask=kv_mask, other=0.0)
        v = tl.load(vc_ptr + kv_off, mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale
        if MASK == 1:
            s = tl.where(p_mask[None, :], s, float("-inf"))
        if MASK == 2:
            s = tl.where(p_mask[None, :] & (pos[None, :] <= qpos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        return acc, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def partial_result(acc, m_i, l_i):
        """A split's normalised output and natural log-sum-exp (-inf for a split with no keys)
        from attend_kv_tile's base-2 state, for the reduce kernel."""
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        return out, lse

    @triton.jit
    def _decode_partial_kernel(
        q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, start_ptr, part_o_ptr, part_lse_ptr,
        stride_qt, stride_qh, stride_cs, stride_ch, stride_bt, scale, split_len, split_base, total_splits,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr, HAS_START: tl.constexpr,
    ):
        """One (sequence, KV head, split): every query head of the group against the split's keys.
        Writes the split's normalised output and log-sum-exp to partial slot split_base + s for the
        reduce kernel. HAS_START: keys begin at start[b] (the tail after a shared prefix)."""
        b, kvh, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        num_heads = tl.num_programs(1) * GROUP
        ctx = tl.load(ctx_ptr + b)
        start = s * split_len
        if HAS_START:
            start += tl.load(start_ptr + b)
        end = tl.minimum(ctx, start + split_len)
        g = tl.arange(0, GROUP_PAD)
        d = tl.arange(0, D_PAD)
        g_mask = g < GROUP
        d_mask = d < HEAD_DIM
        heads = kvh * GROUP + g
        q = tl.load(q_ptr + b * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=g_mask[:, None] & d_mask[None, :], other=0.0)
        m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
        den = tl.zeros([GROUP_PAD], tl.float32)
        acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
        qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
        for n0 in range(start, end, BLOCK_N):
            acc, m, den = attend_kv_tile(q, acc, m, den, kc_ptr, vc_ptr, bt_ptr + b * stride_bt, kvh,
                                         stride_cs, stride_ch, n0, end, heads, d, d_mask, qk_scale,
                                         BLOCK_N, PAGE, PRECISION, 1)
        out, lse = partial_result(acc, m, den)  # a split past this sequence's end is empty
        row = (b * num_heads + heads) * total_splits + split_base + s
        tl.store(part_lse_ptr + row, lse, mask=g_mask)
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], out,
                 mask=g_mask[:, None] & d_mask[None, :])

    @triton.jit
    def _decode_reduce_kernel(part_o_ptr, part_lse_ptr, o_ptr, stride_ot, stride_oh, num_splits,
                              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, S_PAD: tl.constexpr):
        b, h = tl.program_id(0), tl.program_id(1)
        row = b * tl.num_programs(1) + h
        s = tl.arange(0, S_PAD)
        d = tl.arange(0, D_PAD)
        s_mask = s < num_splits
        d_mask = d < HEAD_DIM
        lse = tl.load(part_lse_ptr + row * num_splits + s, mask=s_mask, other=float("-inf"))
        top = tl.max(lse, 0)
        w = tl.exp(lse - tl.where(top == float("-inf"), 0.0, top))  # every split empty: all 0
        parts = tl.load(part_o_ptr + (row * num_splits + s)[:, None] * HEAD_DIM + d[None, :],
                        mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        # an empty split (lse -inf) may leave its output slot unwritten: never multiply its garbage
        parts = tl.where(w[:, None] > 0.0, parts, 0.0)
        total = tl.sum(w, 0)  # 0 with no keys at all: the output is 0, as the reference's
        out = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
        tl.store(o_ptr + b * stride_ot + h * stride_oh + d, out.to(o_ptr.dtype.element_ty), mask=d_mask)

    @triton.jit
    def _extend_kernel(
        q_ptr, kc_ptr, vc_ptr, bt_ptr, ctx_ptr, qsl_ptr, o_ptr,
        stride_qt, stride_qh, stride_ot, stride_oh, stride_cs, stride_ch, stride_bt, scale,
        GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PAGE: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """One (tile of new queries, sequence, KV head), FlashAttention-2 style: the tile's rows are
        BLOCK_M // GROUP query tokens times the GROUP query heads of the KV head, so each K/V tile
        is read once for the group; keys that every row sees run without a mask, and only the
        tiles on the diagonal are masked. All K/V come from the paged cache (store_kv ran first).
        The heaviest tiles (last in the sequence) are launched first."""
        mt = tl.num_programs(0) - 1 - tl.program_id(0)
        b, kvh = tl.program_id(1), tl.program_id(2)
        BLOCK_Q: tl.constexpr = BLOCK_M // GROUP
        q_start = tl.load(qsl_ptr + b)
        q_len = tl.load(qsl_ptr + b + 1) - q_start
        if mt * BLOCK_Q >= q_len:
            return
        ctx = tl.load(ctx_ptr + b)
        first = ctx - q_len + mt * BLOCK_Q  # the position of the tile's first query
        rows = tl.arange(0, BLOCK_M)
        qi = mt * BLOCK_Q + rows // GROUP
        row_mask = (rows < BLOCK_Q * GROUP) & (qi < q_len)
        qpos = ctx - q_len + qi
        q_rows = (q_start + qi).to(tl.int64)  # token * stride passes 2^31 on big batches
        heads = kvh * GROUP + rows % GROUP
        d = tl.arange(0, D_PAD)
        d_mask = d < HEAD_DIM
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
                    mask=row_mask[:, None] & d_mask[None, :], other=0.0)
        qk_scale = scale * 1.4426950408889634  # exp(x) = exp2(x * log2(e))
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        bt_row = bt_ptr + b * stride_bt
        kv_end = tl.minimum(ctx, first + BLOCK_Q)
        full_end = (first + 1) // BLOCK_N * BLOCK_N  # keys below it: seen by every row of the tile
        for n0 in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = attend_kv_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, kvh, stride_cs,
                                           stride_ch, n0, kv_end, qpos, d, d_mask, qk_scale, BLOCK_N, PAGE,
                                           PRECISION, 0)
        # Key `first` is visible to every row, so no row of the masked tiles is fully masked.
        for n0 in range(full_end, kv_end, BLOCK_N):
            acc, m_i, l_i = attend_kv_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, bt_row, kvh, stride_cs,
                                           stride_ch, n0, kv_end, qpos, d, d_mask, qk_scale, BLOCK_N, PAGE,
                                           PRECISION, 2)
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(o_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact float32 products for float32 (tests, reference precision)."""
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored for 16-bit operands


def decode_num_splits(batch: int, num_kv_heads: int, max_context_len: int, block_n: int = 64,
                      target_programs: int = 264) -> int:
    """Flash-decoding: split long contexts so batch x kv heads x splits fills the GPU's SMs."""
    work = batch * num_kv_heads
    if work >= target_programs:
        return 1
    return max(1, min(triton.cdiv(max_context_len, 4 * block_n), triton.cdiv(target_programs, work)))


def decode_partials_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, block_size: int, scale: float, span: int, num_splits: int,
    part_o: torch.Tensor, part_lse: torch.Tensor, split_base: int = 0, starts: torch.Tensor | None = None,
    block_n: int = 32,
) -> None:
    """Each sequence's keys from starts[b] (0 without starts) to its context length, cut into
    num_splits splits of one length covering span keys; writes partial slots split_base.. of
    part_o [B, H, S, D] (float32) and part_lse [B, H, S] for reduce_partials_triton."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    group = num_heads // num_kv_heads
    split_len = triton.cdiv(triton.cdiv(max(span, 1), num_splits), block_n) * block_n
    _decode_partial_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, context_lens if starts is None else starts,
        part_o, part_lse, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        block_tables.stride(0), scale, split_len, split_base, part_lse.shape[2],
        GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        D_PAD=triton.next_power_of_2(head_dim), BLOCK_N=block_n, PAGE=block_size,
        PRECISION=dot_precision(q.dtype), HAS_START=starts is not None)


def reduce_partials_triton(part_o: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Merge every sequence's partial slots by log-sum-exp into out [B, H, D]."""
    batch, num_heads, num_splits, head_dim = part_o.shape
    _decode_reduce_kernel[(batch, num_heads)](
        part_o, part_lse, out, out.stride(0), out.stride(1), num_splits,
        HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim),
        S_PAD=max(2, triton.next_power_of_2(num_splits)))
    return out


def paged_decode_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, block_size: int, scale: float, max_context_len: int,
    num_splits: int | None = None, block_n: int = 32,
) -> torch.Tensor:
    """One query per sequence: q [B, H, D]. Split-K over the context, grouped-query heads packed
    into one program per KV head, then a log-sum-exp reduce over the splits."""
    batch, num_heads, head_dim = q.shape
    if num_splits is None:
        num_splits = decode_num_splits(batch, k_cache.shape[1], max_context_len, block_n)
    out = torch.empty_like(q)
    if batch == 0:
        return out
    part_o = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    decode_partials_triton(q, k_cache, v_cache, block_tables, context_lens, block_size, scale,
                           max_context_len, num_splits, part_o, part_lse, block_n=block_n)
    return reduce_partials_triton(part_o, part_lse, out)


# _extend_kernel's (block_m, block_n, num_warps, num_stages) candidates. 16-bit operands run on
# tensor cores with FlashAttention-2's tile sizes; the first call of each shape bucket on a GPU
# times them (kernels.autotune) and keeps the fastest. float32 (tests, the reference precision)
# takes smaller tiles, as they need twice the shared memory, on 8 warps: on 4 its exact (ieee)
# dot spills 640 bytes to the stack. Registers, spills and shared memory of each at the 8B shapes
# for sm_90: bench/compile_check.py (none spills).
EXTEND_CONFIGS = {
    2: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
    4: [(64, 32, 8, 2)],
}


def paged_extend_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: int, scale: float,
    max_query_len: int, block_m: int | None = None, block_n: int | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Any mix of prefills, extends (self-evaluation suffixes) and decodes: q [T, H, D].
    block_m: rows of a tile (query tokens x the query heads of one KV head); block_n: keys;
    unset, the fastest of EXTEND_CONFIGS for this shape (the first on the CPU interpreter).
    config: one (block_m, block_n, num_warps, num_stages) exactly (bench/compile_check.py)."""
    tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    batch = block_tables.shape[0]
    if tokens == 0 or batch == 0:
        return out
    group = num_heads // k_cache.shape[1]

    def launch(config: tuple[int, int, int, int]) -> torch.Tensor:
        bm, bn, num_warps, num_stages = config
        # Short queries (a suffix, a decode in a mixed step) take fewer rows than a full tile.
        bm = max(16, triton.next_power_of_2(group), min(bm, triton.next_power_of_2(max_query_len * group)))
        grid = (triton.cdiv(max_query_len, bm // group), batch, k_cache.shape[1])
        _extend_kernel[grid](
            q, k_cache, v_cache, block_tables, context_lens, query_start_loc, out,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
            block_tables.stride(0), scale,
            GROUP=group, HEAD_DIM=head_dim, D_PAD=triton.next_power_of_2(head_dim),
            BLOCK_M=bm, BLOCK_N=bn, PAGE=block_size, PRECISION=dot_precision(q.dtype),
            num_warps=num_warps, num_stages=num_stages)
        return out

    if config is not None:
        return launch(config)
    configs = EXTEND_CONFIGS[2 if q.dtype.itemsize == 2 else 4]
    if block_m or block_n:
        return launch((block_m or configs[0][0], block_n or configs[0][1], *configs[0][2:]))
    if len(configs) == 1 or not q.is_cuda:
        return launch(configs[0])
    key = ("extend_attention", q.dtype, num_heads, k_cache.shape[1], head_dim, block_size,
           autotune.bucket(max_query_len), autotune.bucket(tokens))
    by_name = {str(c): c for c in configs}
    runs = {name: (lambda c=c: launch(c)) for name, c in by_name.items()}
    return launch(by_name[autotune.fastest(key, runs, q.device)])


# A CPU step runs engine._cpu's attention on every row in one call (decodes and chunks alike: no
# plan, block gathers or masks; a chunk's rows 16 at a time, each over the keys up to its own
# position), unless its chunks come after long cached prefixes: there every row reads the whole
# prefix, as paged_attention_cpu's matmuls do at a better rate, while on a fresh prompt those
# matmuls compute the whole square under a causal mask and the kernel about the triangle.
# bench/cpu_attention.py (2-core Xeon, 8 query over 2 KV heads of 64, 2 threads, the committed run;
# torch with its plan made beforehand, as a step shares it over its layers): beside 60 decodes,
# chunks of 4 x 32 tokens took 0.64 ms here against 0.89, 4 x 128 1.33 against 1.80; one prompt
# of 512 2.46 against 2.97, of 1,024 10.1 against 11.5; 64 tokens after 1,000 cached (64,000
# prefix keys) 1.94 against 1.95. Past the bound: 64 after 4,000 (256,000) 8.7 against 5.0, 512
# after 2,048 22.4 against 16.4.
CPU_ROWS_MAX_PREFIX_KEYS = 64 * 1024


def count_prefix_keys(q_lens, context_lens) -> int:
    """Cached keys that a step's chunk rows (sequences with more than one query) read: each of a
    chunk's q rows over a context of c reads the c - q keys before the chunk. Numpy arrays or
    tensors, one entry a sequence."""
    if isinstance(q_lens, torch.Tensor):
        q, c = q_lens.long(), context_lens.long()
    else:
        q, c = np.asarray(q_lens, dtype=np.int64), np.asarray(context_lens, dtype=np.int64)
    return int((q * (c - q))[q > 1].sum())


def cpu_rows_attention(max_query_len: int, keys: int) -> bool:
    """Whether a CPU step's attention goes to engine._cpu for every row, given its prefix keys."""
    return max_query_len <= 1 or keys <= CPU_ROWS_MAX_PREFIX_KEYS


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: int, scale: float,
    max_query_len: int | None = None, max_context_len: int | None = None,
    cpu_plan: CpuAttentionPlan | None = None, prefix_keys: int | None = None,
) -> torch.Tensor:
    """The host-side maxima come from the runner's numpy metadata; without them they are read
    back from the device (a sync). cpu_plan: the step's plan for the path without Triton (None:
    engine._cpu's attention where cpu_rows_attention takes the step, given its count_prefix_keys
    as prefix_keys or counting them here)."""
    if not use_triton(q):
        if max_query_len is None:
            max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if q.shape[0] else 0
        # No plan: the step's rows may go to engine._cpu's one call, by the rule
        # LlamaForCausalLM.forward applies (a plan: the caller chose the torch path for the step)
        if cpu_plan is None:
            if max_query_len <= 1:
                keys = 0
            elif prefix_keys is not None:
                keys = prefix_keys
            else:
                keys = count_prefix_keys(query_start_loc[1:] - query_start_loc[:-1], context_lens)
            if cpu_rows_attention(max_query_len, keys):
                decodes = max_query_len == 1 and q.shape[0] == block_tables.shape[0]
                out = cpu_ops.paged_attention(q, k_cache, v_cache, block_tables, context_lens,
                                              None if decodes else query_start_loc, block_size, scale)
                if out is not None:
                    return out
        return paged_attention_cpu(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                                   block_size, scale, plan=cpu_plan)
    if max_query_len is None:
        max_query_len = int((query_start_loc[1:] - query_start_loc[:-1]).max()) if q.shape[0] else 0
    if max_query_len == 1 and q.shape[0] == block_tables.shape[0]:
        if max_context_len is None:
            max_context_len = int(context_lens.max())
        # Split-K Triton only: a CUDA kernel measured 4.3x slower on an H100 and was removed
        # (bench/results/gpu-h100-2026-11-24.md).
        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, context_lens, block_size,
                                             scale, max_context_len)
    return paged_extend_attention_triton(q, k_cache, v_cache, block_tables, context_lens,
                                         query_start_loc, block_size, scale, max_query_len)

