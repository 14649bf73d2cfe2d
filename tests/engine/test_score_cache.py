"""The score cache (EngineConfig.score_cache_tokens): a sample scored again at the same tokens takes
the score it got before, with no suffix computed; the outputs are those of an engine that computes
every score (the oracle: recomputation), policies keep and pick the same samples, streaming and
final-only steps deliver requests whose last sample ended on a cached score, the cache holds at
most its tokens, and an undone step takes its entries back."""

import pytest
from test_fault_injection import reject_temperature

from engine import Engine, SamplingParams
from engine.errors import InvalidRequestError
from engine.policies import Prune
from engine.scheduler import ScoreCache

PARAMS = SamplingParams(temperature=1.0, max_tokens=7, n=3, seed=11, score=True, score_at=(2, 4))


@pytest.fixture(scope="module")
def engines(llama_dir):
    return (Engine(str(llama_dir), block_size=4, num_blocks=256),
            Engine(str(llama_dir), block_size=4, num_blocks=256, score_cache_tokens=0))


def _prompt(eng, seed=0):
    return [5 + (seed * 31 + 7 * j) % (eng.model.config.vocab_size - 5) for j in range(9 + seed)]


def _view(out):
    return [(s.token_ids, s.finish_reason, s.score, s.checkpoint_scores) for s in out.samples]


def test_a_repeated_request_takes_every_score_from_the_cache(engines):
    cached, plain = engines
    prompt = _prompt(cached, 1)
    first, again = cached.generate([prompt], PARAMS)[0], cached.generate([prompt], PARAMS)[0]
    # 3 samples x (2 checkpoints + the end)
    assert first.stats.score_calls == 9 and first.stats.cached_scores == 0
    assert again.stats.score_calls == 0 and again.stats.cached_scores == 9
    assert again.stats.suffix_tokens == 0
    assert _view(again) == _view(first)
    # the oracle: an engine that computes every score, twice
    for out in (plain.generate([prompt], PARAMS)[0], plain.generate([prompt], PARAMS)[0]):
        assert out.stats.cached_scores == 0 and out.stats.score_calls == 9
        for (toks, reason, score, cps), (toks2, reason2, score2, cps2) in zip(_view(out), _view(first)):
            assert toks == toks2 and reason == reason2
            assert score == pytest.approx(score2, abs=1e-5)
            assert [c for c, _ in cps] == [c for c, _ in cps2]
            assert [v for _, v in cps] == pytest.approx([v for _, v in cps2], abs=1e-5)


def test_prune_keeps_and_picks_the_same_samples_on_cached_scores(engines):
    cached, plain = engines
    prompt = _prompt(cached, 2)
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=5, ignore_eos=True)
    runs = [eng.generate([prompt], params, policy=Prune(6, checkpoints=(3,), keep=0.5))[0]
            for eng in (cached, cached, plain)]
    assert runs[1].stats.score_calls == 0 and runs[1].stats.cached_scores == runs[0].stats.score_calls > 0

    def kept(out):
        return [s.index for s in out.samples if s.finish_reason != "pruned"]

    assert kept(runs[0]) == kept(runs[1]) == kept(runs[2])
    assert runs[0].best_index == runs[1].best_index == runs[2].best_index
    assert [s.token_ids for s in runs[1].samples if s.finish_reason != "pruned"] == \
        [s.token_ids for s in runs[2].samples if s.finish_reason != "pruned"]
    assert cached.num_free_blocks == plain.num_free_blocks == 256


def test_a_pair_scored_before_is_not_computed_again(engines):
    # Engine.score (POST /v1/score): a request that only asks for a score, served from the queue
    cached, plain = engines
    prompt, response = _prompt(cached, 4), [9, 8, 7, 6]
    first = cached.score([prompt], [response])[0]
    only = SamplingParams(max_tokens=0, score=True)
    again = cached.generate([prompt + response], only)[0]
    assert again.stats.cached_scores == 1 and again.stats.score_calls == 0
    assert again.samples[0].score == first
    assert plain.score([prompt], [response])[0] == pytest.approx(first, abs=1e-5)
    assert cached.num_free_blocks == 256


