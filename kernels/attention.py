"""Paged attention over the block cache: decode (one query per sequence) and extend (a chunk of
new queries attending causally to the cached prefix plus themselves) in one op."""

import torch
import torch.nn.functional as F


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


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, query_start_loc: torch.Tensor, block_size: int, scale: float,
) -> torch.Tensor:
    return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, query_start_loc,
                               block_size, scale)
