"""Token-masked LoRA: y += scale * (x @ A^T) @ B^T on the rows whose mask is set (the
self-evaluation suffix), nothing on the others, so base tokens keep the base model's exact values."""

import torch

from kernels.cpu_ops import float32_inference
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


def lora_cpu(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
             scale: float, mask: torch.Tensor) -> torch.Tensor:
    """lora_ref's bits with less work, for float32 on the CPU (cpu_ops.float32_inference): the scaled
    delta goes into y's masked rows with one index_add_ (all rows: one add_), not a gather of
    those rows, an add and a scatter back: 2-4x faster on suffix-like masks timed alone, and
    selfeval demo 25.5 s against 28.0 s with lora_ref (cProfile had put 15% of the demo in it)."""
    rows = torch.nonzero(mask).flatten()
    n = rows.numel()
    if n:
        every = n == x.shape[0]
        # Rows in row-major order either way, as lora_ref's gathered copy: a transposed x gives
        # the matmul other bits.
        delta = ((x.contiguous() if every else x.index_select(0, rows)) @ lora_a.T) @ lora_b.T
        delta.mul_(scale)  # rounded before the add, as lora_ref rounds it (add_'s alpha would fuse)
        if every:
            y.add_(delta)
        else:
            y.index_add_(0, rows, delta)
    return y


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _chunk_of_tile(mask_ptr, tokens, tile, BLOCK_M: tl.constexpr, CHUNK: tl.constexpr):
        """Tile t holds the (t % (CHUNK / BLOCK_M))-th BLOCK_M masked rows of mask chunk
        t // (CHUNK / BLOCK_M): (the chunk's mask as 0/1, its first row, the tile's first slot
        among the chunk's masked rows, how many masked rows the chunk has)."""
        start = (tile // (CHUNK // BLOCK_M)) * CHUNK
        i = start + tl.arange(0, CHUNK)
        on = (tl.load(mask_ptr + i, mask=i < tokens, other=0) != 0).to(tl.int32)
        return on, start, (tile % (CHUNK // BLOCK_M)) * BLOCK_M, tl.sum(on, 0)

    @triton.jit
    def _gather_rows(on, start, first, count, BLOCK_M: tl.constexpr):
        """The rows of the tile's slots first .. first + BLOCK_M - 1, in row order, and which slots
        hold a row: the masked row of slot j is the one with j masked rows before it, so its offset
        in the chunk is the number of rows whose inclusive count is <= j (a compare, not a scan)."""
        slot = first + tl.arange(0, BLOCK_M)
        upto = tl.cumsum(on, 0)
        rows = start + tl.sum((upto[:, None] <= slot[None, :]).to(tl.int32), 0)
        return rows, slot < count

    @triton.jit
    def _lora_shrink_kernel(x_ptr, a_ptr, mask_ptr, part_ptr, tokens, in_dim, rank, k_chunk,
                            stride_xm, stride_xk,
                            BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, BLOCK_K: tl.constexpr,
                            R_PAD: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """part[split, tile slots] = x[tile rows, split's K range] @ A^T: one program per (K split,
        tile of gathered masked rows); a tile past its chunk's masked rows returns at once."""
        split = tl.program_id(0)
        tile = tl.num_programs(1) - 1 - tl.program_id(1)  # the suffix is last: launch it first
        on, start, first, count = _chunk_of_tile(mask_ptr, tokens, tile, BLOCK_M, CHUNK)
        if first >= count:
            return
        rows, valid = _gather_rows(on, start, first, count, BLOCK_M)
        r = tl.arange(0, R_PAD)
        k_lo = split * k_chunk
        k_hi = tl.minimum(k_lo + k_chunk, in_dim)
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_xm
        acc = tl.zeros([BLOCK_M, R_PAD], tl.float32)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_rows + k[None, :] * stride_xk, mask=valid[:, None] & (k[None, :] < k_hi),
                        other=0.0)
            a = tl.load(a_ptr + r[None, :] * in_dim + k[:, None],
                        mask=(r[None, :] < rank) & (k[:, None] < k_hi), other=0.0)
            if UPCAST:  # x and A of different dtypes: multiply in float32
                x, a = x.to(tl.float32), a.to(tl.float32)
            acc += tl.dot(x, a, input_precision=PRECISION)
        slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(part_ptr + (split * tl.num_programs(1) * BLOCK_M + slots[:, None]) * R_PAD + r[None, :],
                 acc)

    @triton.jit
    def _lora_expand_kernel(part_ptr, b_ptr, mask_ptr, y_ptr, tokens, out_dim, rank, scale,
                            stride_ym, stride_yn,
                            BLOCK_M: tl.constexpr, CHUNK: tl.constexpr, BLOCK_N: tl.constexpr,
                            GROUP_N: tl.constexpr, R_PAD: tl.constexpr, SPLITS: tl.constexpr,
                            PRECISION: tl.constexpr):
        """y[tile rows, GROUP_N columns] += scale * s @ B^T, s the sum of the tile's K-split
        partials (in split order: deterministic); rows off the mask are neither read nor written."""
        group = tl.program_id(0)
        tile = tl.num_programs(1) - 1 - tl.program_id(1)
        on, start, first, count = _chunk_of_tile(mask_ptr, tokens, tile, BLOCK_M, CHUNK)
        if first >= count:
            return
        rows, valid = _gather_rows(on, start, first, count, BLOCK_M)
        r = tl.arange(0, R_PAD)
        slots = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        s = tl.zeros([BLOCK_M, R_PAD], tl.float32)
        for split in tl.static_range(SPLITS):
            s += tl.load(part_ptr + (split * tl.num_programs(1) * BLOCK_M + slots[:, None]) * R_PAD
                         + r[None, :])
        s *= scale
        y_rows = y_ptr + rows[:, None].to(tl.int64) * stride_ym
        for n0 in range(0, GROUP_N, BLOCK_N):
            cols = group * GROUP_N + n0 + tl.arange(0, BLOCK_N)
            b = tl.load(b_ptr + cols[None, :] * rank + r[:, None],
                        mask=(cols[None, :] < out_dim) & (r[:, None] < rank), other=0.0)
            delta = tl.dot(s, b.to(tl.float32), input_precision=PRECISION)
            io = valid[:, None] & (cols[None, :] < out_dim)
            ptrs = y_rows + cols[None, :] * stride_yn
            y = tl.load(ptrs, mask=io, other=0.0).to(tl.float32)
            tl.store(ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=io)


MAX_SPLITS = 8  # K splits of the shrink: few masked rows over a long in_dim need them to fill the GPU


def lora_triton(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float, mask: torch.Tensor) -> torch.Tensor:
    """lora_ref on the masked rows only, gathered (SGMV-style): no host sync (no .item(), no
    nonzero), so it runs inside a CUDA graph. The tokens are cut into chunks of CHUNK rows; each
    chunk's masked rows are compacted in registers by the programs that use them and taken
    BLOCK_M at a time, so a program works on real masked rows only and tiles past a chunk's
    masked rows return at once (the grid is sized by T; which tiles work is decided on device).
    Shrink: (K splits x tiles) programs each write x[rows, K part] @ A^T to their own float32
    partial; expand: (column groups x tiles) programs sum a tile's partials in a fixed order (no
    atomics, no zeroed buffer, deterministic) and add scale * s @ B^T into the gathered y rows.
    Two launches and nothing else; y may be any strided view (a column slice of a fused qkv)."""
    tokens, in_dim = x.shape
    out_dim, rank = lora_b.shape
    if mask.shape != (tokens,) or y.shape != (tokens, out_dim) or lora_a.shape != (rank, in_dim):
        raise ValueError(f"lora_triton: x {tuple(x.shape)}, y {tuple(y.shape)}, A {tuple(lora_a.shape)}, "
                         f"B {tuple(lora_b.shape)}, mask {tuple(mask.shape)} do not fit together")
    if tokens == 0 or out_dim == 0:
        return y
    lora_a, lora_b, mask = lora_a.contiguous(), lora_b.contiguous(), mask.contiguous()
    if mask.dtype == torch.bool:
        mask = mask.view(torch.uint8)  # a view, not a conversion kernel
    r_pad = max(16, triton.next_power_of_2(rank))
    block_m = min(64, max(16, triton.next_power_of_2(tokens)))
    # A chunk of 512 rows packs a scattered 1/8 of masked rows into about one full tile.
    chunk = min(512, max(block_m, triton.next_power_of_2(tokens)))
    tiles = triton.cdiv(tokens, chunk) * (chunk // block_m)
    upcast = x.dtype != lora_a.dtype
    fp32_dot = upcast or x.dtype == torch.float32
    block_k = 64 if fp32_dot else 128  # sm_90: 128 float32 columns take 172 registers, 64 take 93
    k_chunk = triton.cdiv(triton.cdiv(max(in_dim, 1), MAX_SPLITS), block_k) * block_k
    splits = triton.cdiv(max(in_dim, 1), k_chunk)
    block_n = min(128, max(16, triton.next_power_of_2(out_dim)))
    group_n = min(4, triton.cdiv(out_dim, block_n)) * block_n  # columns per expand program
    partial = torch.empty(splits, tiles * block_m, r_pad, dtype=torch.float32, device=x.device)
    _lora_shrink_kernel[(splits, tiles)](
        x, lora_a, mask, partial, tokens, in_dim, rank, k_chunk, x.stride(0), x.stride(1),
        BLOCK_M=block_m, CHUNK=chunk, BLOCK_K=block_k, R_PAD=r_pad, UPCAST=upcast,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32")
    # 8 warps: on sm_90 a 64 x 128 tile takes 158 registers on 4 warps, 90 on 8.
    _lora_expand_kernel[(triton.cdiv(out_dim, group_n), tiles)](
        partial, lora_b, mask, y, tokens, out_dim, rank, scale, y.stride(0), y.stride(1),
        BLOCK_M=block_m, CHUNK=chunk, BLOCK_N=block_n, GROUP_N=group_n, R_PAD=r_pad, SPLITS=splits,
        PRECISION="ieee" if y.dtype == torch.float32 else "tf32", num_warps=8)
    return y


def lora(x: torch.Tensor, y: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
         scale: float, mask: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return lora_triton(x, y, lora_a, lora_b, scale, mask)
    if float32_inference(x, y, lora_a, lora_b) and mask.dim() == 1 and mask.shape[0] == x.shape[0]:
        return lora_cpu(x, y, lora_a, lora_b, scale, mask)
    return lora_ref(x, y, lora_a, lora_b, scale, mask)