@pytest.mark.parametrize("streaming", [True, False])
def test_a_request_whose_last_score_is_cached_is_delivered(engines, streaming):
    # its last samples end in a step that computes nothing for them (no row): the step still
    # delivers the request, streaming or final-only
    cached, _ = engines
    prompt = _prompt(cached, 3)
    expect = cached.generate([prompt], PARAMS)[0]
    rid = cached.add_request(prompt, PARAMS)
    final = None
    for _ in range(100):
        for d in (cached.step_deltas() if streaming else cached.step()):
            out = d.output if streaming else d
            if d.request_id == rid and (d.finished if streaming else True):
                final = out
        if not cached.has_unfinished_requests():
            break
    assert final is not None and final.stats.cached_scores == 9
    assert _view(final) == _view(expect)
    assert cached.num_free_blocks == 256


def test_the_cache_holds_at_most_its_tokens_least_recently_used_first():
    cache = ScoreCache(max_tokens=9)
    cache.put([1, 2, 3], (0.1, 0.1, 0.9))
    cache.put([1, 2, 3, 4], (0.2, 0.2, 0.8))
    assert cache.get([1, 2, 3]) == (0.1, 0.1, 0.9)  # now the most recently used
    cache.put([5, 6, 7], (0.3, 0.3, 0.7))  # 10 tokens > 9: [1, 2, 3, 4], the least recent, goes
    assert cache.get([1, 2, 3, 4]) is None and cache.tokens == 6 and len(cache) == 2
    cache.put(list(range(10)), (0.5, 0.5, 0.5))  # longer than the whole cache: not kept
    assert len(cache) == 2 and cache.tokens == 6


def test_an_undone_step_takes_its_entries_back():
    cache = ScoreCache(max_tokens=8)
    cache.put([1, 2], (0.1, 0.1, 0.9))
    cache.put([3, 4], (0.2, 0.2, 0.8))
    cache.begin()
    cache.put([1, 2], (0.9, 0.9, 0.1))  # replaced
    cache.put([5, 6, 7, 8, 9], (0.3, 0.3, 0.7))  # added, and [3, 4] dropped for room
    cache.undo()
    assert cache.get([1, 2]) == (0.1, 0.1, 0.9) and cache.get([3, 4]) == (0.2, 0.2, 0.8)
    assert cache.get([5, 6, 7, 8, 9]) is None and cache.tokens == 4


@pytest.mark.parametrize("bad", [-1, 1.5, True, "big"])
def test_score_cache_tokens_is_checked(llama_dir, bad):
    with pytest.raises(InvalidRequestError, match="score_cache_tokens"):
        Engine(str(llama_dir), score_cache_tokens=bad)


def test_a_failed_step_and_its_probes_deliver_a_request_served_from_the_cache(llama_dir, monkeypatch):
    # a step fails (another request's sampling raises): the probes that find the culprit serve no
    # cached score (they would commit it unseen); the request served from the cache is delivered
    eng = Engine(str(llama_dir), block_size=4, num_blocks=64)
    prompt, response = [5, 6, 7, 8, 9], [11, 12, 13]
    first = eng.score([prompt], [response])[0]
    reject_temperature(eng, monkeypatch)  # request b below fails every step it is in
    a = eng.add_request(prompt + response, SamplingParams(max_tokens=0, score=True))
    b = eng.add_request([1, 2, 3], SamplingParams(temperature=0.5, max_tokens=4, ignore_eos=True))
    got = {}
    for _ in range(30):
        got.update((o.request_id, o) for o in eng.step())
        if not eng.has_unfinished_requests():
            break
    assert sorted(got) == [a, b] and not eng.has_unfinished_requests()
    assert got[a].samples[0].score == first and got[a].stats.cached_scores == 1
    assert "unsupported temperature" in got[b].error
    assert eng.num_free_blocks == 64
