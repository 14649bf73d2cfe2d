"""Seeded sampling: each row's noise depends only on (seed, step, token), never on the batch,
so a request with a seed gets the same tokens whatever else runs beside it. Gumbel-max over the
tempered logits, with top-k / top-p applied as a per-row cutoff on the tempered logit."""

import torch

from kernels import cpu_ops
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


# The largest float32 below 1. (2^24 - 1 + 0.5) / 2^24 rounds to 1.0 in float32, whose Gumbel noise
# -log(-log(1)) is +inf: one (row, token) in 2^24 would win whatever its probability (at a 128k
# vocabulary, 0.8% of unfiltered draws a uniformly random token). Clamped, the noise tops at 16.6.
U_MAX = 1.0 - 2.0**-24


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """Uniforms in (0, 1) from the top 24 of 32 hash bits (float32, never 0 or 1)."""
    return (((bits >> 8).float() + 0.5) / float(1 << 24)).clamp_(max=U_MAX)


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] uniforms in (0, 1) from per-row seeds and steps (int64 [B])."""
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _hash32(row_keys(seeds, steps)[:, None] ^ _hash32(cols * 0x2545F491 + 0x1B873593)[None, :])
    return uniform_from_bits(bits)


# Below this a temperature samples greedily (as vLLM's _SAMPLING_EPS): logits divided by a
# temperature near float32's smallest would all overflow to -inf and argmax would return token 0.
GREEDY_BELOW = 1e-5


def greedy_rows_zeroed(temperature: torch.Tensor) -> torch.Tensor:
    """temperature with every value under GREEDY_BELOW set to 0 (greedy), as a float32 tensor."""
    temperature = temperature.float()
    return torch.where(temperature < GREEDY_BELOW, 0.0, temperature)


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
    """logits [B, V]; per-row temperature (under GREEDY_BELOW = greedy), top_k (0 = off), top_p (1 = off),
    seeds and steps (int64). Returns (tokens int64 [B], logprob of each token under the model's
    untempered distribution [B])."""
    logits = logits.float()
    temperature = greedy_rows_zeroed(temperature)
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
        """_hash32 in uint32 arithmetic (products wrap mod 2^32, as the reference masks them)."""
        x = (x ^ (x >> 16)) * 0x7FEB352D
        x = (x ^ (x >> 15)) * 0x5BD1E995
        return x ^ (x >> 16)

    @triton.jit
    def _gumbel_tl(key, cols):
        bits = _hash32_tl(key ^ _hash32_tl(cols.to(tl.uint32) * 0x2545F491 + 0x1B873593))
        u = tl.minimum(((bits >> 8).to(tl.float32) + 0.5) / 16777216.0, 0.99999994)  # U_MAX
        return -tl.log(-tl.log(u))

    @triton.jit
    def _sample_partial_kernel(logits_ptr, stride, temp_ptr, key_ptr, part_ptr, vocab, chunk,
                               BLOCK: tl.constexpr):
        """One (row, chunk of the vocabulary): the chunk's raw max, sum of exp below it and argmax,
        tempered max and sum of exp, and the Gumbel-max candidate over every token of the chunk
        (sampled rows only). Writes 7 floats to part[row, chunk]."""
        r, c = tl.program_id(0), tl.program_id(1)
        row_ptr = logits_ptr + r.to(tl.int64) * stride
        t = tl.load(temp_ptr + r)
        sampled = t > 0
        t = tl.where(sampled, t, 1.0)
        key = tl.load(key_ptr + r).to(tl.uint32)
        raw_m, raw_s, raw_i = float("-inf"), 0.0, 0
        s_m, s_s = float("-inf"), 0.0
        z_m, z_i = float("-inf"), 0
        lo = c * chunk
        for v0 in range(lo, tl.minimum(lo + chunk, vocab), BLOCK):
            cols = v0 + tl.arange(0, BLOCK)
            valid = cols < vocab
            x = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32)
            x_max, x_idx = tl.max(x, 0, return_indices=True, return_indices_tie_break_left=True)
            new_m = tl.maximum(raw_m, x_max)
            raw_s = raw_s * tl.exp(raw_m - new_m) + tl.sum(tl.exp(x - new_m), 0)
            raw_i = tl.where(x_max > raw_m, v0 + x_idx, raw_i)
            raw_m = new_m
            if sampled:
                scaled = x / t
                new_m = tl.maximum(s_m, tl.max(scaled, 0))
                s_s = s_s * tl.exp(s_m - new_m) + tl.sum(tl.exp(scaled - new_m), 0)
                s_m = new_m
                z = tl.where(valid, scaled + _gumbel_tl(key, cols), float("-inf"))
                zb, zb_idx = tl.max(z, 0, return_indices=True, return_indices_tie_break_left=True)
                z_i = tl.where(zb > z_m, v0 + zb_idx, z_i)
                z_m = tl.maximum(z_m, zb)
        out = part_ptr + (r * tl.num_programs(1) + c) * 8
        tl.store(out, raw_m)
        tl.store(out + 1, raw_s)
        tl.store(out + 2, raw_i)  # stored as float: exact below 2^24 tokens
        tl.store(out + 3, s_m)
        tl.store(out + 4, s_s)
        tl.store(out + 5, z_m)
        tl.store(out + 6, z_i)

    @triton.jit
    def _sample_finish_kernel(logits_ptr, stride, temp_ptr, topk_ptr, topp_ptr, key_ptr, part_ptr,
                              tok_ptr, lp_ptr, vocab, num_chunks, C_PAD: tl.constexpr,
                              BLOCK: tl.constexpr):
        """One row: merge the chunks, then, for a row with top-k or top-p, check that the Gumbel-max
        candidate lies inside the kept set; while it does not, the next candidate is the Gumbel-max
        over the tokens whose tempered logit exceeds the rejected one's. Every kept token exceeds a
        rejected one, so this ends at the reference's token without sorting the vocabulary; one pass
        both checks a candidate and finds the next."""
        r = tl.program_id(0)
        row_ptr = logits_ptr + r.to(tl.int64) * stride
        c = tl.arange(0, C_PAD)
        c_mask = c < num_chunks
        part = part_ptr + (r * num_chunks + c) * 8
        raw_m = tl.load(part, mask=c_mask, other=float("-inf"))
        top = tl.max(raw_m, 0)
        raw_s = tl.load(part + 1, mask=c_mask, other=0.0)
        total = tl.sum(tl.where(raw_m > float("-inf"), raw_s * tl.exp(raw_m - top), 0.0), 0)
        greedy_tok = tl.load(part + 2, mask=c_mask, other=0.0)
        greedy_tok = tl.min(tl.where(raw_m == top, greedy_tok, 3.0e38), 0).to(tl.int32)
        t = tl.load(temp_ptr + r)
        token = greedy_tok
        if t > 0:
            z_m = tl.load(part + 5, mask=c_mask, other=float("-inf"))
            z_best = tl.max(z_m, 0)
            z_i = tl.load(part + 6, mask=c_mask, other=0.0)
            token = tl.min(tl.where(z_m == z_best, z_i, 3.0e38), 0).to(tl.int32)
            top_k = tl.load(topk_ptr + r)
            top_p = tl.load(topp_ptr + r)
            k_on = (top_k > 0) & (top_k < vocab)
            p_on = top_p < 1.0
            if k_on | p_on:
                s_m = tl.load(part + 3, mask=c_mask, other=float("-inf"))
                s_top = tl.max(s_m, 0)
                s_s = tl.load(part + 4, mask=c_mask, other=0.0)
                s_total = tl.sum(tl.where(s_m > float("-inf"), s_s * tl.exp(s_m - s_top), 0.0), 0)
                key = tl.load(key_ptr + r).to(tl.uint32)
                cand = tl.load(row_ptr + token).to(tl.float32) / t
                searching = True
                while searching:
                    above, mass = 0, 0.0
                    nxt_m, nxt_i = float("-inf"), token
                    for v0 in range(0, vocab, BLOCK):
                        cols = v0 + tl.arange(0, BLOCK)
                        valid = cols < vocab
                        scaled = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32) / t
                        gt = valid & (scaled > cand)
                        above += tl.sum(gt.to(tl.int32), 0)
                        mass += tl.sum(tl.where(gt, tl.exp(scaled - s_top), 0.0), 0)
                        z = tl.where(gt, scaled + _gumbel_tl(key, cols), float("-inf"))
                        zb, zb_idx = tl.max(z, 0, return_indices=True, return_indices_tie_break_left=True)
                        nxt_i = tl.where(zb > nxt_m, v0 + zb_idx, nxt_i)
                        nxt_m = tl.maximum(nxt_m, zb)
                    kept = (~k_on | (above < top_k)) & (~p_on | (above == 0) | (mass / s_total < top_p))
                    searching = ~kept
                    if searching:
                        token = nxt_i
                        cand = tl.load(row_ptr + token).to(tl.float32) / t
        logit = tl.load(row_ptr + token).to(tl.float32)
        tl.store(tok_ptr + r, token.to(tl.int64))
        tl.store(lp_ptr + r, logit - top - tl.log(total))


def sample_chunks(rows: int, vocab: int, block: int, target_programs: int = 512) -> int:
    """Chunks of the vocabulary per row: enough programs to fill the GPU at small batches."""
    return max(1, min(triton.cdiv(vocab, block), triton.cdiv(target_programs, max(rows, 1))))


def sample_triton(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_ref's tokens without sorting the vocabulary: one pass over chunks of each row, and a
    per-row check of the candidate against top-k / top-p (_sample_finish_kernel)."""
    logits = logits.float()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if not rows:
        return tokens, logprobs
    block = min(2048, triton.next_power_of_2(vocab))
    chunks = sample_chunks(rows, vocab, block)
    chunk = triton.cdiv(triton.cdiv(vocab, chunks), block) * block
    chunks = triton.cdiv(vocab, chunk)
    part = torch.empty(rows, chunks, 8, dtype=torch.float32, device=logits.device)
    temperature = greedy_rows_zeroed(temperature).contiguous()
    keys = row_keys(seeds, steps)
    _sample_partial_kernel[(rows, chunks)](logits, logits.stride(0), temperature, keys, part, vocab, chunk,
                                           BLOCK=block)
    _sample_finish_kernel[(rows,)](logits, logits.stride(0), temperature, top_k.contiguous(),
                                   top_p.float().contiguous(), keys, part, tokens, logprobs, vocab, chunks,
                                   C_PAD=max(2, triton.next_power_of_2(chunks)), BLOCK=block)
    return tokens, logprobs


