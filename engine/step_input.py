"""StepInput: everything the model runner needs for one step, as plain numpy arrays. The scheduler
builds it (after the block manager has placed the step's tokens); the runner only reads it. It is
picklable, so another process (a tensor-parallel worker) can replay the same step."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine._core import BlockManager


@dataclass
class StepInput:
    token_ids: np.ndarray  # int64 [T] new tokens of every sequence, concatenated
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T] cache slot each new token is written to
    query_start_loc: np.ndarray  # int64 [B + 1] where each sequence's tokens start in token_ids
    context_lens: np.ndarray  # int64 [B] cached length including this step's tokens
    block_tables: np.ndarray  # int32 [B, W] padded with 0 (never read past a context length)
    cow: np.ndarray  # int32 [K, 2] (src, dst) block copies to run before the forward
    logit_rows: np.ndarray  # int64 [R] rows of the flattened batch whose logits are returned
    adapter_mask: np.ndarray | None = None  # bool [T]: tokens the LoRA adapter applies to

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_pure_decode(self) -> bool:
        """One new token per sequence and no adapter: what a decode CUDA graph can replay."""
        counts = np.diff(self.query_start_loc)
        return bool(len(counts)) and bool((counts == 1).all()) and not self.uses_adapter

    @property
    def uses_adapter(self) -> bool:
        return self.adapter_mask is not None and bool(self.adapter_mask.any())


def prepare_step(bm: BlockManager, seq_ids: Sequence[int], chunks: Sequence[Sequence[int]],
                 logit_rows: np.ndarray | Sequence[int] | None = None,
                 adapter_tokens: Sequence[int] | None = None) -> StepInput:
    """Append each chunk of new tokens to its sequence in bm (all or nothing, copy-on-write
    decided here) and lay the step out. adapter_tokens: how many trailing tokens of each chunk
    (the self-evaluation suffix) the adapter applies to. logit_rows None: every row."""
    ids = list(seq_ids)
    sizes = list(map(len, chunks))
    counts = np.array(sizes, dtype=np.int64)
    starts = bm.lengths(ids)
    slots, cow = bm.append_many(ids, sizes)
    total = int(counts.sum())
    tokens = np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int64, count=total)
    query_start = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=query_start[1:])
    mask = None
    if adapter_tokens is not None and any(adapter_tokens):
        ends = query_start[1:]
        marks = np.zeros(total + 1, dtype=np.int64)  # +1 at each suffix start, -1 at its end
        np.add.at(marks, ends - np.asarray(adapter_tokens, dtype=np.int64), 1)
        np.add.at(marks, ends, -1)
        mask = np.cumsum(marks[:-1]) > 0
    rows = np.arange(total, dtype=np.int64) if logit_rows is None else np.asarray(logit_rows, np.int64)
    return StepInput(
        token_ids=tokens,
        positions=np.arange(total, dtype=np.int64) - np.repeat(query_start[:-1] - starts, counts),
        slot_mapping=np.asarray(slots, dtype=np.int64),
        query_start_loc=query_start,
        context_lens=starts + counts,
        block_tables=bm.block_tables(ids),
        cow=cow,
        logit_rows=rows,
        adapter_mask=mask,
    )


def prepare_decode(bm: BlockManager, seq_ids: Sequence[int], tokens: Sequence[int]) -> StepInput:
    """prepare_step for the common step, one token per sequence with every row sampled: the
    same StepInput without the per-chunk work."""
    ids = list(seq_ids)
    n = len(ids)
    starts = bm.lengths(ids)
    slots, cow = bm.append_many(ids, [1] * n)
    return StepInput(
        token_ids=np.array(tokens, dtype=np.int64),
        positions=starts,
        slot_mapping=slots,
        query_start_loc=np.arange(n + 1, dtype=np.int64),
        context_lens=starts + 1,
        block_tables=bm.block_tables(ids),
        cow=cow,
        logit_rows=np.arange(n, dtype=np.int64),
    )
