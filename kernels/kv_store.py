import torch

from kernels import autotune, cuda_ops
from kernels.dispatch import HAS_TRITON, use_triton


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
