"""Seeded sampling: each row's noise depends only on (seed, step, token), never on the batch,
so a request with a seed gets the same tokens whatever else runs beside it. Gumbel-max over the
tempered logits, with top-k / top-p applied as a per-row cutoff on the tempered logit."""

import torch

from kernels.dispatch import HAS_TRITON, use_triton

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix on int64 tensors; constants < 2^31 keep products inside int64."""
    x = x & _MASK32
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x5BD1E995) & _MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One 32-bit key per row from its seed and step (int64 [B])."""
    return _hash32(_hash32(seeds ^ (seeds >> 32)) ^ _hash32(steps * 0x9E3779B + 0x632BE5AB))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1) from per-row seeds and steps (int64 [B])."""
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32(row_keys(seeds, steps)[:, None] ^ _hash32(cols * 0x2545F491 + 0x1B873593)[None, :])
    return ((bits >> 8).float() + 0.5) / float(1 << 24)


def _tempered(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return logits / torch.where(temperature <= 0, 1.0, temperature)[:, None]


def logit_cutoff(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The smallest tempered logit each row keeps under its top_k (0 = off) and top_p (1 = off):
    the k largest, and the smallest prefix whose mass reaches top_p (the top token always stays).
    -inf where a row filters nothing."""
    rows, vocab = scaled.shape
    k_on = (top_k > 0) & (top_k < vocab)
    p_on = top_p < 1.0
    cutoff = torch.full((rows,), float("-inf"), device=scaled.device)
    if not bool((k_on | p_on).any()):
        return cutoff
    sorted_logits = scaled.sort(dim=-1, descending=True).values
    ranks = torch.arange(vocab, device=scaled.device)[None, :]
    keep = ~(k_on[:, None] & (ranks >= top_k[:, None]))
    probs = sorted_logits.softmax(dim=-1)
    keep &= ~(p_on[:, None] & ((probs.cumsum(dim=-1) - probs) >= top_p[:, None]))
    keep[:, 0] = True  # the top token always stays (a top_p that rounds to 0 in float32 included)
    last_kept = keep.sum(dim=-1) - 1  # keep is a prefix of the sorted row
    kth = sorted_logits.gather(1, last_kept[:, None]).squeeze(1)
    return torch.where(k_on | p_on, kth, cutoff)


def sample_ref(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V]; per-row temperature (0 = greedy), top_k (0 = off), top_p (1 = off),
    seeds and steps (int64). Returns (tokens int64 [B], logprob of each token under the model's
    untempered distribution [B])."""
    logits = logits.float()
    scaled = _tempered(logits, temperature)
    cutoff = logit_cutoff(scaled, top_k, top_p)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, steps, logits.shape[-1])))
    perturbed = torch.where(scaled >= cutoff[:, None], scaled + gumbel, float("-inf"))
    tokens = torch.where(temperature <= 0, logits.argmax(dim=-1), perturbed.argmax(dim=-1))
    logprobs = logits.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _hash32_tl(x):
        x = x & 0xFFFFFFFF
        x = ((x ^ (x >> 16)) * 0x7FEB352D) & 0xFFFFFFFF
        x = ((x ^ (x >> 15)) * 0x5BD1E995) & 0xFFFFFFFF
        return x ^ (x >> 16)

    @triton.jit
    def _sample_kernel(logits_ptr, stride, temp_ptr, cutoff_ptr, key_ptr, tok_ptr, lp_ptr, vocab,
                       BLOCK: tl.constexpr):
        """One row: a single pass over the vocabulary keeps the Gumbel-max of the filtered tempered
        logits, the raw argmax (greedy) and an online log-sum-exp for the token's logprob."""
        r = tl.program_id(0)
        row_ptr = logits_ptr + r.to(tl.int64) * stride
        t = tl.load(temp_ptr + r)
        greedy = t <= 0
        t = tl.where(greedy, 1.0, t)
        cutoff = tl.load(cutoff_ptr + r)
        key = tl.load(key_ptr + r)
        best, best_idx = float("-inf"), 0
        top, top_idx, total = float("-inf"), 0, 0.0
        for v0 in range(0, vocab, BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            valid = cols < vocab
            x = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32)
            scaled = x / t
            bits = _hash32_tl(key ^ _hash32_tl(cols.to(tl.int64) * 0x2545F491 + 0x1B873593))
            u = ((bits >> 8).to(tl.float32) + 0.5) / 16777216.0
            z = tl.where(valid & (scaled >= cutoff), scaled - tl.log(-tl.log(u)), float("-inf"))
            z_max, z_idx = tl.max(z, 0, return_indices=True, return_indices_tie_break_left=True)
            x_max, x_idx = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            best_idx = tl.where(z_max > best, v0 + z_idx, best_idx)
            best = tl.maximum(z_max, best)
            new_top = tl.maximum(top, x_max)
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), 0)
            top_idx = tl.where(x_max > top, v0 + x_idx, top_idx)
            top = new_top
        token = tl.where(greedy, top_idx, best_idx)
        logit = tl.load(row_ptr + token).to(tl.float32)
        tl.store(tok_ptr + r, token.to(tl.int64))
        tl.store(lp_ptr + r, logit - top - tl.log(total))


def sample_triton(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    rows, vocab = logits.shape
    cutoff = logit_cutoff(_tempered(logits, temperature), top_k, top_p)
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    if rows:
        _sample_kernel[(rows,)](logits, logits.stride(0), temperature.float().contiguous(), cutoff,
                                row_keys(seeds, steps), tokens, logprobs, vocab,
                                BLOCK=min(4096, triton.next_power_of_2(vocab)))
    return tokens, logprobs


_column_keys: dict[tuple[int, torch.device], torch.Tensor] = {}


def sample_cpu(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_ref's tokens with less work (the path without Triton): greedy rows take the argmax
    and draw no noise, the per-token half of the noise hash is computed once per vocabulary,
    and the token's logprob is its logit minus the row's log-sum-exp (no [B, V] log_softmax)."""
    logits = logits.float()
    vocab = logits.shape[-1]
    tokens = logits.argmax(dim=-1)
    rows = torch.nonzero(temperature > 0).flatten()
    if rows.numel():
        key = (vocab, logits.device)
        if key not in _column_keys:
            cols = torch.arange(vocab, device=logits.device, dtype=torch.int64)
            _column_keys[key] = _hash32(cols * 0x2545F491 + 0x1B873593)
        every = rows.numel() == len(tokens)
        sub = logits if every else logits[rows]
        scaled = sub / temperature[rows][:, None]
        cutoff = logit_cutoff(scaled, top_k[rows], top_p[rows])
        bits = _hash32(row_keys(seeds[rows], steps[rows])[:, None] ^ _column_keys[key][None, :])
        gumbel = -torch.log(-torch.log(((bits >> 8).float() + 0.5) / float(1 << 24)))
        drawn = torch.where(scaled >= cutoff[:, None], scaled + gumbel, float("-inf")).argmax(dim=-1)
        if every:
            tokens = drawn
        else:
            tokens[rows] = drawn
    logprobs = logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return tokens, logprobs


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(logits):
        return sample_triton(logits, temperature, top_k, top_p, seeds, steps)
    return sample_cpu(logits, temperature, top_k, top_p, seeds, steps)
