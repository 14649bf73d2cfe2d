"""A request and its samples (sequences) as the scheduler sees them."""

from __future__ import annotations

import enum
import time

from engine.sampling import RequestStats, SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"  # no KV cache (new, or preempted and to be recomputed)
    RUNNING = "running"
    FINISHED = "finished"  # blocks released


_FINISHED = SeqStatus.FINISHED  # a global is read faster than an enum member (Python 3.11)


class Sequence:
    """One sample: prompt plus generated tokens, and how many of them are in the KV cache."""

    def __init__(self, seq_id: int, request: Request, token_ids: list[int], index: int, seed: int):
        self.seq_id = seq_id
        self.request = request
        self.index = index
        self.seed = seed
        self.token_ids = list(token_ids)
        self.num_computed = 0
        self.status = SeqStatus.WAITING
        self.finish_reason: str | None = None  # set when generation ends; then only a score may follow
        self.pending_score = False
        self.score: tuple[float, float, float] | None = None  # (score, p_yes, p_no) of the end
        self.checkpoint_scores: list[tuple[int, float]] = []  # (generated tokens, score)
        self.logprobs: list[float] = []
        self.confidences: list[float] = []  # DeepConf token confidence, when the scorer wants it
        self.top_logprobs: list[list[tuple[int, float]]] = []  # when params.logprobs asks for them
        self.temperature = request.params.temperature  # a policy may anneal it per sample
        self.is_root = False  # a policy's prompt holder: never samples, only forked from
        self.pruned_at: int | None = None  # generated tokens when a policy dropped it
        self.detokenizer = None  # engine.detokenizer.IncrementalDetokenizer of a sample
        self.detokenized = 0  # generated tokens already fed to the detokenizer
        self.pending_text = ""  # text decoded but not yet reported
        self.emitted = 0  # generated tokens already reported in a delta
        self.score_emitted = False
        self.emitted_scores = 0  # checkpoint scores already reported
        self.emitted_end = False  # finish reason (and end score, if any) reported

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.request.num_prompt

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def generating(self) -> bool:
        """Generation has not ended (a finished sample may still wait for its end score)."""
        return self.finish_reason is None

    @property
    def live(self) -> bool:
        """Still generating and holding (or waiting for) cache: a policy may score or drop it."""
        return self.finish_reason is None and self.status is not SeqStatus.FINISHED

    def reaches_end(self, num_tokens: int) -> bool:
        """Whether a chunk of num_tokens from num_computed reaches the last token."""
        return num_tokens > 0 and self.num_computed + num_tokens == len(self.token_ids)

    def samples_after(self, num_tokens: int) -> bool:
        """Whether computing this chunk gives the next-token row this sample samples from."""
        return self.finish_reason is None and self.reaches_end(num_tokens)

    def state(self) -> tuple:
        """What one engine step may change (for undoing a step that raised)."""
        return (self.num_computed, self.status, len(self.token_ids), len(self.logprobs),
                len(self.confidences), len(self.top_logprobs), len(self.checkpoint_scores),
                self.finish_reason, self.pending_score, self.score, self.pruned_at)

    def restore(self, state: tuple) -> None:
        (self.num_computed, self.status, n_tokens, n_logprobs, n_conf, n_top, n_scores, self.finish_reason,
         self.pending_score, self.score, self.pruned_at) = state
        del self.token_ids[n_tokens:], self.logprobs[n_logprobs:], self.confidences[n_conf:]
        del self.top_logprobs[n_top:]
        del self.checkpoint_scores[n_scores:]

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, len={len(self.token_ids)}, "
                f"computed={self.num_computed}, {self.status.value})")


class Request:
    def __init__(self, request_id: int, prompt_ids: list[int], params: SamplingParams, seed: int):
        self.request_id = request_id
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.seed = seed
        self.num_prompt = len(prompt_ids)
        self.seqs: list[Sequence] = []
        self.pending_forks: list[float] = []  # temperatures of samples waiting for the root's cache
        self.max_samples = params.n  # a policy sets its own: the root is released once drawn
        self.stats = RequestStats(prompt_tokens=len(prompt_ids))
        self.arrival = time.perf_counter()
        self.wants_score = params.wants_score  # score each sample at its end
        self.score_at = params.score_at  # generated lengths at which to score in place
        self.track_confidence = params.confidence
        self.detokenize = params.detokenize  # False: no text (deltas and outputs carry tokens)
        self.policy = None  # a policy's per-request run (engine.policies), if any
        self.root: Sequence | None = None  # holds the prompt's cache; samples fork off it
        self.best_index: int | None = None
        self.error: str | None = None  # why the request failed (finish reason "error")
        # One sample whose streamed deltas carry only tokens, text and logprobs (no stop strings,
        # top logprobs or scores, no policy): OutputProcessor.decode_delta takes its decode steps.
        self.plain = (params.n == 1 and not params.stop and not params.logprobs and not params.wants_score
                      and not params.score_at)

    @property
    def finished(self) -> bool:
        if (self.policy is not None and not self.policy.done) or self.pending_forks:
            return False
        for seq in self.seqs:  # a loop, not all(): every streaming step asks every request
            if seq.status is not _FINISHED:
                return False
        return True

    def state(self) -> tuple:
        # A tuple, not a list copy: no allocation while empty (every step saves every request,
        # and fewer new containers mean fewer garbage collections).
        return len(self.seqs), tuple(self.pending_forks), self.stats.__dict__.copy(), self.best_index

    def restore(self, state: tuple) -> None:
        n_seqs, pending_forks, stats, self.best_index = state
        self.pending_forks = list(pending_forks)
        self.stats.__dict__.update(stats)
        del self.seqs[n_seqs:]

    @property
    def drawn(self) -> int:
        """Samples drawn so far, those waiting for the root's cache included."""
        return len(self.seqs) - (self.root is not None) + len(self.pending_forks)

    @property
    def samples(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_root]


def sample_seed(base: int, index: int) -> int:
    """Seed of sample `index` of a request: sample 0 keeps the request's seed."""
    if index == 0:
        return base
    return (base * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9) & ((1 << 63) - 1)
