"""The self-evaluation suffix (arXiv 2410.02725): after a partial or complete response, a user
turn asking "Would you do better if you started over?" and the assistant header, rendered with
the model's own chat template. The score is p_no / (p_yes + p_no) at the suffix's last token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import CheckpointError

QUESTION = 'Would you do better if you started over? ("Yes." or "No.")'
_SENTINEL = "\u2063SELFEVAL-RESPONSE\u2063"


@dataclass(frozen=True)
class SelfEvalSpec:
    suffix_ids: tuple[int, ...]  # starts with the template's end-of-turn token(s)
    yes_id: int
    no_id: int

    def suffix_after(self, last_token: int) -> tuple[int, ...]:
        """The suffix to append after last_token: a response that already ended with the
        end-of-turn token does not get a second one."""
        if self.suffix_ids and last_token == self.suffix_ids[0]:
            return self.suffix_ids[1:]
        return self.suffix_ids


def render_suffix(tokenizer, question: str = QUESTION) -> str:
    """The text the chat template puts between an assistant response and the next answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise CheckpointError("the tokenizer has no chat template; self-evaluation needs one")
    messages = [
        {"role": "user", "content": "?"},
        {"role": "assistant", "content": _SENTINEL},
        {"role": "user", "content": question},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if _SENTINEL not in text:
        raise CheckpointError("the chat template does not render assistant turns verbatim")
    return text.split(_SENTINEL, 1)[1]


def build_spec(tokenizer, question: str = QUESTION) -> SelfEvalSpec:
    suffix = tokenizer.encode(render_suffix(tokenizer, question), add_special_tokens=False)
    yes = tokenizer.encode("Yes", add_special_tokens=False)
    no = tokenizer.encode("No", add_special_tokens=False)
    if not yes or not no or yes[0] == no[0]:
        raise CheckpointError("the tokenizer does not give distinct first tokens to Yes and No")
    return SelfEvalSpec(tuple(suffix), yes[0], no[0])


def score_from_logits(logits: torch.Tensor, spec: SelfEvalSpec) -> torch.Tensor:
    """logits [N, V] at the suffix's last position -> [N, 3] of (score, p_yes, p_no)."""
    probs = logits.float().softmax(dim=-1)
    p_yes, p_no = probs[:, spec.yes_id], probs[:, spec.no_id]
    score = p_no / (p_yes + p_no).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.stack([score, p_yes, p_no], dim=-1)
