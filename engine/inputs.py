"""From what a caller sends to token ids the engine can serve: tokenizing, chat templates and
every check made before a request is queued. It needs the tokenizer and the engine's limits, not
the model, so a front in another process (engine.async_engine) validates without the engine."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from engine.errors import InvalidRequestError
from engine.policies.base import Policy
from engine.sampling import SamplingParams

Prompt = str | list[int]


@dataclass(frozen=True)
class Limits:
    """What validation needs to know of a built engine (small and picklable)."""

    vocab_size: int
    max_model_len: int
    num_blocks: int
    block_size: int
    suffix_len: int  # tokens of the self-evaluation suffix


class InputProcessor:
    def __init__(self, tokenizer, limits: Limits):
        self.tokenizer, self.limits = tokenizer, limits

    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            try:
                ids = self.tokenizer.encode(prompt, add_special_tokens=True)
            except Exception as e:  # e.g. a lone surrogate, which no UTF-8 tokenizer can take
                raise InvalidRequestError(f"the tokenizer cannot encode this prompt: {e}") from e
        elif isinstance(prompt, (list, tuple)) and all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise InvalidRequestError(f"a prompt is a string or a list of int token ids, got "
                                      f"{type(prompt).__name__} {str(prompt)[:60]}")
        if not ids:
            raise InvalidRequestError("the prompt is empty")
        vocab = self.limits.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        return ids

    def render_chat(self, conversation: list[dict]) -> list[int]:
        if not isinstance(conversation, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in conversation):
            raise InvalidRequestError("messages: a conversation is a list of {'role': str, 'content': str}")
        try:
            ids = self.tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True)
        except Exception as e:  # a template error is the input's, or the checkpoint's, not ours
            raise InvalidRequestError(f"the chat template cannot render this conversation: {e}") from e
        return list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)

    def validate(self, ids: list[int], params: SamplingParams, policy: Policy | None = None) -> None:
        """Raise InvalidRequestError for a request the engine cannot serve; queue nothing."""
        lim = self.limits
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be a SamplingParams, got {type(params).__name__}")
        if policy is not None and not isinstance(policy, Policy):
            raise InvalidRequestError(f"policy must be an engine.policies Policy (BestOfN, Adaptive, "
                                      f"Prune) or None, got {policy!r}")
        if policy is not None and params.n != 1:
            raise InvalidRequestError("a policy draws its own samples: leave n at 1")
        bad = [t for t in params.stop_token_ids if not 0 <= t < lim.vocab_size]
        if bad:
            raise InvalidRequestError(f"stop_token_ids {bad[:5]} are outside the vocabulary "
                                      f"[0, {lim.vocab_size})")
        if policy is not None and params.max_tokens < 1:
            raise InvalidRequestError("a policy judges the samples it draws: max_tokens must be >= 1")
        samples = policy.full_samples if policy is not None else params.n
        if samples > lim.num_blocks:  # each sample writes a block of its own
            raise InvalidRequestError(f"n={samples} samples cannot fit {lim.num_blocks} KV blocks; lower n")
        suffix = lim.suffix_len if (params.wants_score or params.score_at or policy is not None) else 0
        total = len(ids) + params.max_tokens + suffix
        if total > lim.max_model_len:
            raise InvalidRequestError(
                f"prompt of {len(ids)} tokens + max_tokens {params.max_tokens} + suffix {suffix} "
                f"= {total} exceeds max_model_len {lim.max_model_len}; shorten the prompt or "
                f"lower max_tokens")
        blocks, what = -(-total // lim.block_size), "one sample"
        if policy is not None or params.n > 1:  # the prompt's root beside one sample at least
            blocks, what = blocks + -(-len(ids) // lim.block_size) + 1, "one sample beside the prompt's root"
        if blocks > lim.num_blocks:
            raise InvalidRequestError(
                f"{what} needs {blocks} KV blocks but the cache has {lim.num_blocks}; "
                f"raise num_blocks or lower max_tokens")

    def default_max_tokens(self, ids: list[int], scored: bool) -> int:
        """What the context leaves after the prompt (and the suffix, if scored), as vLLM."""
        return max(self.limits.max_model_len - len(ids) - (self.limits.suffix_len if scored else 0), 0)
