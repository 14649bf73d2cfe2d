import torch

from kernels.dispatch import HAS_TRITON, use_triton


def rotary_cache(inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0) -> torch.Tensor:
    """[max_positions, head_dim] table of cos (first half) and sin (second half), float32."""
    t = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq.float())
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


def apply_rotary_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE (Llama convention). q: [T, H, D], k: [T, Hkv, D], positions: [T]."""
    cos, sin = cos_sin[positions].chunk(2, dim=-1)  # [T, D/2] each
    cos = torch.cat([cos, cos], dim=-1).unsqueeze(1).to(q.dtype)
    sin = torch.cat([sin, sin], dim=-1).unsqueeze(1).to(q.dtype)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    return rotate(q), rotate(k)




if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rotary_kernel(x_ptr, out_ptr, pos_ptr, cs_ptr, stride_t, stride_h, num_heads, half,
                       BLOCK: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1)
        i = tl.arange(0, BLOCK)
        mask = i < half
        pos = tl.load(pos_ptr + t)
        # The table is float32; the reference rounds cos/sin to the activations' dtype first.
        cos = tl.load(cs_ptr + pos * 2 * half + i, mask=mask, other=0.0)
        sin = tl.load(cs_ptr + pos * 2 * half + half + i, mask=mask, other=0.0)
        src = x_ptr + t * stride_t + h * stride_h
        x1 = tl.load(src + i, mask=mask, other=0.0)
        x2 = tl.load(src + half + i, mask=mask, other=0.0)
        cos = cos.to(x1.dtype).to(tl.float32)
        sin = sin.to(x1.dtype).to(tl.float32)
        a, b = x1.to(tl.float32), x2.to(tl.float32)
        dst = out_ptr + (t * num_heads + h) * 2 * half
        tl.store(dst + i, (a * cos - b * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + half + i, (b * cos + a * sin).to(out_ptr.dtype.element_ty), mask=mask)


def _rotate_triton(x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    if x.stride(-1) != 1:
        x = x.contiguous()
    tokens, heads, dim = x.shape
    out = torch.empty((tokens, heads, dim), dtype=x.dtype, device=x.device)
    if tokens:
        _rotary_kernel[(tokens, heads)](x, out, positions, cos_sin, x.stride(0), x.stride(1), heads,
                                        dim // 2, BLOCK=triton.next_power_of_2(dim // 2))
    return out


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    cos_sin = cos_sin.contiguous()
    return _rotate_triton(q, positions, cos_sin), _rotate_triton(k, positions, cos_sin)


def rotary_rows(positions: torch.Tensor, cos_sin: torch.Tensor, dtype: torch.dtype,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-width cos and sin [T, 1, D] of each position, in dtype: what every layer of a step
    shares (the path without Triton gathers them once a step instead of once a layer)."""
    cos, sin = cos_sin[positions].chunk(2, dim=-1)
    return (torch.cat([cos, cos], dim=-1).unsqueeze(1).to(dtype),
            torch.cat([sin, sin], dim=-1).unsqueeze(1).to(dtype))


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: this step's rotary_rows, when the caller gathered them once (ignored by Triton)."""
    if use_triton(q):
        return apply_rotary_triton(q, k, positions, cos_sin)
    if rows is None:
        return apply_rotary_ref(q, k, positions, cos_sin)
    cos, sin = rows

    def rotate(x: torch.Tensor) -> torch.Tensor:  # apply_rotary_ref's math
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    return rotate(q), rotate(k)
