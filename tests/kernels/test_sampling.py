"""The Triton sampler and the CPU sampler against the reference: the same tokens and logprobs for
every mix of greedy, temperature, top-k and top-p rows, and a row's token never depends on the
rows beside it."""

import pytest
import torch

from kernels import cpu_ops
from kernels.dispatch import HAS_TRITON
from kernels.sampling import logit_cutoff, sample_cpu, sample_ref, sample_triton

needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
SAMPLERS = [pytest.param(sample_triton, marks=needs_triton, id="triton"), pytest.param(sample_cpu, id="cpu")]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rows(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, vocab, generator=g)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.3, 0.5, 2.0, 1.0, 0.9][:n])
    top_k = torch.tensor([0, 0, 5, 0, 1, 50, 0, 7][:n])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 0.5, 0.3, 0.8][:n])
    seeds = torch.randint(0, 2**62, (n,), generator=g)
    steps = torch.randint(0, 5000, (n,), generator=g)
    return [t.to(DEVICE) for t in (logits, temperature, top_k, top_p, seeds, steps)]


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("vocab", [1, 37, 1000, 5003])
def test_sampler_matches_reference(sampler, vocab):
    for seed in range(3):
        args = _rows(8, vocab, seed)
        tok, lp = sampler(*args)
        ref_tok, ref_lp = sample_ref(*args)
        assert tok.tolist() == ref_tok.tolist()
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_cpu_sampler_on_all_greedy_all_sampled_and_empty_batches(temperature):
    g = torch.Generator().manual_seed(3)
    for rows in (0, 1, 64):
        args = (3 * torch.randn(rows, 501, generator=g), torch.full((rows,), temperature),
                torch.zeros(rows, dtype=torch.int64), torch.ones(rows),
                torch.randint(0, 2**62, (rows,), generator=g), torch.randint(0, 100, (rows,), generator=g))
        tok, lp = sample_cpu(*args)
        ref_tok, ref_lp = sample_ref(*args)
        assert tok.tolist() == ref_tok.tolist() and tok.dtype == ref_tok.dtype
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
        if temperature == 0.0:  # the caller's all-greedy flag gives the same bits
            tok2, lp2 = sample_cpu(*args, greedy=True)
            assert torch.equal(tok2, tok) and torch.equal(lp2, lp)


def test_engine_all_greedy_flag_agrees_with_the_float32_column():
    # the host's flag must say greedy exactly where the kernel's float32 check would, even at
    # the threshold (1e-5 rounds below itself in float32)
    from types import SimpleNamespace

    import numpy as np

    from engine.core import _SampleColumns
    from kernels.sampling import GREEDY_BELOW, greedy_rows_zeroed

    params = SimpleNamespace(top_k=0, top_p=1.0, logprobs=0)
    request = SimpleNamespace(params=params, num_prompt=1, track_confidence=False)
    below = GREEDY_BELOW * (1 - 1e-9)  # under the threshold in float64, on it in float32
    above = float(np.nextafter(np.float32(GREEDY_BELOW), 1))
    for temps in ([0.0], [0.0, 1e-6], [GREEDY_BELOW], [below], [above], [0.0, 0.5], [2e-5]):
        seqs = [SimpleNamespace(temperature=t, seed=0, request=request) for t in temps]
        cols = _SampleColumns(seqs, torch.device("cpu"))
        assert cols.greedy == bool((greedy_rows_zeroed(cols.temperature) == 0).all()), temps


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_token_is_independent_of_the_batch(sampler):
    args = _rows(8, 777, seed=11)
    alone = [sampler(*[a[i:i + 1] for a in args])[0].item() for i in range(8)]
    assert sampler(*args)[0].tolist() == alone


