"""Best-of-N, adaptive sampling with temperature annealing, and early pruning."""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq

from engine.errors import InvalidRequestError
from engine.policies.base import Policy, PolicyRun, check_finite, check_positive, check_sequence
from engine.policies.scorers import Scorer


class BestOfN(Policy):
    """n samples forked from one prefill, each complete sample scored, the argmax returned."""

    def __init__(self, n: int, scorer: str | Scorer = "selfeval"):
        super().__init__(scorer)
        check_positive(n=n)
        self.n = self.full_samples = n

    def begin(self, run: PolicyRun) -> None:
        run.spawn(self.n)

    def update(self, run: PolicyRun) -> None:
        if run.settled() and run.drawn == self.n:
            run.finish()


class Adaptive(Policy):
    """Sample in rounds; stop as soon as the best score so far reaches the threshold. The
    temperature anneals upward round by round, the first round near-greedy."""

    def __init__(self, threshold: float, max_samples: int = 16, rounds: Seq[int] = (1, 1, 2, 4, 8),
                 temperatures: Seq[float] | None = None, scorer: str | Scorer = "selfeval"):
        super().__init__(scorer)
        check_positive(max_samples=max_samples)
        check_sequence(rounds=rounds)
        if temperatures is not None:
            check_sequence(temperatures=temperatures)
        if not rounds or any(r < 1 for r in rounds):
            raise InvalidRequestError(f"rounds must be positive sample counts, got {tuple(rounds)}")
        temperatures = tuple(temperatures) if temperatures is not None else tuple(
            round(0.1 + 0.9 * i / max(len(rounds) - 1, 1), 3) for i in range(len(rounds)))
        if len(temperatures) != len(rounds):
            raise InvalidRequestError(f"{len(rounds)} rounds but {len(temperatures)} temperatures")
        check_finite(threshold=threshold)
        for r, t in zip(rounds, temperatures):
            check_positive(round_size=r)
            check_finite(temperature=t)
            if t < 0:
                raise InvalidRequestError(f"temperatures must be >= 0, got {t}")
        self.threshold, self.max_samples = threshold, max_samples
        self.rounds, self.temperatures = tuple(rounds), temperatures
        self.full_samples = max_samples

    def _next_round(self, run: PolicyRun) -> None:
        r = run.state["round"]
        k = min(self.rounds[r], self.max_samples - run.drawn)
        run.state["round"] = r + 1
        run.spawn(k, self.temperatures[r])

    def begin(self, run: PolicyRun) -> None:
        run.state["round"] = 0
        self._next_round(run)

    def update(self, run: PolicyRun) -> None:
        if not run.settled():
            return
        values = [run.value(s) for s in run.samples]
        best = max((v for v in values if v is not None and math.isfinite(v)), default=-math.inf)
        if best >= self.threshold or run.drawn >= self.max_samples or run.state["round"] == len(self.rounds):
            run.state["rounds_used"] = run.state["round"]
            run.finish()
        else:
            self._next_round(run)


class Prune(Policy):
    """n samples; at each checkpoint (generated tokens) score every live sample in place and keep
    the best `keep` fraction (or those scoring >= threshold, at least one) of the samples that went
    on past it; finish the survivors. A sample that had ended before the decision (the schedule
    let it run ahead) and is ranked out only leaves the pick."""

    def __init__(self, n: int, checkpoints: Seq[int] = (64,), keep: float | None = 0.25,
                 threshold: float | None = None, scorer: str | Scorer = "selfeval"):
        super().__init__(scorer)
        check_positive(n=n)
        check_sequence(checkpoints=checkpoints)
        if threshold is not None:
            check_finite(threshold=threshold)
        elif keep is None or (check_finite(keep=keep) or not 0 < keep <= 1):
            raise InvalidRequestError(f"keep must be in (0, 1], got {keep}")
        for c in checkpoints:
            check_positive(checkpoint=c)
        if not checkpoints:
            raise InvalidRequestError(f"checkpoints must be positive lengths, got {tuple(checkpoints)}")
        self.n = self.full_samples = n
        self.keep_frac = None if threshold is not None else keep
        self.threshold = threshold
        self._checkpoints = tuple(sorted(set(checkpoints)))

    def checkpoints(self) -> tuple[int, ...]:
        return self._checkpoints

    def begin(self, run: PolicyRun) -> None:
        run.state["next"] = 0
        run.spawn(self.n)

    def update(self, run: PolicyRun) -> None:
        while run.state["next"] < len(self._checkpoints) and not run.waiting_for_prompt:
            c = self._checkpoints[run.state["next"]]
            # Decide once every live sample has passed c and has its value there.
            if any(s.num_generated < c or run.value(s, c) is None for s in run.live()):
                break
            run.state["next"] += 1
            ranked = self._past(run, c)
            if len(ranked) > 1:
                self._prune(run, ranked, c)
        if run.settled() and run.drawn == self.n:
            run.finish()

    @staticmethod
    def _past(run: PolicyRun, c: int) -> list:
        """The samples ranked at checkpoint c: every one still generating when its value at c came
        in (a self-evaluation score at c lands in the step that samples token c + 1, a token
        statistic with token c), whether it is live now or ended since. Under batch pressure the
        samples of a request pass c steps apart and some end before the last one gets there;
        ranking only the live ones would make what is pruned depend on the schedule."""
        after = c + int(run.scorer.needs_suffix)
        return [s for s in run.samples if s.pruned_at is None and (
            s.live or (s.num_generated > after and run.value(s, c) is not None))]

    def _prune(self, run: PolicyRun, ranked, c: int) -> None:
        ranked = sorted(ranked, key=lambda s: (-run.value(s, c), s.index))
        if self.threshold is not None:
            keep = max(1, sum(run.value(s, c) >= self.threshold for s in ranked))
        else:
            keep = max(1, round(self.keep_frac * len(ranked)))
        for seq in ranked[keep:]:
            run.drop(seq)
