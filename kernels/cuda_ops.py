"""Python side of engine._cuda: raw device pointers, strides and torch's current stream.
engine._cuda is built only where a CUDA toolkit was found; without it these report unavailable."""

from __future__ import annotations

import functools
import importlib

import torch

from kernels.dispatch import use_triton


@functools.cache
def extension():
    try:
        return importlib.import_module("engine._cuda")
    except ImportError:
        return None


def available(t: torch.Tensor) -> bool:
    # use_triton: reference_only() and SELFEVAL_KERNELS=reference turn our CUDA kernels off too.
    return t.is_cuda and use_triton(t) and extension() is not None


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def copy_blocks_cuda(kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
    """kv_cache [C, num_blocks, block_numel] contiguous; pairs int [k, 2] on the device."""
    num_caches, num_blocks, block_numel = kv_cache.shape
    if pairs.numel() == 0:
        return
    cache_bytes = num_blocks * block_numel * kv_cache.element_size()
    bases = kv_cache.data_ptr() + cache_bytes * torch.arange(num_caches, dtype=torch.int64)
    bases = bases.to(kv_cache.device, non_blocking=True)
    pairs = pairs.to(torch.int32).contiguous()
    extension().copy_blocks(bases.data_ptr(), num_caches, block_numel * kv_cache.element_size(),
                            pairs.data_ptr(), pairs.shape[0], _stream(kv_cache))


def store_kv_cuda(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    tokens, heads, dim = k.shape
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise ValueError("store_kv_cuda copies raw rows: k/v must have the cache's dtype")
    for t in (k, v):
        if t.stride(2) != 1 or t.stride(1) != dim:
            raise ValueError("store_kv_cuda needs each token's heads x dim contiguous")
    elem = k.element_size()
    extension().store_kv(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                         slot_mapping.to(torch.int64).data_ptr(), tokens, k.stride(0) * elem,
                         v.stride(0) * elem, heads * dim * elem, _stream(k))