@needs_triton
def test_filters_keep_only_allowed_tokens():
    logits, temperature, _, _, seeds, _ = _rows(8, 300, seed=5)
    top_k = torch.full((8,), 3, device=DEVICE)
    top_p = torch.ones(8, device=DEVICE)
    allowed = logits.topk(3, dim=-1).indices
    for step in range(20):
        steps = torch.full((8,), step, device=DEVICE)
        tok, _ = sample_triton(logits, temperature, top_k, top_p, seeds, steps)
        assert (allowed == tok[:, None]).any(dim=-1).all()


def test_cutoff_keeps_the_top_p_prefix():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    cut = logit_cutoff(logits, torch.tensor([0]), torch.tensor([0.79]))
    assert (logits >= cut[:, None]).sum().item() == 2  # 0.5 + 0.3 reaches 0.79
    cut = logit_cutoff(logits, torch.tensor([1]), torch.tensor([0.99]))
    assert (logits >= cut[:, None]).sum().item() == 1


def test_sampling_follows_the_distribution():
    # The hash noise is a fair Gumbel: 4000 seeded draws of a 4-token distribution land within a
    # few percent of its probabilities (the reference: the kernel matches it token for token).
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 4000
    logits = probs.log().expand(n, -1).contiguous().to(DEVICE)
    ones = torch.ones(n, device=DEVICE)
    tok, _ = sample_ref(logits, ones, torch.zeros(n, dtype=torch.int64, device=DEVICE), ones,
                           torch.arange(n, device=DEVICE), torch.zeros(n, dtype=torch.int64, device=DEVICE))
    freq = torch.bincount(tok.cpu(), minlength=4).float() / n
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


@needs_triton
@pytest.mark.parametrize("shape", ["flat", "peaked", "ties"])
def test_filtered_rows_match_the_sorting_reference(shape):
    # The Triton sampler never sorts: it checks the Gumbel-max candidate against top-k / top-p and
    # moves to the best token above a rejected one. Flat rows with a small top-k reject many times,
    # tied logits sit on the cutoff, -inf logits are never drawn; chunks split the 6,000 tokens.
    g = torch.Generator().manual_seed(7)
    n, vocab = 16, 6000
    logits = torch.randn(n, vocab, generator=g) * {"flat": 0.3, "peaked": 6.0, "ties": 1.0}[shape]
    if shape == "ties":
        logits = logits.round()
    logits[:, ::97] = float("-inf")
    temperature = torch.tensor([1.0, 2.0, 0.7, 1.0] * 4)
    top_k = torch.tensor([1, 2, 5, 50, 0, 0, 0, 0, 3, 40, 1, 0, 7, 0, 2, 5999])
    top_p = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.1, 0.5, 0.9, 0.99, 0.5, 0.95, 0.2, 0.0, 0.3, 0.7, 1.0, 0.6])
    args = [t.to(DEVICE) for t in (logits, temperature, top_k, top_p)]
    for step in range(3):
        extra = [torch.arange(n, device=DEVICE) * 1009, torch.full((n,), step, device=DEVICE)]
        tok, lp = sample_triton(*args, *extra)
        ref_tok, ref_lp = sample_ref(*args, *extra)
        assert tok.tolist() == ref_tok.tolist()
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(logits.to(DEVICE).gather(1, tok[:, None])).all()


@needs_triton
def test_bfloat16_logits_sample_like_their_float32_values():
    args = _rows(8, 1000, seed=9)
    low = args[0].to(torch.bfloat16)
    tok, _ = sample_triton(low, *args[1:])
    assert tok.tolist() == sample_ref(low.float(), *args[1:])[0].tolist()


