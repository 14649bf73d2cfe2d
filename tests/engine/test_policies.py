"""Policies over the engine: with a scorer stub of known values BestOfN returns the argmax,
Adaptive stops at the round its threshold is met, Prune keeps exactly its fraction and frees the
blocks; stats add up; mixed policies in one batch give the same results as each alone."""

import random
from types import SimpleNamespace

import pytest
import torch

from engine import Engine, SamplingParams
from engine.errors import InvalidRequestError
from engine.policies import (
    Adaptive,
    BestOfN,
    ConfidenceScorer,
    MeanLogprobScorer,
    Prune,
    RewardModelScorer,
    Scorer,
)

MAX_TOKENS = 6
PARAMS = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=123)


class Stub(Scorer):
    """Known values by sample index; at a checkpoint, the checkpoint table."""

    def __init__(self, end, at=None):
        self.end, self.at = end, at or {}

    def __call__(self, seq, upto=None):
        if upto is None:
            return None if seq.generating else self.end[seq.index]
        return self.at[seq.index] if seq.num_generated >= upto else None


@pytest.fixture(scope="module")
def engine(llama_dir):
    # No score cache: tests here compare scores computed in different batches (test_score_cache.py
    # covers policies on cached scores).
    return Engine(str(llama_dir), block_size=4, num_blocks=256, max_batch_tokens=256,
                  score_cache_tokens=0)


def _prompt(engine, seed=0, n=11):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, engine.model.config.vocab_size, (n,), generator=g).tolist()


def test_best_of_n_returns_the_argmax(engine):
    free = engine.num_free_blocks
    [out] = engine.generate([_prompt(engine)], PARAMS, policy=BestOfN(4, scorer=Stub([0.2, 0.9, 0.5, 0.1])))
    assert out.best_index == 1 and out.best.index == 1
    assert [s.value for s in out.samples] == [0.2, 0.9, 0.5, 0.1]
    assert all(len(s.token_ids) == MAX_TOKENS for s in out.samples)
    assert out.stats.generated_tokens == 4 * MAX_TOKENS and out.stats.tokens_saved == 0
    assert len({tuple(s.token_ids) for s in out.samples}) > 1  # distinct seeds per sample
    assert engine.num_free_blocks == free


@pytest.mark.parametrize("threshold,drawn,rounds_used", [(0.85, 4, 3), (0.99, 8, 4), (0.05, 1, 1)])
def test_adaptive_stops_at_the_round_the_threshold_is_met(engine, threshold, drawn, rounds_used):
    free = engine.num_free_blocks
    stub = Stub([0.1, 0.5, 0.6, 0.9, 0.2, 0.3, 0.4, 0.7])
    policy = Adaptive(threshold, max_samples=8, rounds=(1, 1, 2, 4), scorer=stub)
    [out] = engine.generate([_prompt(engine, 1)], PARAMS, policy=policy)
    assert len(out.samples) == drawn == out.stats.samples_drawn
    assert out.best.value == max(stub.end[:drawn])
    temps = [s.temperature for s in out.samples]
    assert temps == sorted(temps) and temps[0] < 0.2  # annealed upward from near-greedy
    assert out.stats.generated_tokens + out.stats.tokens_saved == 8 * MAX_TOKENS
    assert engine.num_free_blocks == free


@pytest.mark.parametrize("keep,survivors", [(0.25, 2), (0.5, 4)])
def test_prune_keeps_exactly_the_fraction_and_frees_blocks(engine, keep, survivors):
    free = engine.num_free_blocks
    at = {i: v for i, v in enumerate([0.3, 0.8, 0.1, 0.7, 0.2, 0.6, 0.9, 0.4])}
    policy = Prune(8, checkpoints=(3,), keep=keep, scorer=Stub([0.5] * 8, at))
    [out] = engine.generate([_prompt(engine, 2)], PARAMS, policy=policy)
    kept = [s.index for s in out.samples if s.pruned_at is None]
    assert sorted(kept) == sorted(sorted(at, key=at.get, reverse=True)[:survivors])
    assert all(s.pruned_at == 3 and s.finish_reason == "pruned" for s in out.samples if s.pruned_at)
    assert out.stats.samples_pruned == 8 - survivors
    assert out.stats.generated_tokens == survivors * MAX_TOKENS + (8 - survivors) * 3
    assert out.stats.generated_tokens + out.stats.tokens_saved == 8 * MAX_TOKENS
    assert engine.num_free_blocks == free


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prune_ranks_the_same_samples_whatever_the_schedule(engine, llama_dir, async_scheduling):
    """A 42-token step budget advances 42 of 48 samples at a time: those end before the other
    six pass the checkpoint. Prune still ranks every sample that went on past it, so it keeps
    and picks what a roomy engine does; the ones that had ended only leave the pick."""
    rng = random.Random(0)
    at, end = dict(enumerate(rng.sample(range(48), 48))), rng.sample(range(48), 48)
    prompt = _prompt(engine, 5)
    narrow = Engine(str(llama_dir), block_size=4, num_blocks=256, max_batch_tokens=42,
                    async_scheduling=async_scheduling)
    free = narrow.num_free_blocks
    outs = [eng.generate([prompt], PARAMS, policy=Prune(48, checkpoints=(3,), keep=0.25,
                                                        scorer=Stub(end, at)))[0]
            for eng in (engine, narrow)]
    kept = sorted(at, key=at.get, reverse=True)[:12]
    for o in outs:
        assert sorted(s.index for s in o.samples if s.pruned_at is None) == sorted(kept)
        assert o.best.index == max(kept, key=lambda i: end[i]) and o.stats.samples_pruned == 36
    out = outs[1]
    ended = [s for s in out.samples if s.pruned_at is not None and s.finish_reason == "length"]
    cut = [s for s in out.samples if s.finish_reason == "pruned"]
    assert len(ended) + len(cut) == 36 and ended and cut  # the schedule let some end first
    assert all(s.pruned_at == MAX_TOKENS == len(s.token_ids) for s in ended)
    # Only the cut samples saved tokens: MAX_TOKENS - 3 each (fixed lengths).
    assert out.stats.tokens_saved == len(cut) * (MAX_TOKENS - 3)
    assert out.stats.generated_tokens + out.stats.tokens_saved == 48 * MAX_TOKENS
    assert narrow.num_free_blocks == free


