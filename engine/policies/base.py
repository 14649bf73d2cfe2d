"""A policy is a program over one request: it spawns samples from the cached prompt, has them
scored, drops weak ones and says when the request is done. The engine calls `begin` once and
`update` after every step, so requests with different policies share one continuous batch."""

from __future__ import annotations

import math
from typing import Protocol

from engine.errors import InvalidRequestError
from engine.policies.scorers import Scorer, make_scorer
from engine.sequence import Request, SeqStatus, Sequence


class SampleHost(Protocol):
    """What the engine core offers a policy; the whole interface a policy acts through."""

    def fork_samples(self, request: Request, temperatures: list[float]) -> None:
        """Fork one sample per temperature off the request's cached prompt (no prefill)."""

    def score_now(self, request: Request) -> int:
        """Score every live sample in place at its current length during the next step."""

    def drop_sample(self, seq: Sequence) -> None:
        """Prune a sample (live, or ended and maybe waiting for its end score): its blocks are
        freed at once."""

    def finish_request(self, request: Request, best_index: int | None) -> None:
        """End the request with this pick; every sample still live is dropped."""


class Policy:
    """Subclasses set full_samples (the N of the best-of-N they are measured against) and
    implement begin / update with the PolicyRun's actions."""

    full_samples: int = 1

    def __init__(self, scorer: str | Scorer = "selfeval"):
        try:
            self.scorer = make_scorer(scorer)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from e

    def begin(self, run: PolicyRun) -> None:
        raise NotImplementedError

    def update(self, run: PolicyRun) -> None:
        raise NotImplementedError

    def checkpoints(self) -> tuple[int, ...]:
        """Generated lengths at which samples are scored in place (when the scorer needs it)."""
        return ()


class PolicyRun:
    """One request's policy state and the actions a policy may take on it."""

    def __init__(self, policy: Policy, host: SampleHost, request: Request):
        self.policy, self.host, self.request = policy, host, request
        self.scorer = policy.scorer
        self.state: dict = {}
        self.done = False

    # ---- what a policy sees -----------------------------------------------------------
    @property
    def samples(self) -> list[Sequence]:
        return self.request.samples

    def live(self) -> list[Sequence]:
        return [s for s in self.samples if s.live]

    def complete(self, seq: Sequence) -> bool:
        """Generation ended and, where the scorer needs it, the end score is in."""
        return seq.status is SeqStatus.FINISHED or (not seq.generating and not self.scorer.needs_suffix)

    @property
    def waiting_for_prompt(self) -> bool:
        """Samples asked for still wait for the prompt's cache."""
        return bool(self.request.pending_forks)

    def settled(self) -> bool:
        """Every sample asked for is drawn (none waits for the prompt's cache) and complete."""
        return not self.waiting_for_prompt and all(self.complete(s) for s in self.samples)

    def value(self, seq: Sequence, upto: int | None = None) -> float | None:
        return self.scorer(seq, upto)

    @property
    def drawn(self) -> int:
        return self.request.drawn

    # ---- actions ----------------------------------------------------------------------
    def fork(self, k: int, temperature: float | None = None) -> None:
        """k new samples from the cached prompt (forked, no prefill) at this temperature."""
        t = self.request.params.temperature if temperature is None else temperature
        self.host.fork_samples(self.request, [t] * k)

    spawn = fork

    def score_now(self) -> int:
        return self.host.score_now(self.request)

    def drop(self, seq: Sequence) -> None:
        """Prune a sample: it leaves the pick and its blocks are freed at once. A live one stops
        (finish reason "pruned"); one whose generation had ended keeps its finish reason, saved no
        tokens, and is not scored at its end if it still waited for that."""
        self.host.drop_sample(seq)

    def finish(self) -> None:
        """Pick the best complete sample, release what is left and account the saved tokens."""
        scored = [(self.value(s), s.index) for s in self.samples if s.pruned_at is None and not s.live]
        scored = [(v, i) for v, i in scored if v is not None and math.isfinite(v)]
        kept = [s.index for s in self.samples if s.pruned_at is None]
        best = max(scored)[1] if scored else (kept[0] if kept else None)
        self.request.stats.tokens_saved = self._tokens_saved()
        self.done = True
        self.host.finish_request(self.request, best)

    def _tokens_saved(self) -> int:
        """Tokens full best-of-N would have generated beyond these, in expectation. A sample cut
        after `a` tokens would have reached the mean final length of the complete samples that got
        at least that far (E[L | L >= a], from the samples that went on: the samples still alive
        at a checkpoint are the long ones, so the mean of all would be biased low); none got that
        far: nothing is claimed for it. A sample never drawn would have reached the mean length of
        all complete samples (max_tokens when none completed). Exact when lengths are fixed
        (ignore_eos)."""
        done = [s.num_generated for s in self.samples if not s.live and s.finish_reason != "pruned"]
        saved = 0.0
        for s in self.samples:
            if s.live or s.finish_reason == "pruned":
                at = s.num_generated
                reached = [n for n in done if n >= at]
                saved += sum(reached) / len(reached) - at if reached else 0.0
        mean = sum(done) / len(done) if done else self.request.params.max_tokens
        saved += max(self.policy.full_samples - len(self.samples), 0) * mean
        return round(saved)


def check_positive(**values: int) -> None:
    """Sample counts and lengths: positive integers."""
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise InvalidRequestError(f"{name} must be a positive integer, got {v!r}")


def check_finite(**values: float) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InvalidRequestError(f"{name} must be a finite number, got {v!r}")


def check_sequence(**values) -> None:
    """Lists of numbers (rounds, temperatures, checkpoints): a list or tuple."""
    for name, v in values.items():
        if not isinstance(v, (list, tuple)):
            raise InvalidRequestError(f"{name} must be a list or tuple, got {v!r}")
