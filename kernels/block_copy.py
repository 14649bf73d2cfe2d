"""Copy-on-write block copies: a forked sequence's partial last block copied to a block of its own
before the step writes it, for every layer's K and V at once."""

import torch

from kernels import cpu_ops, cuda_ops


def copy_blocks_ref(kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
    """Copy-on-write: kv_cache [..., num_blocks, block_size, ...] viewed per block.

    kv_cache: [C, num_blocks, block_numel] (every layer's K and V as C caches);
    pairs: int [k, 2] of (src, dst) blocks. One gather and one scatter for all pairs.
    """
    if pairs.numel() == 0:
        return
    src, dst = pairs[:, 0].long(), pairs[:, 1].long()
    kv_cache[:, dst] = kv_cache[:, src]


def copy_blocks(kv_cache: torch.Tensor, pairs: torch.Tensor) -> None:
    """copy_blocks_ref's copy: the CUDA kernel on a GPU, engine._cpu's on the CPU, else the reference."""
    if pairs.numel() == 0:
        return
    if cuda_ops.available(kv_cache) and kv_cache.is_contiguous():
        cuda_ops.copy_blocks_cuda(kv_cache, pairs)
    elif not cpu_ops.copy_blocks(kv_cache, pairs):
        copy_blocks_ref(kv_cache, pairs)
