"""Python side of engine._cpu: a step's small ops on the CPU in one call each (float32):
RMSNorm, SiLU-and-mul, RoPE + the KV store, paged attention, the sampler's uniforms and the
copy-on-write block copy.
Each falls back to its torch path (returns None) where it does not apply: another dtype or device,
autograd (training), reference_only() or SELFEVAL_KERNELS=reference, or no engine._cpu. The
wrappers stay lean: at batch 1 their Python is most of what they cost (bench/host_overhead.py)."""

from __future__ import annotations

import functools
import importlib

import torch

from kernels.dispatch import references_forced

_F32 = torch.float32


@functools.cache
def extension():
    try:
        return importlib.import_module("engine._cpu")
    except ImportError:
        return None


def float32_inference(*tensors: torch.Tensor) -> bool:
    """A CPU fast path may take these: float32 CPU tensors, none needing a gradient (training
    keeps the torch references), and the references not forced."""
    if references_forced():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t.dtype is not _F32 or not t.is_cpu or (grad and t.requires_grad):
            return False
    return True


def available(*tensors: torch.Tensor) -> bool:
    """engine._cpu is built and may take these tensors (float32_inference)."""
    return extension() is not None and float32_inference(*tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None,
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """kernels.rms_norm's (normed, x + residual) for rows with unit column stride; None: not here."""
    if not available(x, weight) if residual is None else not available(x, weight, residual):
        return None
    if weight.shape != x.shape[-1:] or (residual is not None and residual.shape != x.shape):
        return None  # the torch path broadcasts or raises
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    r2 = residual if residual is None or residual.dim() == 2 else residual.reshape(x2.shape)
    if x2.stride(1) != 1 or weight.stride(0) != 1 or (r2 is not None and r2.stride(1) != 1):
        return None
    rows, cols = x2.shape
    out = torch.empty((rows, cols), dtype=_F32)
    if r2 is None:
        extension().rms_norm(x2.data_ptr(), 0, weight.data_ptr(), out.data_ptr(), 0, rows, cols,
                             x2.stride(0), 0, eps, False, torch.get_num_threads())
        return (out if x.dim() == 2 else out.view(x.shape)), x
    res_out = torch.empty((rows, cols), dtype=_F32)
    extension().rms_norm(x2.data_ptr(), r2.data_ptr(), weight.data_ptr(), out.data_ptr(), res_out.data_ptr(),
                         rows, cols, x2.stride(0), r2.stride(0), eps, True, torch.get_num_threads())
    if x.dim() == 2:
        return out, res_out
    return out.view(x.shape), res_out.view(x.shape)


def sampling_uniforms(row_keys: torch.Tensor, col_keys: torch.Tensor) -> torch.Tensor | None:
    """kernels.sampling's uniforms [R, V] float32 for int64 row keys [R] and column keys [V]
    (32-bit values), bit for bit; None: not here (no engine._cpu, references forced, or not
    contiguous int64 CPU tensors)."""
    ext = extension()
    if ext is None or references_forced():
        return None
    for t in (row_keys, col_keys):
        if t.dtype is not torch.int64 or not t.is_cpu or t.dim() != 1 or not t.is_contiguous():
            return None
    out = torch.empty((row_keys.shape[0], col_keys.shape[0]), dtype=_F32)
    ext.sampling_uniforms(row_keys.data_ptr(), col_keys.data_ptr(), out.data_ptr(), out.shape[0],
                          out.shape[1], torch.get_num_threads())
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor | None:
    """kernels.silu_and_mul for x [..., 2I] with unit column stride: [..., I]; None: not here."""
    if not available(x) or x.dim() == 0 or x.shape[-1] % 2:
        return None
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if x2.stride(1) != 1:
        return None
    rows, inter = x2.shape[0], x2.shape[1] // 2
    out = torch.empty((rows, inter), dtype=_F32)
    extension().silu_and_mul(x2.data_ptr(), out.data_ptr(), rows, inter, x2.stride(0),
                             torch.get_num_threads())
    return out if x.dim() == 2 else out.view(*x.shape[:-1], inter)


def rotary_store_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
                    cos_sin: torch.Tensor) -> torch.Tensor | None:
    """kernels.rotary_store_kv in one call: the rotated q [T, H, D]; None: not here. Positions and
    slots out of range raise IndexError before anything is written."""
    if not available(q, k, v, k_cache, v_cache, cos_sin):
        return None
    if q.dim() != 3 or k.dim() != 3 or k_cache.dim() != 3 or cos_sin.dim() != 2:
        return None
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    # every pointer and stride handed to C++ must stay inside its tensor: anything else goes to
    # the torch path, which raises or broadcasts as torch does
    if (dim % 2 or k.shape != (tokens, kv_heads, dim) or v.shape != k.shape
            or k_cache.shape != v_cache.shape or k_cache.shape[1:] != (kv_heads, dim)
            or cos_sin.shape[1] != dim or positions.shape != (tokens,) or slot_mapping.shape != (tokens,)):
        return None
    if (q.stride(2) != 1 or k.stride(2) != 1 or v.stride(2) != 1 or k_cache.stride(2) != 1
            or k_cache.stride() != v_cache.stride() or not cos_sin.is_contiguous()):
        return None
    if positions.dtype is not torch.int64 or not positions.is_contiguous():
        positions = positions.to(torch.int64).contiguous()
    if slot_mapping.dtype is not torch.int64 or not slot_mapping.is_contiguous():
        slot_mapping = slot_mapping.to(torch.int64).contiguous()
    out = torch.empty((tokens, heads, dim), dtype=_F32)
    q_s, k_s, v_s, c_s = q.stride(), k.stride(), v.stride(), k_cache.stride()
    extension().rotary_store_kv(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
        positions.data_ptr(), slot_mapping.data_ptr(), cos_sin.data_ptr(), cos_sin.shape[0], k_cache.shape[0],
        tokens, heads, kv_heads, dim, q_s[0], q_s[1], k_s[0], k_s[1], v_s[0], v_s[1], c_s[0], c_s[1])
    return out


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor,
                    query_start_loc: torch.Tensor | None, block_size: int, scale: float,
                    ) -> torch.Tensor | None:
    """kernels.paged_attention in one call over every query row and KV head: [T, H, D]; None: not
    here. query_start_loc None: one query per sequence (a step of decodes, row b's query is q[b]).
    Contexts past the block table, block ids outside the cache and query offsets that do not fit
    their contexts raise IndexError before anything is read. kernels.attention.cpu_rows_attention
    says when the torch path (paged_attention_cpu) is faster: chunks after long cached prefixes."""
    if not available(q, k_cache, v_cache):
        return None
    if q.dim() != 3 or k_cache.dim() != 3 or block_tables.dim() != 2 or context_lens.dim() != 1:
        return None
    tokens, heads, dim = q.shape
    seqs = block_tables.shape[0]
    if (k_cache.shape != v_cache.shape or k_cache.shape[2] != dim or not k_cache.shape[1]
            or heads % k_cache.shape[1] or context_lens.shape[0] != seqs or block_size < 1):
        return None
    if (block_tables.dtype is not torch.int32 or context_lens.dtype is not torch.int32
            or not block_tables.is_cpu or not context_lens.is_cpu):
        return None
    if (q.stride(2) != 1 or k_cache.stride(2) != 1 or k_cache.stride() != v_cache.stride()
            or block_tables.stride(1) != 1 or not context_lens.is_contiguous()):
        return None
    if query_start_loc is None:
        if tokens != seqs:
            return None
        qsl = 0
    else:
        if (query_start_loc.dtype is not torch.int32 or not query_start_loc.is_cpu
                or query_start_loc.shape != (seqs + 1,) or not query_start_loc.is_contiguous()):
            return None
        qsl = query_start_loc.data_ptr()
    out = torch.empty((tokens, heads, dim), dtype=_F32)
    q_s, c_s = q.stride(), k_cache.stride()
    extension().paged_attention(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(), block_tables.data_ptr(),
        context_lens.data_ptr(), qsl, seqs, tokens, heads, k_cache.shape[1], dim, block_size,
        k_cache.shape[0] // block_size, block_tables.shape[1], block_tables.stride(0), q_s[0], q_s[1],
        c_s[0], c_s[1], scale, torch.get_num_threads())
    return out


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                           scale: float) -> torch.Tensor | None:
    """paged_attention for a step of decodes only (row b's one query is q[b]): [B, H, D]; None:
    not here."""
    return paged_attention(q, k_cache, v_cache, block_tables, context_lens, None, block_size, scale)


def copy_blocks(kv_cache: torch.Tensor, pairs: torch.Tensor) -> bool:
    """kernels.copy_blocks_ref's copy in one call on one thread (any dtype): kv_cache [C, blocks,
    numel] contiguous, pairs int64 or int32 [k, 2] of (src, dst). False: not here (the caller copies).
    Block ids outside the cache raise IndexError before anything is copied."""
    if extension() is None or references_forced() or not kv_cache.is_cpu or not pairs.is_cpu:
        return False
    if pairs.dtype is torch.int32:  # the runner's (StepInput.cow)
        pairs = pairs.long()
    if (kv_cache.dim() != 3 or not kv_cache.is_contiguous() or pairs.dtype is not torch.int64
            or pairs.dim() != 2 or pairs.shape[1] != 2 or not pairs.is_contiguous()
            or (torch.is_grad_enabled() and kv_cache.requires_grad)):
        return False
    caches, blocks, numel = kv_cache.shape
    extension().copy_blocks(kv_cache.data_ptr(), caches, blocks, numel * kv_cache.element_size(),
                            pairs.data_ptr(), pairs.shape[0])
    return True