_column_keys: dict[tuple[int, torch.device], torch.Tensor] = {}


def sample_cpu(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, steps: torch.Tensor, greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """sample_ref's tokens with less work (the path without Triton): greedy rows take the argmax
    and draw no noise, the per-token half of the noise hash is computed once per vocabulary,
    and the token's logprob is its logit minus the row's log-sum-exp (no [B, V] log_softmax).
    greedy: the caller knows every row is greedy (every temperature under GREEDY_BELOW in
    float32), so the temperatures are not looked at."""
    logits = logits.float()
    vocab = logits.shape[-1]
    rows = None
    if not greedy:
        temperature = greedy_rows_zeroed(temperature)
        rows = torch.nonzero(temperature > 0).flatten()
    every = rows is not None and rows.numel() == logits.shape[0] > 0
    # max(dim).indices is argmax (the first of equal maxima; a NaN wins, as in argmax), ~2x faster
    # on the CPU (torch 2.13, the two timed alone: 10 vs 21 ms over 64 x 128,256)
    tokens = None if every else logits.max(dim=-1).indices  # the greedy rows' (none: not computed)
    if rows is not None and rows.numel():
        key = (vocab, logits.device)
        if key not in _column_keys:
            cols = torch.arange(vocab, device=logits.device, dtype=torch.int64)
            _column_keys[key] = _hash32(cols * 0x2545F491 + 0x1B873593)
        sub = logits if every else logits[rows]
        scaled = sub / temperature[rows][:, None]
        cutoff = logit_cutoff(scaled, top_k[rows], top_p[rows])
        keys = row_keys(seeds[rows], steps[rows])
        noise = cpu_ops.sampling_uniforms(keys, _column_keys[key])  # one pass, the same bits
        if noise is None:
            noise = uniform_from_bits(_hash32(keys[:, None] ^ _column_keys[key][None, :]))
        noise.log_().neg_().log_().neg_()  # -log(-log(u)): the Gumbel noise, in place
        noise += scaled
        # sample_ref's where(scaled >= cutoff, ...): a NaN logit is dropped too, as there
        noise.masked_fill_((scaled >= cutoff[:, None]).logical_not_(), float("-inf"))
        drawn = noise.max(dim=-1).indices
        if every:
            tokens = drawn
        else:
            tokens[rows] = drawn
    logprobs = logits.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return tokens, logprobs


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
    seeds: torch.Tensor, steps: torch.Tensor, greedy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """greedy: every row is greedy, known on the host (the CPU path then skips the check)."""
    if use_triton(logits):
        return sample_triton(logits, temperature, top_k, top_p, seeds, steps)
    return sample_cpu(logits, temperature, top_k, top_p, seeds, steps, greedy)
