"""Automatic prefix caching end to end: the same outputs with it on and off, prompt tokens taken
from the cache are reported and not computed, and a self-evaluation suffix is never cached."""

from dataclasses import replace

import pytest
import torch

from engine import Engine, SamplingParams
from engine.policies import BestOfN, Prune
from engine.profiler import StepProfiler


def _prompts(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    system = torch.randint(5, vocab, (37,), generator=g).tolist()
    return [system + torch.randint(5, vocab, (n,), generator=g).tolist() for n in (3, 9, 1, 14)]


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_outputs_are_the_same_with_caching_on_and_off(llama_dir, block_size):
    outs = {}
    for caching in (True, False):
        # no score cache: the second greedy run's scores are computed over the cached prompt blocks
        eng = Engine(str(llama_dir), block_size=block_size, num_blocks=4096 // block_size,
                     enable_prefix_caching=caching, score_cache_tokens=0)
        prompts = _prompts(eng.model.config.vocab_size)
        greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, score_at=(5,), score=True)
        sampled = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=3, n=3)
        runs = [eng.generate(prompts, greedy), eng.generate(prompts, greedy),  # the second hits
                eng.generate(prompts, sampled),
                eng.generate(prompts[:2], replace(sampled, n=1),
                             policy=[BestOfN(3), Prune(4, checkpoints=(4,), keep=0.5)])]
        outs[caching] = [[(s.token_ids, s.score, s.checkpoint_scores) for s in o.samples]
                         for run in runs for o in run]
        assert eng.num_free_blocks == 4096 // block_size
        cached = [o.stats.cached_prompt_tokens for o in runs[1]]
        if caching:
            assert all(c >= 37 // block_size * block_size for c in cached), cached
        else:
            assert cached == [0, 0, 0, 0]
    for on, off in zip(outs[True], outs[False]):
        for (toks_on, score_on, cp_on), (toks_off, score_off, cp_off) in zip(on, off):
            assert toks_on == toks_off
            assert score_on == pytest.approx(score_off, abs=1e-5)
            assert [c for c, _ in cp_on] == [c for c, _ in cp_off]


def test_cached_prompt_tokens_are_not_computed(llama_dir):
    eng = Engine(str(llama_dir), block_size=4, num_blocks=256)
    prompt = _prompts(eng.model.config.vocab_size)[1]  # 46 tokens
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    first = eng.generate([prompt], params)[0]
    eng.profiler = prof = StepProfiler()
    second = eng.generate([prompt], params)[0]
    assert first.stats.cached_prompt_tokens == 0
    assert second.stats.cached_prompt_tokens == 44  # every full block but the one with the last token
    assert prof.summary()["prefill_tokens"] == 2
    assert second.samples[0].token_ids == first.samples[0].token_ids


def test_a_scored_suffix_is_never_cached(llama_dir):
    eng = Engine(str(llama_dir), block_size=4, num_blocks=64)
    assert eng.block_manager.num_cached_blocks == 0
    eng.score([[7] * 8], [[9] * 4])  # 12 real tokens, then the suffix (3+ blocks), rolled back
    assert eng.block_manager.num_cached_blocks == 3
    eng.generate([[7] * 8], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, score=True))
    assert eng.block_manager.num_cached_blocks == 3 + 1  # 13 computed tokens: one more full block
