"""Policies over one request (best-of-N, adaptive, pruning) and the scorers that rank samples."""

from engine.policies.base import Policy, PolicyRun
from engine.policies.combined import CombinedScorer
from engine.policies.scorers import (
    ConfidenceScorer,
    MeanLogprobScorer,
    RewardModelScorer,
    Scorer,
    SelfEvalScorer,
    make_scorer,
)
from engine.policies.strategies import Adaptive, BestOfN, Prune

__all__ = [
    "Adaptive",
    "BestOfN",
    "CombinedScorer",
    "ConfidenceScorer",
    "MeanLogprobScorer",
    "Policy",
    "PolicyRun",
    "Prune",
    "RewardModelScorer",
    "Scorer",
    "SelfEvalScorer",
    "make_scorer",
]
