"""Token-masked LoRA: y += scale * (x @ A^T) @ B^T on the rows whose mask is set (the
self-evaluation suffix), nothing on the others, so base tokens keep the base model's exact values."""

import torch

from kernels.dispatch import HAS_TRITON, use_triton


def lora_ref(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             scale: float, mask: torch.Tensor) -> torch.Tensor:
    """x [T, in]; y [T, out] updated in place and returned; lora_a [r, in]; lora_b [out, r];
    mask bool [T]."""
    rows = torch.nonzero(mask).flatten()
    if rows.numel():
        delta = (x[rows].float() @ lora_a.float().T) @ lora_b.float().T
        y[rows] = (y[rows].float() + scale * delta).to(y.dtype)
    return y


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _lora_shrink_kernel(x_ptr, a_ptr, mask_ptr, s_ptr, tokens, in_dim, rank, stride_x,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
                            PRECISION: tl.constexpr):
        """s [T, r] = x @ A^T for one tile of tokens; a tile with no masked token does no work."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        on = tl.load(mask_ptr + rows, mask=rows < tokens, other=0) != 0
        r = tl.arange(0, R_PAD)
        k_end = tl.where(tl.max(on.to(tl.int32), 0) > 0, in_dim, 0)
        acc = tl.zeros([BLOCK_M, R_PAD], tl.float32)
        for k0 in range(0, k_end, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + k[None, :],
                        mask=on[:, None] & (k[None, :] < in_dim), other=0.0)
            a = tl.load(a_ptr + r[None, :] * in_dim + k[:, None],
                        mask=(r[None, :] < rank) & (k[:, None] < in_dim), other=0.0)
            acc += tl.dot(x.to(a.dtype), a, input_precision=PRECISION)
        tl.store(s_ptr + rows[:, None] * R_PAD + r[None, :], acc, mask=on[:, None])

    @triton.jit
    def _lora_expand_kernel(s_ptr, b_ptr, mask_ptr, y_ptr, tokens, out_dim, rank, stride_y, scale,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr,
                            PRECISION: tl.constexpr):
        """y[masked rows] += scale * s @ B^T; unmasked rows are neither read nor written."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        on = tl.load(mask_ptr + rows, mask=rows < tokens, other=0) != 0
        if tl.max(on.to(tl.int32), 0) > 0:
            r = tl.arange(0, R_PAD)
            s = tl.load(s_ptr + rows[:, None] * R_PAD + r[None, :], mask=on[:, None], other=0.0)
            b = tl.load(b_ptr + cols[None, :] * rank + r[:, None],
                        mask=(cols[None, :] < out_dim) & (r[:, None] < rank), other=0.0)
            delta = tl.dot(s, b.to(tl.float32), input_precision=PRECISION)
            io = on[:, None] & (cols[None, :] < out_dim)
            ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :]
            y = tl.load(ptrs, mask=io, other=0.0).to(tl.float32)
            tl.store(ptrs, (y + scale * delta).to(y_ptr.dtype.element_ty), mask=io)


def lora_triton(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float, mask: torch.Tensor) -> torch.Tensor:
    tokens, in_dim = x.shape
    out_dim, rank = lora_b.shape
    if tokens == 0:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    assert y.stride(1) == 1, "lora_triton updates y in place: its rows must be contiguous"
    lora_a, lora_b = lora_a.contiguous(), lora_b.contiguous()
    r_pad = max(16, triton.next_power_of_2(rank))
    block_m = 16 if tokens <= 16 else 32
    shrunk = torch.empty(tokens, r_pad, dtype=torch.float32, device=x.device)
    mask = mask.to(torch.int8)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    _lora_shrink_kernel[(triton.cdiv(tokens, block_m),)](
        x, lora_a, mask, shrunk, tokens, in_dim, rank, x.stride(0),
        BLOCK_M=block_m, BLOCK_K=64, R_PAD=r_pad, PRECISION=precision)
    _lora_expand_kernel[(triton.cdiv(tokens, block_m), triton.cdiv(out_dim, 64))](
        shrunk, lora_b, mask, y, tokens, out_dim, rank, y.stride(0), scale,
        BLOCK_M=block_m, BLOCK_N=64, R_PAD=r_pad, PRECISION="ieee")
    return y


def lora(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
         scale: float, mask: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return lora_triton(x, y, lora_a, lora_b, scale, mask)
    return lora_ref(x, y, lora_a, lora_b, scale, mask)
