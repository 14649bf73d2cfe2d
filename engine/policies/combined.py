"""The combined scorer: the self-evaluation score's logit and the sample's mean token
log-probability in one linear score, fitted on training problems (issue 16). On the edges testbed
the two see different mistakes: the self-evaluation question catches a wrong arm followed fluently
to its end, which log-probability cannot; log-probability catches a sampling slip (an edge the
question lacks, drawn at low probability) that the score, near its ceiling, ranks a hair above a
right path. It is its own scorer, reported beside the pure self-evaluation, never in its place.

The fit is pairwise: a logistic model on the feature differences of a right and a wrong sample
of one prompt, the within-prompt ranking that best-of-n needs (no bias: a prompt's difficulty
cancels). Weights apply to standardized features; the file is JSON beside the adapter
(`combined.json`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from engine.policies.scorers import Scorer
from engine.sequence import Sequence

FEATURES = ("selfeval_logit", "mean_logprob")
FILE = "combined.json"


def features(score: float | None, logprobs: list[float]) -> list[float] | None:
    """[logit of the self-evaluation score, mean token log-probability]; None without a score."""
    if score is None or not logprobs or not math.isfinite(score):
        return None
    p = min(max(score, 1e-6), 1 - 1e-6)
    return [math.log(p / (1 - p)), sum(logprobs) / len(logprobs)]


def newton_logistic(z: np.ndarray, t: np.ndarray, l2: float = 1e-2, iters: int = 50) -> np.ndarray:
    """L2-regularized logistic regression by Newton's method: weights for the columns of z."""
    w = np.zeros(z.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-z @ w))
        hess = (z * (p * (1 - p))[:, None]).T @ z + l2 * np.eye(len(w))
        w -= np.linalg.solve(hess, z.T @ (p - t) + l2 * w)
    return w


def within_pairs(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Every (right - wrong) feature difference inside a prompt (group g)."""
    diffs = [r - w for i in np.unique(g) for r in x[(g == i) & (y == 1)] for w in x[(g == i) & (y == 0)]]
    return np.array(diffs).reshape(-1, x.shape[1])


def fit_pairwise(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> dict:
    """The combined scorer's parameters from features x [samples, 2], right (1) or wrong (0) y and
    prompt ids g. Raises ValueError when no prompt has both a right and a wrong sample."""
    mu, sd = x.mean(0), x.std(0) + 1e-9
    d = within_pairs((x - mu) / sd, y, g)
    if not len(d):
        raise ValueError("no prompt has both a right and a wrong sample: nothing to fit")
    w = newton_logistic(np.vstack([d, -d]), np.r_[np.ones(len(d)), np.zeros(len(d))])
    return {"features": list(FEATURES), "mean": mu.tolist(), "std": sd.tolist(), "weights": w.tolist(),
            "pairs": len(d)}


class CombinedScorer(Scorer):
    """w . standardized [self-evaluation logit, mean log-probability]. At a checkpoint, the score
    there and the log-probability so far (the weights were fitted on complete samples). Its value
    ranks samples; it is not a probability (no bias: 0 is an average sample of the fit), so an
    Adaptive or Prune threshold with it is on this scale, not the self-evaluation score's."""

    name = "combined"
    needs_suffix = True

    def __init__(self, params: dict):
        if list(params.get("features", ())) != list(FEATURES):
            raise ValueError(f"a combined scorer over {list(FEATURES)} expected, "
                             f"got {params.get('features')}")
        self.params = params
        self.mean, self.std, self.weights = params["mean"], params["std"], params["weights"]

    @classmethod
    def load(cls, path: str | Path) -> CombinedScorer:
        """From a combined.json, or an adapter directory holding one."""
        path = Path(path)
        return cls(json.loads((path / FILE if path.is_dir() else path).read_text()))

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path = path / FILE if path.is_dir() else path
        path.write_text(json.dumps(self.params, indent=2) + "\n")
        return path

    def value(self, score: float | None, logprobs: list[float]) -> float | None:
        f = features(score, logprobs)
        if f is None:
            return None
        return sum(w * (v - m) / s for w, v, m, s in zip(self.weights, f, self.mean, self.std))

    def __call__(self, seq: Sequence, upto: int | None = None) -> float | None:
        if upto is None:
            return None if seq.score is None else self.value(seq.score[0], seq.logprobs)
        at = next((s for n, s in seq.checkpoint_scores if n == upto), None)
        return self.value(at, seq.logprobs[:upto])
