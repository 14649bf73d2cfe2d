"""Prefix caching in the block manager under random operation sequences (hypothesis), against a
model of the KV content (every slot holds the token written there) and of the LRU: a cache hit
always holds exactly the tokens asked for, even when a narrowed hash makes every block collide;
evictable blocks leave in least-recently-freed order and only when no uncached block is free.
Transactions: rollback() restores every observable of the block manager as it was at begin()
(a block written in place during it may only leave the cache), while the KV written meanwhile
stays, as it does in the engine."""

from collections import Counter

import pytest
from engine._core import BlockManager
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.errors import OutOfBlocksError

BS = 2
TOKENS = st.lists(st.integers(1, 3), min_size=1, max_size=9)  # few values: prefixes repeat


class PrefixCacheMachine(RuleBasedStateMachine):
    hash_mask = (1 << 64) - 1

    def __init__(self):
        super().__init__()
        self.bm = BlockManager(14, BS, self.hash_mask)
        self.kv: dict[int, int] = {}  # slot -> token the slot holds
        self.seqs: dict[int, list[int]] = {}
        self.next_id = 0
        self.clock = 0
        self.freed_at: dict[int, int] = {}  # evictable block -> when it was freed
        self.txn = None  # (observed state, sequences, freed_at) at begin()

    # ---- helpers ----------------------------------------------------------------------
    def _ids(self):
        return sorted(self.seqs)

    def _write(self, seq, slots, cow, tokens):
        for src, dst in cow.tolist():  # copy-on-write runs before the new tokens land
            for o in range(BS):
                if src * BS + o in self.kv:
                    self.kv[dst * BS + o] = self.kv[src * BS + o]
        for slot, t in zip(slots.tolist(), tokens):
            assert self.bm.ref_count(slot // BS) == 1, "a shared block was written"
            self.kv[slot] = t

    def _append(self, seq, tokens):
        """Append and write; checks that evictions take the least recently freed blocks."""
        lru, free = self._lru(), self.bm.num_free_blocks
        uncached_free = free - self.bm.num_evictable_blocks
        slots, cow = self.bm.append(seq, len(tokens))
        gone = [b for b in lru if b not in set(self._lru())]
        assert gone == lru[:len(gone)], "evicted out of LRU order"
        taken = free - self.bm.num_free_blocks
        assert len(gone) == max(taken - uncached_free, 0), "evicted while uncached blocks were free"
        self._write(seq, slots, cow, tokens)
        self.seqs[seq] = self.seqs[seq] + list(tokens)

    def _lru(self):
        return self.bm.evictable_blocks().tolist()

    def _register(self, seq):
        done = self.bm.num_hashed_tokens(seq)
        full = len(self.seqs[seq]) // BS * BS
        self.bm.cache_blocks(seq, self.seqs[seq][done:full])

    def _observe(self):
        bm = self.bm
        return {
            "seqs": {s: (bm.block_ids(s).tolist(), bm.length(s), bm.num_hashed_tokens(s))
                     for s in bm.sequence_ids()},
            "refs": [bm.ref_count(b) for b in range(bm.num_blocks)],
            "free": bm.num_free_blocks,
            "lru": self._lru(),
            "cached": {b for b in range(bm.num_blocks) if bm.is_cached(b)},
        }

    # ---- rules ------------------------------------------------------------------------
    @precondition(lambda self: self.txn is None)
    @rule()
    def begin(self):
        self.bm.begin()
        self.txn = (self._observe(), {k: list(v) for k, v in self.seqs.items()}, dict(self.freed_at))

    @precondition(lambda self: self.txn is not None)
    @rule(keep=st.booleans())
    def end(self, keep):
        before, seqs, freed_at = self.txn
        self.txn = None
        if keep:
            self.bm.commit()
            return
        clobbered = set(self.bm.rollback().tolist())
        after = self._observe()
        assert after["cached"] <= before["cached"]
        assert not clobbered & after["cached"]
        # Blocks reused inside the transaction leave the cache (their KV may be overwritten).
        before["lru"] = [b for b in before["lru"] if b not in clobbered]
        after["cached"] = before["cached"]
        assert after == before, "rollback did not restore the block manager"
        self.seqs, self.freed_at = seqs, freed_at
        for s, toks in list(self.seqs.items()):
            blocks = self.bm.block_ids(s).tolist()
            held = [self.kv.get(blocks[p // BS] * BS + p % BS) for p in range(len(toks))]
            if set(blocks) & clobbered:  # the engine recomputes these: free them here
                self.bm.free(s)
                del self.seqs[s]
            else:
                assert held == toks, "KV overwritten in a rolled-back step, and not reported"
        for b in list(self.freed_at):
            if b in clobbered:
                del self.freed_at[b]

    @rule(tokens=TOKENS, ns=st.integers(0, 1))
    def new(self, tokens, ns):
        sid = self.next_id
        self.next_id += 1
        cached = self.bm.allocate_prefix(sid, tokens, ns)
        assert cached % BS == 0 and cached <= len(tokens) - 1 and self.bm.length(sid) == cached
        blocks = self.bm.block_ids(sid).tolist()
        held = [self.kv.get(blocks[p // BS] * BS + p % BS) for p in range(cached)]
        assert held == tokens[:cached], "a cache hit holds other tokens"
        self.seqs[sid] = tokens[:cached]
        try:
            self._append(sid, tokens[cached:])
        except OutOfBlocksError:
            self.bm.free(sid)  # the cached blocks it took are freed again: newest in the LRU
            del self.seqs[sid]
            for b in blocks:
                self.freed_at.pop(b, None)

    @precondition(lambda self: self.seqs)
    @rule(data=st.data(), tokens=TOKENS)
    def append(self, data, tokens):
        seq = data.draw(st.sampled_from(self._ids()))
        try:
            self._append(seq, tokens)
        except OutOfBlocksError:
            pass

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def register(self, data):
        self._register(data.draw(st.sampled_from(self._ids())))

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def fork(self, data):
        parent = data.draw(st.sampled_from(self._ids()))
        self.bm.fork(parent, self.next_id)
        self.seqs[self.next_id] = list(self.seqs[parent])
        self.next_id += 1

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def truncate(self, data):
        seq = data.draw(st.sampled_from(self._ids()))
        length = data.draw(st.integers(0, len(self.seqs[seq])))
        self.bm.truncate(seq, length)
        self.seqs[seq] = self.seqs[seq][:length]

    @precondition(lambda self: self.seqs)
    @rule(data=st.data())
    def free(self, data):
        seq = data.draw(st.sampled_from(self._ids()))
        self.bm.free(seq)
        del self.seqs[seq]

    # ---- invariants -------------------------------------------------------------------
    @invariant()
    def content_and_counts(self):
        refs = Counter()
        for s, toks in self.seqs.items():
            blocks = self.bm.block_ids(s).tolist()
            assert self.bm.length(s) == len(toks)
            assert [self.kv.get(blocks[p // BS] * BS + p % BS) for p in range(len(toks))] == toks
            refs.update(blocks)
        for b in range(self.bm.num_blocks):
            assert self.bm.ref_count(b) == refs.get(b, 0)
        assert self.bm.num_free_blocks == self.bm.num_blocks - len(refs)
        lru = self._lru()
        assert all(self.bm.ref_count(b) == 0 and self.bm.is_cached(b) for b in lru)
        assert self.bm.num_cached_blocks == sum(self.bm.is_cached(b) for b in range(self.bm.num_blocks))

    @invariant()
    def lru_is_ordered_by_free_time(self):
        self.clock += 1
        lru = self._lru()
        for b in list(self.freed_at):
            if b not in lru:
                del self.freed_at[b]
        for b in lru:
            self.freed_at.setdefault(b, self.clock)
        times = [self.freed_at[b] for b in lru]
        assert times == sorted(times), "the LRU list is out of order"

    def teardown(self):
        if self.txn is not None:
            self.bm.commit()
        for s in self._ids():
            self.bm.free(s)
        assert self.bm.num_free_blocks == self.bm.num_blocks


class CollidingPrefixCacheMachine(PrefixCacheMachine):
    hash_mask = 0x3  # four hash values: nearly every lookup meets a colliding entry


TestPrefixCache = PrefixCacheMachine.TestCase
TestPrefixCache.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestCollidingPrefixCache = CollidingPrefixCacheMachine.TestCase
TestCollidingPrefixCache.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


@pytest.mark.parametrize("mask", [(1 << 64) - 1, 0])
def test_a_registered_prompt_is_found_again_and_evicted_least_recently_freed_first(mask):
    bm = BlockManager(6, 2, mask)
    a, b = [1, 2, 3, 4, 5], [7, 8, 9]
    for sid, toks in ((0, a), (1, b)):
        assert bm.allocate_prefix(sid, toks, 0) == 0
        bm.append(sid, len(toks))
        bm.cache_blocks(sid, toks[:len(toks) // 2 * 2])
    # With one hash value for everything, the first entry stays and the rest are not cached.
    assert bm.num_cached_blocks == (3 if mask else 1)
    bm.free(0)
    bm.free(1)
    assert bm.allocate_prefix(2, a, 0) == (4 if mask else 2)
    assert bm.allocate_prefix(3, a, 1) == 0  # another namespace never shares
    bm.free(2)
    bm.free(3)
    if mask:  # b's block was freed before a's blocks were used again: it is evicted first
        bm.allocate(4, 8)  # 4 blocks: the 3 uncached free ones and one eviction
        assert bm.num_evictable_blocks == 2
        assert bm.allocate_prefix(5, b, 0) == 0 and bm.allocate_prefix(6, a, 0) == 4
