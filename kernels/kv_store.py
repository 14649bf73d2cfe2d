import torch

from kernels import autotune, cpu_ops, cuda_ops
from kernels.dispatch import HAS_TRITON, use_triton
from kernels.rotary import apply_rotary


def store_kv_ref(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v [T, Hkv, D] into caches [num_slots, Hkv, D] at slot_mapping [T]."""
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, k_stride, v_stride, row_numel,
                         BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = i < row_numel
        slot = tl.load(slot_ptr + t).to(tl.int64)
        k = tl.load(k_ptr + t * k_stride + i, mask=mask)
        v = tl.load(v_ptr + t * v_stride + i, mask=mask)
        tl.store(kc_ptr + slot * row_numel + i, k.to(kc_ptr.dtype.element_ty), mask=mask)
        tl.store(vc_ptr + slot * row_numel + i, v.to(vc_ptr.dtype.element_ty), mask=mask)


def store_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    tokens, heads, dim = k.shape
    # Each token's heads x dim must be one contiguous run (true of views split off a fused qkv).
    if k.stride(2) != 1 or k.stride(1) != dim:
        k = k.contiguous()
    if v.stride(2) != 1 or v.stride(1) != dim:
        v = v.contiguous()
    row = heads * dim
    block = min(1024, triton.next_power_of_2(row))
    if tokens:
        _store_kv_kernel[(tokens, triton.cdiv(row, block))](
            k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0), row, BLOCK=block)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if cuda_ops.available(k) and k.dtype == k_cache.dtype:
        key = ("store_kv", k.dtype, k.shape[1] * k.shape[2], autotune.bucket(k.shape[0]))
        runs = {"triton": lambda: store_kv_triton(k, v, k_cache, v_cache, slot_mapping),
                "cuda": lambda: cuda_ops.store_kv_cuda(k, v, k_cache, v_cache, slot_mapping)}
        runs[autotune.fastest(key, runs, k.device)]()
    elif use_triton(k):
        store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    else:
        store_kv_ref(k, v, k_cache, v_cache, slot_mapping)


def rotary_store_kv_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """RoPE on q and k, then k (rotated) and v into the cache: returns the rotated q [T, H, D].
    rows: the step's rotary_rows (see apply_rotary)."""
    q, k = apply_rotary(q, k, positions, cos_sin, rows)
    store_kv(k, v, k_cache, v_cache, slot_mapping)
    return q


if HAS_TRITON:

    @triton.jit
    def _rotary_store_kv_kernel(
        q_ptr, k_ptr, v_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr, slot_ptr, cs_ptr,
        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
        num_heads, num_kv_heads, q_blocks,
        HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_H: tl.constexpr,
    ):
        """One (token, block of heads). The first q_blocks programs of a token rotate BLOCK_H query
        heads into qo; the rest rotate BLOCK_H key heads straight into the token's cache slot and
        copy the same value heads: the rotated keys never make a round trip through memory."""
        t = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        i = tl.arange(0, HALF_PAD)
        i_mask = i < HALF
        pos = tl.load(pos_ptr + t)
        # The table is float32; the reference rounds cos/sin to the activations' dtype first.
        cos = tl.load(cs_ptr + pos * 2 * HALF + i, mask=i_mask, other=0.0)[None, :]
        sin = tl.load(cs_ptr + pos * 2 * HALF + HALF + i, mask=i_mask, other=0.0)[None, :]
        if j < q_blocks:
            h = j * BLOCK_H + tl.arange(0, BLOCK_H)
            m = (h < num_heads)[:, None] & i_mask[None, :]
            src = q_ptr + t * stride_qt + h[:, None] * stride_qh + i[None, :]
            x1 = tl.load(src, mask=m, other=0.0)
            x2 = tl.load(src + HALF, mask=m, other=0.0)
            c, s = cos.to(x1.dtype).to(tl.float32), sin.to(x1.dtype).to(tl.float32)
            a, b = x1.to(tl.float32), x2.to(tl.float32)
            dst = qo_ptr + (t * num_heads + h[:, None]) * 2 * HALF + i[None, :]
            tl.store(dst, (a * c - b * s).to(qo_ptr.dtype.element_ty), mask=m)
            tl.store(dst + HALF, (b * c + a * s).to(qo_ptr.dtype.element_ty), mask=m)
        else:
            h = (j - q_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
            m = (h < num_kv_heads)[:, None] & i_mask[None, :]
            slot = tl.load(slot_ptr + t).to(tl.int64)
            ksrc = k_ptr + t * stride_kt + h[:, None] * stride_kh + i[None, :]
            x1 = tl.load(ksrc, mask=m, other=0.0)
            x2 = tl.load(ksrc + HALF, mask=m, other=0.0)
            c, s = cos.to(x1.dtype).to(tl.float32), sin.to(x1.dtype).to(tl.float32)
            a, b = x1.to(tl.float32), x2.to(tl.float32)
            off = slot * stride_cs + h[:, None] * stride_ch + i[None, :]
            # rounded to k's dtype first, as the rotary kernel's output is before store_kv casts it
            tl.store(kc_ptr + off, (a * c - b * s).to(x1.dtype).to(kc_ptr.dtype.element_ty), mask=m)
            tl.store(kc_ptr + off + HALF, (b * c + a * s).to(x1.dtype).to(kc_ptr.dtype.element_ty),
                     mask=m)
            vsrc = v_ptr + t * stride_vt + h[:, None] * stride_vh + i[None, :]
            tl.store(vc_ptr + off, tl.load(vsrc, mask=m).to(vc_ptr.dtype.element_ty), mask=m)
            tl.store(vc_ptr + off + HALF, tl.load(vsrc + HALF, mask=m).to(vc_ptr.dtype.element_ty), mask=m)


def rotary_store_kv_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
) -> torch.Tensor:
    """One launch for apply_rotary + store_kv: q, k, v [T, heads, D] may be strided views (of a
    fused qkv projection) with unit stride along D; the caches [slots, Hkv, D] likewise."""
    tokens, num_heads, dim = q.shape
    num_kv_heads = k.shape[1]
    q, k, v = (x if x.stride(2) == 1 else x.contiguous() for x in (q, k, v))
    if k_cache.stride(2) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("rotary_store_kv_triton needs unit-stride head dims and like caches")
    out = torch.empty((tokens, num_heads, dim), dtype=q.dtype, device=q.device)
    if tokens:
        half = dim // 2
        block_h = max(1, min(triton.next_power_of_2(max(num_heads, num_kv_heads)), 4096 // dim))
        q_blocks = triton.cdiv(num_heads, block_h)
        cos_sin = cos_sin.contiguous()

        def launch(num_warps: int) -> None:
            _rotary_store_kv_kernel[(tokens, q_blocks + triton.cdiv(num_kv_heads, block_h))](
                q, k, v, out, k_cache, v_cache, positions, slot_mapping, cos_sin,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                k_cache.stride(0), k_cache.stride(1), num_heads, num_kv_heads, q_blocks,
                HALF=half, HALF_PAD=triton.next_power_of_2(half), BLOCK_H=block_h, num_warps=num_warps)

        key = ("rotary_store_kv_warps", q.dtype, num_heads, num_kv_heads, dim, autotune.bucket(tokens))
        autotune.launch_warps(key, launch, q.device, (4, 8))
    return out


def rotary_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """RoPE on q and k and the cache write of k and v, fused on the Triton path; on a GPU the first
    call of each shape bucket times the fused kernel against rotary + the autotuned store_kv."""
    if not use_triton(q):
        fused = cpu_ops.rotary_store_kv(q, k, v, k_cache, v_cache, slot_mapping, positions, cos_sin)
        if fused is not None:  # float32 on the CPU: one call instead of ~14 ops
            return fused
        return rotary_store_kv_ref(q, k, v, k_cache, v_cache, slot_mapping, positions, cos_sin, rows)
    fused = lambda: rotary_store_kv_triton(q, k, v, k_cache, v_cache, slot_mapping, positions, cos_sin)  # noqa: E731
    if not q.is_cuda:
        return fused()
    if k_cache.stride(2) != 1 or k_cache.stride() != v_cache.stride():  # the fused kernel's layout
        return rotary_store_kv_ref(q, k, v, k_cache, v_cache, slot_mapping, positions, cos_sin, rows)
    # the unfused pair (rotary kernel, then the autotuned store_kv) is the reference composition
    separate = lambda: rotary_store_kv_ref(q, k, v, k_cache, v_cache, slot_mapping, positions, cos_sin)  # noqa: E731
    key = ("rotary_store_kv", q.dtype, k_cache.dtype, q.shape[1], k.shape[1], q.shape[2],
           autotune.bucket(q.shape[0]))
    winner = autotune.fastest(key, {"fused": fused, "separate": separate}, q.device)
    return fused() if winner == "fused" else separate()
