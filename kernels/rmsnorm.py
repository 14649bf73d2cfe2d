import torch

from kernels import autotune, cpu_ops
from kernels.dispatch import HAS_TRITON, use_triton


def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of (x + residual) as transformers computes it (float32 statistics).

    Returns (normed, new_residual) where new_residual = x + residual (or x without one).
    """
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), x


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, x_stride,
                         res_stride, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 on big batches
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = x + tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)
            tl.store(res_out_ptr + row * n_cols + cols, x, mask=mask)
        h = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = w.to(tl.float32) * (h * rstd).to(x.dtype).to(tl.float32)
        tl.store(out_ptr + row * n_cols + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n_rows, n_cols = x2.shape
    out = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)
    if residual is not None:
        r2 = residual.reshape(-1, n_cols).contiguous()
        res_out = torch.empty_like(x2, memory_format=torch.contiguous_format)
    else:
        r2, res_out = x2, x2
    if n_rows:
        def launch(num_warps: int) -> None:
            _rms_norm_kernel[(n_rows,)](x2, r2, weight, out, res_out, n_cols, x2.stride(0), r2.stride(0),
                                        eps, HAS_RESIDUAL=residual is not None,
                                        BLOCK=triton.next_power_of_2(n_cols), num_warps=num_warps)

        key = ("rms_norm", x.dtype, n_cols, residual is not None, autotune.bucket(n_rows))
        autotune.launch_warps(key, launch, x.device)
    new_res = res_out.view(shape) if residual is not None else x
    return out.view(shape), new_res


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(x):
        return rms_norm_triton(x, weight, eps, residual)
    fused = cpu_ops.rms_norm(x, weight, eps, residual)  # one call instead of five ops (float32)
    if fused is not None:
        return fused
    if x.dtype == weight.dtype == torch.float32:  # the reference's math in fewer passes (1.5x at 2k rows)
        if residual is not None:
            x = x + residual
        return torch.mul(x, torch.rsqrt(torch.mean(x * x, -1, keepdim=True).add_(eps))).mul_(weight), x
    return rms_norm_ref(x, weight, eps, residual)
