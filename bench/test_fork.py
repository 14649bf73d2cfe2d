"""Fork and rollback cost from Python at 16 and 32k tokens: integer work on block ids only.

    pytest bench/test_fork.py --benchmark-only --benchmark-json=bench/results/fork-cpu.json

Target (issue 2): both well under 50 us at 32k tokens; neither touches the KV cache.
"""

import pytest
from engine._core import BlockManager

BLOCK_SIZE = 16
SUFFIX = 20  # tokens of a self-evaluation suffix rolled back after scoring


@pytest.mark.parametrize("context", [16, 32768])
def test_fork(benchmark, context):
    bm = BlockManager(2 * 32768 // BLOCK_SIZE + 8, BLOCK_SIZE)
    bm.allocate(0, context)

    def setup():
        if 1 in bm:
            bm.free(1)

    benchmark.pedantic(bm.fork, args=(0, 1), setup=setup, rounds=2000, warmup_rounds=50)
    assert bm.num_free_blocks == bm.num_blocks - -(-context // BLOCK_SIZE)


@pytest.mark.parametrize("context", [16, 32768])
def test_rollback_after_suffix(benchmark, context):
    bm = BlockManager(32768 // BLOCK_SIZE + 8, BLOCK_SIZE)
    bm.allocate(0, context)
    free = bm.num_free_blocks

    def setup():
        bm.append(0, SUFFIX)

    benchmark.pedantic(bm.truncate, args=(0, context), setup=setup, rounds=2000, warmup_rounds=50)
    assert bm.length(0) == context and bm.num_free_blocks == free