@pytest.mark.parametrize("needs_suffix", [False, True])
def test_prune_ranks_what_was_still_generating_when_its_value_came(needs_suffix):
    """A token statistic has its value at c with token c, a self-evaluation score in the step that
    samples token c + 1: a sample that ended at exactly c + 1 tokens was still generating at the
    decision of a roomy engine in the first case, not in the second."""
    class Fake(Scorer):
        pass

    Fake.needs_suffix = needs_suffix
    c = 4
    samples = [SimpleNamespace(index=i, num_generated=n, live=live, pruned_at=None)
               for i, (n, live) in enumerate([(4, False), (5, False), (9, False), (5, True)])]
    run = SimpleNamespace(samples=samples, scorer=Fake(), value=lambda s, upto: 0.5)
    ranked = [s.index for s in Prune._past(run, c)]
    assert ranked == ([2, 3] if needs_suffix else [1, 2, 3])


def test_a_sample_pruned_while_it_waits_for_its_end_score_is_not_scored(engine):
    """Prune ranks a sample that ended past the checkpoint but still waits for its end score:
    ranked out, it is released at once (no end score), keeps its finish reason and leaves the pick."""
    class Early(Prune):
        def update(self, run):
            ended = [s for s in run.samples if s.finish_reason == "length" and s.pending_score]
            if ended and not run.state.get("dropped"):
                run.state["dropped"] = True
                run.drop(ended[0])
            if run.settled() and run.drawn == self.n:
                run.finish()

    free = engine.num_free_blocks
    params = SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, ignore_eos=True, seed=7)
    [out] = engine.generate([_prompt(engine, 9)], params, policy=Early(3, checkpoints=(2,), keep=1.0))
    dropped = [s for s in out.samples if s.pruned_at is not None]
    assert len(dropped) == 1 and dropped[0].finish_reason == "length" and dropped[0].score is None
    assert all(s.score is not None for s in out.samples if s.pruned_at is None)
    assert out.best.pruned_at is None and out.stats.samples_pruned == 1 and out.stats.tokens_saved == 0
    assert engine.num_free_blocks == free


def test_prune_with_self_evaluation_scores_in_place(engine):
    free = engine.num_free_blocks
    [out] = engine.generate([_prompt(engine, 3)], PARAMS, policy=Prune(4, checkpoints=(2,), keep=0.5))
    suffix = len(engine.spec.suffix_ids)
    assert out.stats.score_calls == 4 + 2  # every sample at the checkpoint, survivors at the end
    assert out.stats.suffix_tokens == out.stats.score_calls * suffix
    at = {s.index: dict(s.checkpoint_scores)[2] for s in out.samples}
    kept = [s for s in out.samples if s.pruned_at is None]
    assert min(at[s.index] for s in kept) >= max(at[s.index] for s in out.samples if s.pruned_at)
    assert out.best.score == max(s.score for s in kept)
    assert engine.num_free_blocks == free


def test_mixed_policies_in_one_batch_match_each_alone(engine):
    prompts = [_prompt(engine, 10 + i, n=5 + 4 * i) for i in range(4)]
    policies = [BestOfN(3), Adaptive(0.6, max_samples=4, rounds=(1, 1, 2)),
                Prune(4, checkpoints=(2, 4), keep=0.5, scorer="logprob"), None]
    params = SamplingParams(temperature=0.8, max_tokens=MAX_TOKENS, seed=7)
    together = engine.generate(prompts, params, policy=policies)
    alone = [engine.generate([p], params, policy=pol)[0] for p, pol in zip(prompts, policies)]
    for a, b in zip(together, alone):
        assert [s.token_ids for s in a.samples] == [s.token_ids for s in b.samples]
        assert a.best_index == b.best_index
        for x, y in zip(a.samples, b.samples):
            assert (x.score is None) == (y.score is None)
            if x.score is not None:
                assert x.score == pytest.approx(y.score, abs=1e-5)


