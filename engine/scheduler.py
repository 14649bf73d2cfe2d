"""Continuous batching: each step takes decodes, prefill chunks and self-evaluation suffixes
within a token budget; sequences join and leave between steps; when blocks run out the youngest
sequences are preempted (freed, recomputed later)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from engine._core import BlockManager
from engine.selfeval import SelfEvalSpec
from engine.sequence import SeqStatus, Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_real: list[int] = field(default_factory=list)  # prompt/response tokens of each chunk
    suffixes: list[tuple[int, ...]] = field(default_factory=list)  # self-evaluation suffix or ()

    def __len__(self) -> int:
        return len(self.seqs)

    def chunks(self) -> list[list[int]]:
        return [s.token_ids[s.num_computed:s.num_computed + n] + list(suf)
                for s, n, suf in zip(self.seqs, self.num_real, self.suffixes)]

    def rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(sample rows, score rows, score mask) in the flattened batch. A chunk that reaches the
        end of a generating sequence's tokens gives the next-token row; a suffix gives the score row."""
        real = np.asarray(self.num_real, dtype=np.int64)
        suffix = np.fromiter((len(x) for x in self.suffixes), dtype=np.int64, count=len(self))
        ends = np.cumsum(real + suffix)
        samples = np.fromiter(
            (s.generating and s.num_computed + n == len(s.token_ids) and n > 0
             for s, n in zip(self.seqs, self.num_real)), dtype=bool, count=len(self))
        scored = suffix > 0
        return ends[samples] - suffix[samples] - 1, ends[scored] - 1, scored


class Scheduler:
    def __init__(self, block_manager: BlockManager, spec: SelfEvalSpec, max_batch_tokens: int,
                 max_num_seqs: int):
        self.bm = block_manager
        self.spec = spec
        self.max_batch_tokens = max_batch_tokens
        self.max_num_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _plan(self, seq: Sequence, budget: int) -> tuple[int, tuple[int, ...]]:
        """How many real tokens (and which suffix) seq computes this step within budget."""
        n = seq.num_uncomputed
        if seq.pending_score:
            suffix = self.spec.suffix_after(seq.token_ids[-1])
            if n + len(suffix) <= budget:
                return n, suffix
            # The score must see exactly this length: never sample past it before scoring.
            return (min(n, budget), ()) if not seq.generating else (min(n - 1, budget), ())
        return min(n, budget), ()

    def preempt(self, seq: Sequence) -> None:
        self.bm.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.request.stats.preemptions += 1
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def release(self, seq: Sequence) -> None:
        if seq.seq_id in self.bm:
            self.bm.free(seq.seq_id)
        seq.status = SeqStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_batch_tokens
        reserved = 0  # blocks promised to sequences already in the batch
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n, suffix = self._plan(seq, budget)
            if n + len(suffix) == 0:
                i += 1
                continue
            need = self.bm.blocks_needed(seq.seq_id, n + len(suffix))
            while need > self.bm.num_free_blocks - reserved and self.running[-1] is not seq:
                self.preempt(self.running[-1])
            if need > self.bm.num_free_blocks - reserved:
                self.preempt(seq)  # it is the youngest: wait for older sequences to finish
                break
            batch.seqs.append(seq)
            batch.num_real.append(n)
            batch.suffixes.append(suffix)
            budget -= n + len(suffix)
            reserved += need
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n, suffix = self._plan(seq, budget)
            need = -(-(n + len(suffix)) // self.bm.block_size)
            if n + len(suffix) == 0 or need > self.bm.num_free_blocks - reserved:
                break
            self.waiting.popleft()
            self.bm.allocate(seq.seq_id, 0)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_real.append(n)
            batch.suffixes.append(suffix)
            budget -= n + len(suffix)
            reserved += need
        return batch

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares parent's blocks and joins the batch right after it."""
        self.bm.fork(parent.seq_id, child.seq_id)
        child.num_computed = parent.num_computed
        child.status = SeqStatus.RUNNING
        self.running.insert(self.running.index(parent) + 1, child)

    def finish_chunk(self, batch: ScheduledBatch) -> None:
        """Account the computed tokens and roll every scored sequence back past its suffix."""
        for seq, n, suffix in zip(batch.seqs, batch.num_real, batch.suffixes):
            seq.num_computed += n
            if suffix:
                self.bm.truncate(seq.seq_id, seq.num_computed)
                seq.pending_score = False
