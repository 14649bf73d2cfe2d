"""Where a workload's time goes, measured: each engine step's phases timed with a device sync at
their edges (CUDA events would not see host work; the syncs cost a little and are only made when
a profiler is attached), and each step's token mix recorded.

Phases, host then device work: snapshot (what undoing a failed step needs), schedule (picking
the batch), prepare (placing its tokens in the cache, laying out the StepInput), block_copy
(copy-on-write), to_device (the StepInput as device tensors), forward (the model over the step's
tokens), score (reading scores), sample_prep (the host's per-sequence sampling columns), sample
(the sampling math and reading tokens back), update (appending tokens, token stop rules,
rollback of suffixes, prefix-cache registration), detokenize (text and stop strings), policy
(policy programs), output (deltas). Host time is everything but forward, score and sample.
A step's forward is attributed to prefill, decode or score by its content: any prefill chunk
makes it a prefill step, else any suffix a score step, else decode."""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass

import torch


@dataclass
class StepRecord:
    kind: str  # prefill | decode | score
    seqs: int
    prefill_tokens: int
    decode_tokens: int
    suffix_tokens: int
    context_tokens: int  # sum of the sequences' cached lengths after the step
    seconds: float
    blocks_used: int = 0  # KV blocks in use during the step (when the profiler has the block manager)


class _Phase:
    __slots__ = ("prof", "name", "start")

    def __init__(self, prof: StepProfiler, name: str):
        self.prof, self.name = prof, name

    def __enter__(self) -> None:
        self.prof._sync()
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        self.prof._sync()
        self.prof.phase_seconds[self.name] += time.perf_counter() - self.start


class StepProfiler:
    def __init__(self, device: torch.device | str = "cpu", block_manager=None):
        self.device = torch.device(device)
        self.block_manager = block_manager
        self.phase_seconds: dict[str, float] = defaultdict(float)
        self.steps: list[StepRecord] = []
        self._current: str | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def phase(self, name: str) -> _Phase:
        """A context manager timing one phase (a class, not a generator: it runs ~12 times a step)."""
        return _Phase(self, name)

    def record(self, out, seconds: float) -> None:
        """One step's token mix (from the scheduler's output) and its forward time."""
        if out.decodes == len(out.seqs) and out.step is not None:  # a plain decode step: no loop
            prefill, suffix, decode = 0, 0, len(out.seqs)
            context = int(out.step.context_lens.sum())  # the cache's lengths, a step ahead too
        else:
            real = out.num_real
            suffix = sum(map(len, out.suffixes))
            decode, context = 0, sum(real)
            for s, n in zip(out.seqs, real):  # one loop, inline: it runs once per sequence per step
                computed = s.num_computed
                context += computed
                if n == 1 and computed + 1 == len(s.token_ids):  # s.reaches_end(n)
                    decode += 1
            prefill = sum(real) - decode
        kind = "prefill" if prefill else ("score" if suffix else "decode")
        bm = self.block_manager
        used = bm.num_blocks - bm.num_free_blocks if bm is not None else 0
        self.steps.append(StepRecord(kind, len(out.seqs), prefill, decode, suffix, context, seconds, used))

    def summary(self) -> dict:
        steps = self.steps
        by_kind = defaultdict(lambda: {"steps": 0, "seconds": 0.0})
        for s in steps:
            by_kind[s.kind]["steps"] += 1
            by_kind[s.kind]["seconds"] += s.seconds
        return {"phase_seconds": dict(self.phase_seconds), "forward_by_kind": dict(by_kind),
                "steps": len(steps), "prefill_tokens": sum(s.prefill_tokens for s in steps),
                "decode_tokens": sum(s.decode_tokens for s in steps),
                "suffix_tokens": sum(s.suffix_tokens for s in steps),
                "total_seconds": sum(self.phase_seconds.values())}