@pytest.mark.parametrize("sampler", [pytest.param(sample_ref, id="ref"), *SAMPLERS])
def test_the_top_hash_value_gives_finite_noise_not_a_random_token(sampler):
    # Seed 291, step 0 hashes token 2,927 of 4,096 to the top 24-bit value, whose uniform
    # (2^24 - 0.5) / 2^24 rounds to 1.0 in float32: unclamped, its Gumbel noise is +inf and it
    # beat a token 30 nats more likely. Clamped, the likely token wins, as it nearly always must.
    from kernels.sampling import _hash32, row_keys, uniform_from_bits
    seeds, steps = torch.tensor([291]), torch.tensor([0])
    bits = _hash32(row_keys(seeds, steps) ^ _hash32(torch.tensor(2927) * 0x2545F491 + 0x1B873593))
    assert int(bits >> 8) == (1 << 24) - 1
    assert 0 < float(uniform_from_bits(bits)) < 1
    logits = torch.zeros(1, 4096)
    logits[0, 7] = 30.0
    args = [logits, torch.tensor([1.0]), torch.tensor([0]), torch.tensor([1.0]), seeds, steps]
    tok, _ = sampler(*[t.to(DEVICE) for t in args])
    assert tok.tolist() == [7]


@pytest.mark.parametrize("sampler", [pytest.param(sample_ref, id="ref"), *SAMPLERS])
def test_temperatures_near_zero_sample_greedily(sampler):
    # 1e-40 is a float32 denormal: every logit / 1e-40 overflowed to -inf and argmax returned 0
    logits = -5 - torch.rand(4, 50, generator=torch.Generator().manual_seed(0))
    logits[:, 13] = -1.0
    temps = torch.tensor([1e-40, 1e-30, 1e-6, 0.0])
    off = torch.zeros(4, dtype=torch.long)
    args = [logits, temps, off, torch.ones(4), torch.arange(4), off]
    tok, _ = sampler(*[t.to(DEVICE) for t in args])
    assert tok.tolist() == [13, 13, 13, 13]


@pytest.mark.skipif(cpu_ops.extension() is None, reason="engine._cpu is not built")
@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_uniforms_are_the_references_bit_for_bit(threads):
    """engine._cpu's one-pass hash gives every uniform of the int64 reference, extremes included:
    the top 24-bit value (clamped below 1), the lowest, any seed and step, tails of any width."""
    from kernels.sampling import _hash32, row_keys, uniform_from_bits

    g = torch.Generator().manual_seed(4)
    seeds = torch.cat([torch.tensor([291, 0, 2**63 - 1, -(2**63)]),
                       torch.randint(-(2**62), 2**62, (60,), generator=g)])
    steps = torch.cat([torch.tensor([0, 0, 10**9, 7]), torch.randint(0, 10**6, (60,), generator=g)])
    keys = row_keys(seeds, steps)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for vocab in (1, 15, 4096, 5003):
            cols = _hash32(torch.arange(vocab, dtype=torch.int64) * 0x2545F491 + 0x1B873593)
            got = cpu_ops.sampling_uniforms(keys, cols)
            want = uniform_from_bits(_hash32(keys[:, None] ^ cols[None, :]))
            assert got.dtype == want.dtype and torch.equal(got, want), vocab
            if vocab == 4096:  # seed 291, step 0, token 2927: the top value, clamped
                assert got[0, 2927] == want[0, 2927] == 1.0 - 2.0**-24
    finally:
        torch.set_num_threads(before)
    assert cpu_ops.sampling_uniforms(keys.int(), cols) is None  # not int64: the torch path


def test_cpu_sampler_without_the_extension_and_with_nan_logits(monkeypatch):
    """The torch fallback gives the kernel's tokens; a NaN logit is never drawn (as in sample_ref)."""
    args = _rows(8, 1000, seed=21)
    args[0][2, 17] = float("nan")
    args[0][3, :] = float("nan")  # a row of NaN: the reference's argmax over -inf (token 0)
    fast = sample_cpu(*args)
    monkeypatch.setattr(cpu_ops, "sampling_uniforms", lambda *a: None)
    slow = sample_cpu(*args)
    ref = sample_ref(*args)
    assert fast[0].tolist() == slow[0].tolist() == ref[0].tolist()
    assert fast[0][2] != 17

