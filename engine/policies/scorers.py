"""How a policy ranks samples. Each scorer maps a sample (optionally its first `upto` generated
tokens) to a value, higher is better, or None while the value is not known yet."""

from __future__ import annotations

import math
from collections.abc import Sequence as Seq

import torch

from engine.sequence import Sequence


class Scorer:
    name = "scorer"
    needs_suffix = False  # the engine must score samples in place with the self-evaluation suffix
    needs_confidence = False  # the engine must record each token's top-k confidence

    def __call__(self, seq: Sequence, upto: int | None = None) -> float | None:
        raise NotImplementedError


class SelfEvalScorer(Scorer):
    """The model's own answer to "Would you do better if you started over?": P(No)."""

    name = "selfeval"
    needs_suffix = True

    def __call__(self, seq: Sequence, upto: int | None = None) -> float | None:
        if upto is None:
            return None if seq.score is None else seq.score[0]
        return next((s for n, s in seq.checkpoint_scores if n == upto), None)


class MeanLogprobScorer(Scorer):
    """Mean log-probability of the sampled tokens (under the untempered model)."""

    name = "logprob"

    def __call__(self, seq: Sequence, upto: int | None = None) -> float | None:
        lp = seq.logprobs if upto is None else seq.logprobs[:upto]
        return sum(lp) / len(lp) if lp else None


class ConfidenceScorer(Scorer):
    """DeepConf-style lowest group confidence: token confidence is minus the mean log-probability
    of the top-k candidates; the value is the lowest mean over sliding windows of tokens."""

    name = "confidence"
    needs_confidence = True

    def __init__(self, window: int = 16, top_k: int = 20):
        self.window, self.top_k = window, top_k

    def __call__(self, seq: Sequence, upto: int | None = None) -> float | None:
        conf = seq.confidences if upto is None else seq.confidences[:upto]
        if not conf:
            return None
        w = min(self.window, len(conf))
        sums = [sum(conf[:w])]
        for i in range(w, len(conf)):
            sums.append(sums[-1] + conf[i] - conf[i - w])
        return min(sums) / w


def token_confidence(logits: torch.Tensor, top_k: int = 20) -> torch.Tensor:
    """[B, V] logits -> [B] minus the mean top-k log-probability (high when peaked)."""
    logprobs = logits.float().log_softmax(dim=-1)
    return -logprobs.topk(min(top_k, logits.shape[-1]), dim=-1).values.mean(dim=-1)


class RewardModelScorer:
    """An external reward model: a local transformers sequence-classification checkpoint scoring
    (prompt, response) texts. Used to build training data where no verifier exists."""

    name = "reward_model"

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 16):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from engine.errors import CheckpointError

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, local_files_only=True).to(device).eval()
        except OSError as e:
            raise CheckpointError(f"cannot load a reward model from {path}: {e}") from e
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size = device, batch_size

    @torch.inference_mode()
    def score_texts(self, prompts: Seq[str], responses: Seq[str]) -> list[float]:
        """One reward per pair: the single logit, or P(last class) for a multi-class head."""
        out = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [p + r for p, r in zip(prompts[i:i + self.batch_size], responses[i:i + self.batch_size])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True).to(self.device)
            logits = self.model(**enc).logits.float()
            vals = logits[:, 0] if logits.shape[-1] == 1 else logits.softmax(-1)[:, -1]
            out.extend(float(v) for v in vals)
        return out


SCORERS = {"selfeval": SelfEvalScorer, "logprob": MeanLogprobScorer, "confidence": ConfidenceScorer}


def make_scorer(name_or_scorer: str | Scorer) -> Scorer:
    if isinstance(name_or_scorer, Scorer):
        return name_or_scorer
    if name_or_scorer not in SCORERS:
        raise ValueError(f"unknown scorer {name_or_scorer!r}; choose one of {sorted(SCORERS)} or pass a "
                         f"Scorer (the combined one: CombinedScorer.load(adapter_dir))")
    return SCORERS[name_or_scorer]()


def finite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
