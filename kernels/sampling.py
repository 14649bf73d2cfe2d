"""Seeded sampling: each row's noise depends only on (seed, step, token), never on the batch,
so a request with a seed gets the same tokens whatever else runs beside it."""

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix on int64 tensors; constants < 2^31 keep products inside int64."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1) from per-row seeds and steps (int64 [B])."""
    row = _hash32(_hash32(seeds ^ (seeds >> 32)) ^ _hash32(steps * 0x9E3779B + 0x632BE5AB))
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32(row[:, None] ^ _hash32(cols * 0x2545F491 + 0x1B873593)[None, :])
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


def sample_ref(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V]; per-row temperature (0 = greedy), top_k (0 = off), top_p (1 = off),
    seeds and steps (int64). Returns (tokens int64 [B], logprob of each token under the model's
    untempered distribution [B])."""
    logits = logits.float()
    vocab = logits.shape[-1]
    greedy = temperature <= 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    k_on = (top_k > 0) & (top_k < vocab)
    p_on = top_p < 1.0
    if bool((k_on | p_on).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device)[None, :]
        drop = k_on[:, None] & (ranks >= top_k[:, None])
        probs = sorted_logits.softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop |= p_on[:, None] & ((probs.cumsum(dim=-1) - probs) >= top_p[:, None])
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(1, order, sorted_logits)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, vocab)))
    sampled = (scaled + gumbel).argmax(dim=-1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), sampled)
    logprobs = logits.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_ref(logits, temperature, top_k, top_p, seeds, steps)
