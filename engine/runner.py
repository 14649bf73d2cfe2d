"""Builds one step's batch tensors from the block manager, applies copy-on-write copies and runs
the model. Metadata is built with numpy over the whole batch, never per token."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

import kernels
from engine._core import BlockManager
from engine.model.llama import AttentionMetadata, LlamaForCausalLM


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, block_manager: BlockManager, device: torch.device,
                 dtype: torch.dtype):
        cfg = model.config
        self.model, self.bm, self.device = model, block_manager, device
        self.block_size = block_manager.block_size
        self.num_blocks = block_manager.num_blocks
        num_slots = self.num_blocks * self.block_size
        self.kv_cache = torch.zeros(2, cfg.num_layers, num_slots, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=dtype, device=device)

    @torch.inference_mode()
    def run(self, seq_ids: Sequence[int], chunks: Sequence[Sequence[int]],
            logit_rows: np.ndarray | None = None) -> torch.Tensor:
        """Append each chunk of new tokens to its sequence's cache and run the model over them.

        Returns float32 logits [len(logit_rows), V] of the given rows of the flattened batch
        (every row when logit_rows is None)."""
        counts = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
        starts = self.bm.lengths(list(seq_ids))
        slots, cow = self.bm.append_many(list(seq_ids), counts.tolist())
        if cow.size:
            caches = self.kv_cache.view(-1, self.num_blocks, self.block_size * self.kv_cache[0, 0, 0].numel())
            kernels.copy_blocks(caches, torch.from_numpy(cow).to(self.device))
        total = int(counts.sum())
        query_start = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        positions = np.arange(total) - np.repeat(query_start[:-1] - starts, counts)
        ids = np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int64, count=total)
        to = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(self.device, dt)  # noqa: E731
        meta = AttentionMetadata(
            positions=to(positions, torch.int64),
            slot_mapping=to(slots, torch.int64),
            block_tables=to(self.bm.block_tables(list(seq_ids)), torch.int32),
            context_lens=to(starts + counts, torch.int32),
            query_start_loc=to(query_start, torch.int32),
            block_size=self.block_size,
            max_query_len=int(counts.max()),
            max_context_len=int((starts + counts).max()),
        )
        hidden = self.model(to(ids, torch.int64), meta, self.kv_cache)
        if logit_rows is not None:
            hidden = hidden[to(logit_rows, torch.int64)]
        return self.model.compute_logits(hidden)
