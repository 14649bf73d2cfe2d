"""engine._cpu's copy-on-write block copy (kernels.cpu_ops.copy_blocks) against the torch reference
(copy_blocks_ref): the same cache after any pairs, whatever the dtype, sources read before any
block is written; ids outside the cache raise before anything is copied; what it cannot take goes
to the reference."""

import pytest
import torch

from kernels import cpu_ops
from kernels.block_copy import copy_blocks, copy_blocks_ref
from kernels.dispatch import reference_only

needs_cpu_ext = pytest.mark.skipif(cpu_ops.extension() is None, reason="engine._cpu is not built")


@needs_cpu_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_copy_matches_the_reference(dtype):
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(4, 20, 96, generator=g).to(dtype)
    # a source that is also another pair's destination: every source is read first, as the reference
    pairs = torch.tensor([[1, 7], [7, 3], [2, 19], [0, 5]])
    expect = cache.clone()
    copy_blocks_ref(expect, pairs)
    assert cpu_ops.copy_blocks(cache, pairs)
    assert torch.equal(cache, expect)


@needs_cpu_ext
def test_ids_outside_the_cache_raise_before_any_copy():
    cache = torch.randn(2, 6, 8)
    before = cache.clone()
    for bad in ([[1, 2], [3, 6]], [[1, 2], [-1, 4]]):
        with pytest.raises(IndexError, match="outside the cache"):
            cpu_ops.copy_blocks(cache, torch.tensor(bad))
        assert torch.equal(cache, before)


@needs_cpu_ext
def test_what_it_cannot_take_goes_to_the_reference():
    cache, pairs = torch.randn(2, 6, 8), torch.tensor([[1, 2]])
    assert not cpu_ops.copy_blocks(cache.transpose(0, 1), pairs)  # not contiguous
    assert not cpu_ops.copy_blocks(cache, pairs.double())
    assert not cpu_ops.copy_blocks(cache[0], pairs)
    with reference_only():
        assert not cpu_ops.copy_blocks(cache, pairs)
    expect = cache.clone()
    copy_blocks_ref(expect, pairs)
    copy_blocks(cache, pairs.double())  # through the dispatcher: the reference
    assert torch.equal(cache, expect)
    # the runner's int32 pairs take the C++ copy
    cache2 = torch.randn(2, 6, 8)
    expect2 = cache2.clone()
    copy_blocks_ref(expect2, pairs)
    assert cpu_ops.copy_blocks(cache2, pairs.int()) and torch.equal(cache2, expect2)
