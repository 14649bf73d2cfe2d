"""Builds one step's batch tensors from the block manager, applies copy-on-write copies and runs
the model. Metadata is built with numpy over the whole batch, never per token. Pure decode steps
replay a CUDA graph captured for their batch-size bucket (static input buffers, padded rows)."""

from __future__ import annotations

import bisect
import contextlib
import itertools
from collections.abc import Sequence

import numpy as np
import torch

import kernels
from engine._core import BlockManager
from engine.model.llama import AttentionMetadata, LlamaForCausalLM

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * cfg.num_kv_heads * cfg.head_dim * elem


class ModelRunner:
    """graphs: "cuda" captures decode graphs (CUDA only), "static" runs decode steps eagerly on
    the same padded static buffers (to test the graph path's inputs on any device), None: off."""

    def __init__(self, model: LlamaForCausalLM, block_manager: BlockManager, device: torch.device,
                 dtype: torch.dtype, max_model_len: int, graphs: str | None = None,
                 max_graph_batch: int = 256):
        cfg = model.config
        self.model, self.bm, self.device = model, block_manager, device
        self.block_size = block_manager.block_size
        self.num_blocks = block_manager.num_blocks
        self.max_model_len = max_model_len
        # One block past the pool is scratch: padded graph rows write and read only there.
        self.scratch_block = self.num_blocks
        num_slots = (self.num_blocks + 1) * self.block_size
        self.kv_cache = torch.zeros(2, cfg.num_layers, num_slots, cfg.num_kv_heads, cfg.head_dim,
                                    dtype=dtype, device=device)
        if graphs not in (None, "cuda", "static"):
            raise ValueError(f"graphs must be None, 'cuda' or 'static', not {graphs!r}")
        if graphs == "cuda" and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.graphs_mode = graphs
        self.adapter_loaded = False  # set by the engine when a LoRA adapter is loaded
        self.graph_sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_graph_batch]
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._static: dict[str, torch.Tensor] = {}
        if graphs is not None:
            self._init_static()
        if graphs == "cuda":
            self.capture_graphs()

    # ---- eager step -------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, seq_ids: Sequence[int], chunks: Sequence[Sequence[int]],
            logit_rows: np.ndarray | None = None,
            adapter_tokens: Sequence[int] | None = None, phase=None) -> torch.Tensor:
        """Append each chunk of new tokens to its sequence's cache and run the model over them.
        adapter_tokens: how many trailing tokens of each chunk (the self-evaluation suffix) the
        LoRA adapter applies to, when one is loaded. phase: a profiler's phase timer, if any.

        Returns float32 logits [len(logit_rows), V] of the given rows of the flattened batch
        (every row when logit_rows is None)."""
        counts = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
        starts = self.bm.lengths(list(seq_ids))
        slots, cow = self.bm.append_many(list(seq_ids), counts.tolist())
        if cow.size:
            with phase("block_copy") if phase is not None else contextlib.nullcontext():
                self._copy_blocks(cow)
        total = int(counts.sum())
        ids = np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int64, count=total)
        adapter = adapter_tokens is not None and any(adapter_tokens) and self.adapter_loaded
        if not adapter and self._graph_size(counts) is not None:
            return self._run_decode_static(seq_ids, ids, starts, slots, logit_rows)
        query_start = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=query_start[1:])
        mask = None
        if adapter:
            ends = query_start[1:]
            tail = np.asarray(adapter_tokens, dtype=np.int64)
            marks = np.zeros(total + 1, dtype=np.int64)  # +1 at each suffix start, -1 at its end
            np.add.at(marks, ends - tail, 1)
            np.add.at(marks, ends, -1)
            mask = np.cumsum(marks[:-1]) > 0
        positions = np.arange(total) - np.repeat(query_start[:-1] - starts, counts)
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
            adapter_mask=None if mask is None else to(mask, torch.bool),
        )
        hidden = self.model(to(ids, torch.int64), meta, self.kv_cache)
        if logit_rows is not None:
            hidden = hidden[to(logit_rows, torch.int64)]
        return self.model.compute_logits(hidden)

    def _copy_blocks(self, cow: np.ndarray) -> None:
        """Copy-on-write: every (src, dst) block pair of every layer's K and V in one call."""
        block_numel = self.block_size * self.kv_cache[0, 0, 0].numel()
        caches = self.kv_cache.view(-1, self.num_blocks + 1, block_numel)
        kernels.copy_blocks(caches, torch.from_numpy(cow).to(self.device))

    # ---- decode graphs ----------------------------------------------------------------
    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def _graph_size(self, counts: np.ndarray) -> int | None:
        """The bucket a pure decode batch replays in, or None (eager)."""
        if self.graphs_mode is None or not len(counts) or counts.max() != 1 or counts.min() != 1:
            return None
        i = bisect.bisect_left(self.graph_sizes, len(counts))
        return self.graph_sizes[i] if i < len(self.graph_sizes) else None

    def _init_static(self) -> None:
        n, dev = self.graph_sizes[-1], self.device
        self._static = {
            "ids": torch.zeros(n, dtype=torch.int64, device=dev),
            "positions": torch.zeros(n, dtype=torch.int64, device=dev),
            "slots": torch.zeros(n, dtype=torch.int64, device=dev),
            "tables": torch.zeros(n, self.max_blocks_per_seq, dtype=torch.int32, device=dev),
            "context_lens": torch.ones(n, dtype=torch.int32, device=dev),
            "query_start": torch.arange(n + 1, dtype=torch.int32, device=dev),
        }
        self._host = {k: torch.zeros_like(v, device="cpu").pin_memory() if dev.type == "cuda"
                      else torch.zeros_like(v) for k, v in self._static.items() if k != "query_start"}
        self._logits: dict[int, torch.Tensor] = {}

    def _static_meta(self, size: int) -> AttentionMetadata:
        s = self._static
        # max_context_len is the cap, not this step's: a graph's split count is fixed at capture.
        return AttentionMetadata(
            positions=s["positions"][:size], slot_mapping=s["slots"][:size],
            block_tables=s["tables"][:size], context_lens=s["context_lens"][:size],
            query_start_loc=s["query_start"][:size + 1], block_size=self.block_size,
            max_query_len=1, max_context_len=self.max_model_len)

    def _forward_static(self, size: int) -> torch.Tensor:
        hidden = self.model(self._static["ids"][:size], self._static_meta(size), self.kv_cache)
        return self.model.compute_logits(hidden)

    def _run_decode_static(self, seq_ids, ids, starts, slots, logit_rows) -> torch.Tensor:
        batch = len(seq_ids)
        size = self._graph_size(np.ones(batch, dtype=np.int64))
        h = {k: v[:size].numpy() for k, v in self._host.items()}
        scratch_slot = self.scratch_block * self.block_size
        h["ids"][:batch], h["ids"][batch:] = ids, 0
        h["positions"][:batch], h["positions"][batch:] = starts, 0
        h["slots"][:batch], h["slots"][batch:] = slots, scratch_slot
        h["context_lens"][:batch], h["context_lens"][batch:] = starts + 1, 1
        tables = self.bm.block_tables(list(seq_ids), self.max_blocks_per_seq)
        h["tables"][:batch], h["tables"][batch:] = tables, self.scratch_block
        for name, host in self._host.items():
            self._static[name][:size].copy_(host[:size], non_blocking=True)
        if self.graphs_mode == "cuda":
            self._graphs[size].replay()
            logits = self._logits[size][:batch]
        else:
            logits = self._forward_static(size)[:batch]
        if logit_rows is not None:
            logits = logits[torch.from_numpy(np.asarray(logit_rows, dtype=np.int64)).to(self.device)]
        return logits.clone() if self.graphs_mode == "cuda" else logits

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture one decode graph per batch bucket, largest first, sharing one memory pool.
        Padded rows (all rows here) point at the scratch block."""
        s = self._static
        s["slots"].fill_(self.scratch_block * self.block_size)
        s["tables"].fill_(self.scratch_block)
        s["context_lens"].fill_(1)
        pool = None
        for size in reversed(self.graph_sizes):
            self._forward_static(size)  # warm-up: compiles kernels and settles kernel dispatch
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[size] = self._forward_static(size)
            pool = graph.pool()
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)
