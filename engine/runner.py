"""Turns one StepInput into tensors, applies its copy-on-write copies and runs the model. The
scheduler built the metadata; the runner only reads it. Pure decode steps replay a CUDA graph
captured for their batch-size bucket (static input buffers, padded rows)."""

from __future__ import annotations

import bisect
import contextlib

import numpy as np
import torch

import kernels
from engine.model.llama import AttentionMetadata, LlamaForCausalLM, pack_linears
from engine.step_input import StepInput
from kernels.attention import count_prefix_keys
from kernels.cascade import SharedPrefixes, find_shared_prefixes
from kernels.dispatch import use_triton

_no_phase = contextlib.nullcontext
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
# A decode step whose rows share prompt blocks leaves its graph for eager cascade attention when
# the KV reads it saves reach this fraction of the weights' bytes (a decode step reads both):
# below it, one graph replay is expected to beat an eager step's kernel launches. Not yet
# measured on a GPU (bench/kernel_bench.py times the kernels; the choice is the runner's).
CASCADE_MIN_SAVED_FRACTION = 0.25


def kv_bytes_per_block(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.config
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * cfg.num_layers * block_size * model.num_kv_heads_local * cfg.head_dim * elem


def blocks_that_fit(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype, device: torch.device,
                    memory: int | None = None) -> int:
    """KV blocks that `memory` bytes hold (None: 85% of the free CUDA memory, 1 GiB on CPU)."""
    if memory is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            memory = int(free * 0.85)
        else:
            memory = 1 << 30
    # 2^20 blocks bound the pool (int32 block ids, and a sane host-side free list).
    return max(1, min(memory // kv_bytes_per_block(model, block_size, dtype), 1 << 20))


class ModelRunner:
    """Runs the model over one StepInput. Owns the KV cache tensor; never decides where tokens go
    (the scheduler's block manager did). graphs: "cuda" captures decode graphs (CUDA only),
    "static" runs decode steps eagerly on the same padded static buffers (to test the graph
    path's inputs on any device), None: off."""

    def __init__(self, model: LlamaForCausalLM, device: torch.device, dtype: torch.dtype,
                 num_blocks: int, block_size: int, max_model_len: int, graphs: str | None = None,
                 max_graph_batch: int = 256, adapter_loaded: bool = False):
        cfg = model.config
        self.model, self.device = model, device
        if device.type == "cpu" and dtype == torch.float32:  # decode matmuls 1.9x faster (kernels.linear)
            pack_linears(model, max(1, torch.get_num_threads()))
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_model_len = max_model_len
        # One block past the pool is scratch: padded graph rows write and read only there.
        self.scratch_block = self.num_blocks
        num_slots = (self.num_blocks + 1) * self.block_size
        self.kv_cache = torch.zeros(2, cfg.num_layers, num_slots, model.num_kv_heads_local, cfg.head_dim,
                                    dtype=dtype, device=device)
        if graphs not in (None, "cuda", "static"):
            raise ValueError(f"graphs must be None, 'cuda' or 'static', not {graphs!r}")
        if graphs == "cuda" and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.graphs_mode = graphs
        self.adapter_loaded = adapter_loaded  # the suffix's adapter mask matters only then
        self.graph_sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_graph_batch]
        self.weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        self.kv_bytes_per_key = 2 * cfg.num_layers * model.num_kv_heads_local * cfg.head_dim * dtype.itemsize
        self.cascade_steps = 0  # decode steps that ran cascade attention (tests, benchmarks)
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._static: dict[str, torch.Tensor] = {}
        if graphs is not None:
            self._init_static()
        if graphs == "cuda":
            self.capture_graphs()

    # ---- eager step -------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, step: StepInput, phase=None, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the step's copy-on-write copies, run the model over its tokens and return
        float32 logits [len(step.logit_rows), V]. phase: a profiler's phase timer, if any.
        token_ids: the step's tokens already on the device (int64 [T]; async scheduling feeds a
        step the previous step's draws), in place of step.token_ids."""
        phase = phase or _no_phase
        if step.cow.size:
            with phase("block_copy"):
                self._copy_blocks(step.cow)
        adapter = step.uses_adapter and self.adapter_loaded
        shared = self._shared_prefixes(step)
        if not adapter and shared is None and self._graph_size(np.diff(step.query_start_loc)) is not None:
            return self._run_decode_static(step, phase, token_ids)
        with phase("to_device"):
            # non_blocking: a blocking copy to a GPU waits for the whole stream (a step launched
            # ahead would wait for the one before it); from pageable memory the data is staged
            # before the call returns, so the array may go at once.
            to = lambda a, dt: torch.from_numpy(np.ascontiguousarray(a)).to(  # noqa: E731
                self.device, dt, non_blocking=True)
            counts = np.diff(step.query_start_loc)
            longest = int(counts.max())
            meta = AttentionMetadata(
                positions=to(step.positions, torch.int64),
                slot_mapping=to(step.slot_mapping, torch.int64),
                block_tables=to(step.block_tables, torch.int32),
                context_lens=to(step.context_lens, torch.int32),
                query_start_loc=to(step.query_start_loc, torch.int32),
                block_size=self.block_size,
                max_query_len=longest,
                max_context_len=int(step.context_lens.max()),
                prefix_keys=(count_prefix_keys(counts, step.context_lens)
                            if longest > 1 and self.device.type == "cpu" else None),
                adapter_mask=to(step.adapter_mask, torch.bool) if adapter else None,
                shared_prefixes=None if shared is None else shared.to(self.device),
            )
            self.cascade_steps += shared is not None
            ids = to(step.token_ids, torch.int64) if token_ids is None else token_ids
            rows, n = None, step.num_tokens
            if len(step.logit_rows) != n or (step.logit_rows != np.arange(n)).any():  # built only if needed
                rows = to(step.logit_rows, torch.int64)
        with phase("forward"):
            hidden = self.model(ids, meta, self.kv_cache)
            return self.model.compute_logits(hidden if rows is None else hidden[rows])

    def _shared_prefixes(self, step: StepInput) -> SharedPrefixes | None:
        """The groups of a decode step on the Triton path whose prompt blocks cascade attention
        reads once (kernels.cascade), or None: no sharing, another kind of step, or, where a
        graph would replay the step, too little saved to leave it."""
        counts = np.diff(step.query_start_loc)
        if not use_triton(self.kv_cache) or not len(counts) or counts.max() != 1:
            return None
        shared = find_shared_prefixes(step.block_tables, step.context_lens, self.block_size)
        if shared is None or step.uses_adapter or self._graph_size(counts) is None:
            return shared
        saved = shared.saved_keys * self.kv_bytes_per_key
        return shared if saved >= CASCADE_MIN_SAVED_FRACTION * self.weight_bytes else None

    def _copy_blocks(self, cow: np.ndarray) -> None:
        """Copy-on-write: every (src, dst) block pair of every layer's K and V in one call."""
        block_numel = self.block_size * self.kv_cache[0, 0, 0].numel()
        caches = self.kv_cache.view(-1, self.num_blocks + 1, block_numel)
        pairs = torch.from_numpy(np.ascontiguousarray(cow)).to(self.device, non_blocking=True)
        kernels.copy_blocks(caches, pairs)

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
        self._hosts = [{k: torch.zeros_like(v, device="cpu").pin_memory() if dev.type == "cuda"
                        else torch.zeros_like(v) for k, v in self._static.items() if k != "query_start"}
                       for _ in range(2)]
        self._turn = 0
        self._host_copied: list[torch.cuda.Event | None] = [None, None]  # after each buffer's copies
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

    def _run_decode_static(self, step: StepInput, phase=_no_phase, token_ids: torch.Tensor | None = None,
                           ) -> torch.Tensor:
        batch = step.num_seqs
        size = self._graph_size(np.ones(batch, dtype=np.int64))
        with phase("to_device"):
            # Two host buffers in turn: with async scheduling the copy out of one may still be
            # queued behind the step before when the host fills the other.
            self._turn ^= 1
            hosts = self._hosts[self._turn]
            if self._host_copied[self._turn] is not None:  # its last copies out have run
                self._host_copied[self._turn].synchronize()
            h = {k: v[:size].numpy() for k, v in hosts.items()}
            scratch_slot = self.scratch_block * self.block_size
            h["ids"][:batch], h["ids"][batch:] = step.token_ids, 0
            h["positions"][:batch], h["positions"][batch:] = step.positions, 0
            h["slots"][:batch], h["slots"][batch:] = step.slot_mapping, scratch_slot
            h["context_lens"][:batch], h["context_lens"][batch:] = step.context_lens, 1
            width = step.block_tables.shape[1]
            h["tables"][:batch, :width] = step.block_tables
            h["tables"][:batch, width:] = 0
            h["tables"][batch:] = self.scratch_block
            for name, host in hosts.items():
                self._static[name][:size].copy_(host[:size], non_blocking=True)
            if self.device.type == "cuda":
                self._host_copied[self._turn] = torch.cuda.Event()
                self._host_copied[self._turn].record(torch.cuda.current_stream(self.device))
            if token_ids is not None:
                self._static["ids"][:batch].copy_(token_ids)
        with phase("forward"):
            if self.graphs_mode == "cuda":
                self._graphs[size].replay()
                logits = self._logits[size][:batch]
            else:
                logits = self._forward_static(size)[:batch]
            rows = step.logit_rows
            if len(rows) != batch or (rows != np.arange(batch)).any():
                index = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64))
                logits = logits[index.to(self.device, non_blocking=True)]
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
