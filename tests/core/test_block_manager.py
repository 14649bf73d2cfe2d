"""BlockManager invariants under random operation sequences (hypothesis)."""

from collections import Counter

import numpy as np
import pytest
from engine._core import BlockManager
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.errors import OutOfBlocksError, SequenceIdError


class BlockManagerMachine(RuleBasedStateMachine):
    """Mirrors every sequence's length; checks ref counts, sharing and copy-on-write."""

    def __init__(self):
        super().__init__()
        self.block_size = 4
        self.bm = BlockManager(24, self.block_size)
        self.lengths: dict[int, int] = {}
        self.next_id = 0

    def _ids(self):
        return sorted(self.lengths)

    @rule(n=st.integers(0, 20))
    def allocate(self, n):
        free = self.bm.num_free_blocks
        try:
            slots = self.bm.allocate(self.next_id, n)
        except OutOfBlocksError:
            assert self.bm.num_free_blocks == free and self.next_id not in self.bm
            return
        assert len(slots) == n
        self.lengths[self.next_id] = n
        self.next_id += 1

    @precondition(lambda self: self.lengths)
    @rule(data=st.data(), n=st.integers(0, 9))
    def append(self, data, n):
        seq = data.draw(st.sampled_from(self._ids()))
        before = {s: self.bm.block_ids(s).copy() for s in self._ids()}
        free = self.bm.num_free_blocks
        try:
            slots, cow = self.bm.append(seq, n)
        except OutOfBlocksError:
            assert self.bm.num_free_blocks == free
            assert all((self.bm.block_ids(s) == b).all() for s, b in before.items())
            return
        # A shared block is never written: every written slot's block is owned by seq alone.
        written = set((slots // self.block_size).tolist())
        assert all(self.bm.ref_count(b) == 1 for b in written)
        # Only a partially filled last block is ever copied, at most once.
        assert len(cow) <= 1
        if len(cow):
            assert self.lengths[seq] % self.block_size != 0
            assert cow[0, 0] == before[seq][-1]
        # Other sequences' tables are untouched.
        assert all((self.bm.block_ids(s) == b).all() for s, b in before.items() if s != seq)
        expected = [self.bm.block_ids(seq)[p // self.block_size] * self.block_size + p % self.block_size
                    for p in range(self.lengths[seq], self.lengths[seq] + n)]
        assert slots.tolist() == expected
        self.lengths[seq] += n

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self._ids()))
        free = self.bm.num_free_blocks
        self.bm.fork(parent, self.next_id)
        assert self.bm.num_free_blocks == free  # no KV, no block taken
        assert (self.bm.block_ids(self.next_id) == self.bm.block_ids(parent)).all()
        self.lengths[self.next_id] = self.lengths[parent]
        self.next_id += 1

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(self._ids()))
        length = data.draw(st.integers(0, self.lengths[seq]))
        self.bm.truncate(seq, length)
        self.lengths[seq] = length

    @precondition(lambda self: self.lengths)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self._ids()))
        self.bm.free(seq)
        del self.lengths[seq]

    @precondition(lambda self: len(self.lengths) >= 2)
    @rule(data=st.data())
    def append_many(self, data):
        ids = data.draw(st.lists(st.sampled_from(self._ids()), min_size=1, max_size=4, unique=True))
        counts = data.draw(st.lists(st.integers(0, 6), min_size=len(ids), max_size=len(ids)))
        try:
            slots, _ = self.bm.append_many(ids, counts)
        except OutOfBlocksError:
            return
        assert len(set(slots.tolist())) == len(slots) == sum(counts)
        assert all(self.bm.ref_count(b) == 1 for b in set((slots // self.block_size).tolist()))
        for s, c in zip(ids, counts):
            self.lengths[s] += c

    @invariant()
    def ref_counts_equal_references(self):
        refs = Counter()
        for s in self._ids():
            blocks = self.bm.block_ids(s)
            assert len(blocks) == -(-self.lengths[s] // self.block_size)
            assert self.bm.length(s) == self.lengths[s]
            refs.update(blocks.tolist())
        for b in range(self.bm.num_blocks):
            assert self.bm.ref_count(b) == refs.get(b, 0)
        assert self.bm.num_free_blocks == self.bm.num_blocks - len(refs)

    @invariant()
    def blocks_needed_many_sums_each(self):
        for n in (1, 5):
            assert self.bm.blocks_needed_many(self._ids(), n) == sum(self.bm.blocks_needed(s, n)
                                                                     for s in self._ids())

    def teardown(self):
        for s in self._ids():
            self.bm.free(s)
        assert self.bm.num_free_blocks == self.bm.num_blocks  # every block comes back


TestBlockManagerMachine = BlockManagerMachine.TestCase
TestBlockManagerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_errors_are_clear_and_change_nothing():
    bm = BlockManager(4, 4)
    bm.allocate(1, 6)
    with pytest.raises(SequenceIdError, match="sequence 9"):
        bm.append(9, 1)
    with pytest.raises(SequenceIdError, match="already exists"):
        bm.allocate(1, 1)
    with pytest.raises(SequenceIdError, match="already exists"):
        bm.fork(1, 1)
    with pytest.raises(OutOfBlocksError, match="out of KV blocks"):
        bm.append(1, 100)
    with pytest.raises(ValueError, match="truncate"):
        bm.truncate(1, 7)
    assert bm.length(1) == 6 and bm.num_free_blocks == 2


def test_block_tables_are_packed_int32():
    bm = BlockManager(16, 2)
    bm.allocate(0, 5)
    bm.fork(0, 1)
    bm.append(1, 3)
    tables = bm.block_tables([0, 1])
    assert tables.dtype == np.int32 and tables.shape == (2, 4)
    assert tables[0, :3].tolist() == bm.block_ids(0).tolist() and tables[0, 3] == 0
    assert tables[1].tolist() == bm.block_ids(1).tolist()
    assert tables[0, :2].tolist() == tables[1, :2].tolist()  # shared full blocks
    assert tables[0, 2] != tables[1, 2]  # the partial last block was copied on write