def test_policy_input_errors(engine):
    with pytest.raises(InvalidRequestError, match="n at 1"):
        engine.generate([_prompt(engine)], SamplingParams(n=2), policy=BestOfN(2))
    with pytest.raises(InvalidRequestError, match="keep"):
        Prune(4, keep=0)
    with pytest.raises(InvalidRequestError, match="prompts but"):
        engine.generate([_prompt(engine)], PARAMS, policy=[BestOfN(2), BestOfN(2)])
    with pytest.raises(ValueError, match="unknown scorer"):
        BestOfN(2, scorer="nope")


def test_one_token_prompt_and_confidence_scorer(engine):
    [out] = engine.generate([[7]], PARAMS, policy=BestOfN(2, scorer="confidence"))
    assert all(len(s.token_ids) == MAX_TOKENS and s.value is not None for s in out.samples)


def test_logprob_and_confidence_scorers():
    class Seq:
        logprobs = [-1.0, -3.0, -2.0]
        confidences = [5.0, 1.0, 2.0, 6.0, 7.0]

    assert MeanLogprobScorer()(Seq) == -2.0
    assert MeanLogprobScorer()(Seq, upto=2) == -2.0
    assert ConfidenceScorer(window=2)(Seq) == 1.5  # windows: 3, 1.5, 4, 6.5
    assert ConfidenceScorer(window=10)(Seq) == pytest.approx(4.2)


def test_reward_model_scorer_loads_a_local_classifier(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from engine.model.loader import load_tokenizer
    from engine.testing.make_model import make_model

    model_dir = make_model(tmp_path / "base", "llama", seed=4)
    cfg = LlamaConfig(vocab_size=load_tokenizer(str(model_dir)).vocab_size + 8, hidden_size=32,
                      intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, num_labels=1)
    LlamaForSequenceClassification(cfg).save_pretrained(tmp_path / "rm")
    load_tokenizer(str(model_dir)).save_pretrained(tmp_path / "rm")
    rm = RewardModelScorer(str(tmp_path / "rm"))
    rewards = rm.score_texts(["Q: 1+1", "Q: 2+2"], [" 2", " 5 and a longer answer"])
    assert len(rewards) == 2 and rewards[0] != rewards[1]


@pytest.mark.parametrize("make", [lambda: BestOfN(3, scorer="logprob"),
                                  lambda: Prune(3, checkpoints=(2,), keep=0.5, scorer="logprob"),
                                  lambda: Adaptive(2.0, max_samples=3, rounds=(1, 2), scorer="logprob")])
def test_policies_wait_for_prompts_that_are_still_queued(llama_dir, make):
    # A 48-token step budget prefills about four 11-token prompts per step: the later requests'
    # samples are asked for before their prompt is cached and must still all be drawn.
    eng = Engine(str(llama_dir), block_size=4, num_blocks=256, max_batch_tokens=48)
    free = eng.num_free_blocks
    outs = eng.generate([_prompt(eng, 40 + i) for i in range(16)], PARAMS, policy=make())
    for out in outs:
        assert out.stats.samples_drawn == len(out.samples) == 3
        assert out.best.index in {s.index for s in out.samples if s.pruned_at is None}
    assert eng.num_free_blocks == free


def test_a_policy_that_raises_fails_its_request_only(engine):
    class Broken(BestOfN):
        def update(self, run):
            if any(s.num_generated >= 2 for s in run.samples):
                raise ZeroDivisionError("bug in a user policy")
            super().update(run)

    free = engine.num_free_blocks
    prompts = [_prompt(engine, 1), _prompt(engine, 2)]
    bad, good = engine.generate(prompts, PARAMS, policy=[Broken(3), BestOfN(2)])
    assert "ZeroDivisionError" in bad.error and {s.finish_reason for s in bad.samples} == {"error"}
    assert good.error is None and all(s.finish_reason == "length" for s in good.samples)
    assert engine.num_free_blocks == free


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_root_takes_no_slot_with_max_num_seqs_one(llama_dir, async_scheduling):
    """A policy's root holds its prompt's cache and computes nothing after it: with one slot
    and a cache that preempts, its samples still run in turn (before, the root kept its own
    preempted sample out of the only slot and the engine never finished)."""
    eng = Engine(str(llama_dir), block_size=16, num_blocks=7, max_num_seqs=1,
                 async_scheduling=async_scheduling)
    rid = eng.add_request([131, 184, 364, 116, 211, 143, 369, 329, 52],
                          SamplingParams(temperature=0.0, top_k=50, max_tokens=13, seed=347, ignore_eos=True),
                          Adaptive(0.99, max_samples=3, rounds=(2, 2, 1), scorer="selfeval"))
    plain = eng.add_request([126, 258, 355, 45, 119, 222, 113],
                            SamplingParams(temperature=1.5, max_tokens=8, seed=752, ignore_eos=True))
    done, steps = {}, 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            done[out.request_id] = out
        steps += 1
        assert steps < 300, "the engine stopped making progress"
    assert set(done) == {rid, plain} and eng.num_free_blocks == 7
    assert done[rid].samples and all(s.finish_reason == "length" for s in done[rid].samples)
