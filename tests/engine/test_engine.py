"""Engine behaviour end to end on a small random model (CPU)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import Engine, InvalidRequestError, SamplingParams
from engine.sampling import seeds_per_prompt

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def eng(llama_dir):
    # No score cache: tests here score the same tokens in two ways and compare (it would hand the
    # first score back; test_score_cache.py covers it).
    return Engine(str(llama_dir), block_size=4, num_blocks=1024, score_cache_tokens=0)


def _prompts(eng, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, eng.model.config.vocab_size, (n,), generator=g).tolist() for n in lengths]


def test_scoring_mid_generation_leaves_decoding_unchanged(eng):
    prompts = _prompts(eng, [9, 30, 4])
    plain = eng.generate(prompts, GREEDY)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, score_at=(1, 5, 12))
    scored = eng.generate(prompts, params)
    for a, b in zip(plain, scored):
        assert a.samples[0].token_ids == b.samples[0].token_ids
        assert [c for c, _ in b.samples[0].checkpoint_scores] == [1, 5, 12]
    assert scored[0].stats.score_calls == 3
    assert eng.num_free_blocks == 1024


def test_checkpoint_score_equals_scoring_the_prefix(eng):
    prompt = _prompts(eng, [12])[0]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, score_at=(6,))
    out = eng.generate([prompt], params)[0].samples[0]
    direct = eng.score([prompt], [out.token_ids[:6]])[0]
    assert out.checkpoint_scores[0][1] == pytest.approx(direct, abs=1e-5)


def test_score_equals_transformers_on_prompt_response_suffix(eng, llama_dir):
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    prompt, response = "Q: 12+7 = ?", "The answer is 19"
    got = eng.score([prompt], [response])[0]
    ids = (eng.tokenizer.encode(prompt) + eng.tokenizer.encode(response, add_special_tokens=False)
           + list(eng.spec.suffix_ids))
    with torch.no_grad():
        probs = hf(torch.tensor([ids])).logits[0, -1].float().softmax(-1)
    p_yes, p_no = probs[eng.spec.yes_id].item(), probs[eng.spec.no_id].item()
    assert got == pytest.approx(p_no / (p_yes + p_no), abs=1e-5)
    assert 0.0 <= got <= 1.0


def test_parallel_samples_share_the_prompt_blocks(llama_dir):
    eng = Engine(str(llama_dir), block_size=16, num_blocks=64)
    prompt = _prompts(eng, [100])[0]  # 6 full blocks + 1 partial
    eng.add_request(prompt, SamplingParams(n=8, max_tokens=5, ignore_eos=True, score=False, seed=1))
    eng.step()  # prefill once, fork 8 samples, each samples its first token
    assert eng.block_manager.num_blocks - eng.num_free_blocks == 7
    eng.step()  # each sample writes its own copy of the partial last block only
    assert eng.block_manager.num_blocks - eng.num_free_blocks == 6 + 8
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.num_free_blocks == 64


def test_seeded_samples_do_not_depend_on_the_batch(eng):
    params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, max_tokens=12, seed=7,
                            ignore_eos=True)
    target = _prompts(eng, [10])[0]
    alone = eng.generate([target], params)[0]
    others = _prompts(eng, [3, 25, 7], seed=1)
    mixed = eng.generate(others[:2] + [target] + others[2:], params)[2]
    assert alone.samples[0].token_ids == mixed.samples[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    a, b = eng.generate([target, target], unseeded)
    assert a.samples[0].token_ids != b.samples[0].token_ids


def test_params_per_prompt_and_seeds_made_distinct_per_prompt(eng):
    target = _prompts(eng, [10])[0]
    shared = SamplingParams(temperature=1.0, max_tokens=12, seed=7, ignore_eos=True)
    a, b = eng.generate([target, target], shared)
    assert a.samples[0].token_ids == b.samples[0].token_ids  # one seed: the same draws
    spread = seeds_per_prompt(shared, 2)
    assert len({sp.seed for sp in spread}) == 2 and spread == seeds_per_prompt(shared, 2)
    c, d = eng.generate([target, target], spread)
    assert c.samples[0].token_ids != d.samples[0].token_ids
    assert eng.generate([target], spread[1])[0].samples[0].token_ids == d.samples[0].token_ids
    assert seeds_per_prompt(SamplingParams(), 3) == [SamplingParams()] * 3
    short = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    outs = eng.generate([target, target], [short, GREEDY])
    assert [len(o.samples[0].token_ids) for o in outs] == [3, 16]
    with pytest.raises(InvalidRequestError, match="2 prompts but 3 sampling params"):
        eng.generate([target, target], [short] * 3)


def test_n_samples_differ_and_best_is_the_highest_score(eng):
    out = eng.generate([_prompts(eng, [8])[0]],
                       SamplingParams(temperature=1.0, n=4, max_tokens=8, seed=3, ignore_eos=True))[0]
    assert len(out.samples) == 4 and len({tuple(s.token_ids) for s in out.samples}) > 1
    assert all(s.score is not None for s in out.samples)
    assert out.best.score == max(s.score for s in out.samples)
    assert out.stats.generated_tokens == 32


def test_preemption_recomputes_and_gives_the_same_tokens(eng, llama_dir):
    prompts = _prompts(eng, [20, 18, 25, 22], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = [o.samples[0].token_ids for o in eng.generate(prompts, params)]
    small = Engine(str(llama_dir), block_size=4, num_blocks=30)  # 12 blocks per full sequence
    outs = small.generate(prompts, params)
    assert [o.samples[0].token_ids for o in outs] == expected
    assert sum(o.stats.preemptions for o in outs) > 0
    assert small.num_free_blocks == 30


def test_chunked_prefill_gives_the_same_tokens(eng, llama_dir):
    prompts = _prompts(eng, [150, 3, 90], seed=3)
    expected = [o.samples[0].token_ids for o in eng.generate(prompts, GREEDY)]
    chunked = Engine(str(llama_dir), block_size=4, num_blocks=1024, max_batch_tokens=48)
    assert [o.samples[0].token_ids for o in chunked.generate(prompts, GREEDY)] == expected


def test_stop_conditions(eng):
    prompt = _prompts(eng, [6])[0]
    free = eng.generate([prompt], GREEDY)[0].samples[0]
    toks = free.token_ids
    k = next(i for i in range(1, len(toks)) if toks[i] not in toks[:i])  # first new token
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, stop_token_ids=[toks[k]]))
    assert out[0].samples[0].token_ids == toks[:k + 1]
    assert out[0].samples[0].finish_reason == "stop"
    text = eng.tokenizer.decode(free.token_ids[3:6])
    assert text.strip(), "the random model should produce visible text"
    out = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16, stop=text.strip()))
    assert out[0].samples[0].finish_reason == "stop"
    assert text.strip() not in out[0].samples[0].text
    assert free.finish_reason == "length" and len(free.token_ids) == 16


def test_bad_requests_raise_and_harm_nobody(eng):
    good = _prompts(eng, [5])[0]
    with pytest.raises(InvalidRequestError, match="max_model_len"):
        eng.generate([good, [1] * 5000], GREEDY)
    assert not eng.has_unfinished_requests()  # nothing of that call was queued
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        eng.add_request([10**6], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        eng.add_request([], GREEDY)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    assert eng.generate([good], GREEDY)[0].samples[0].finish_reason == "length"
    assert eng.num_free_blocks == 1024


def test_abort_frees_the_request(eng):
    rid = eng.add_request(_prompts(eng, [10])[0], SamplingParams(n=3, max_tokens=50, ignore_eos=True))
    other = eng.add_request(_prompts(eng, [7])[0], GREEDY)
    eng.step()
    eng.abort(rid)
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert [o.request_id for o in outs] == [other]
    assert eng.num_free_blocks == 1024


def test_chat_applies_the_template(eng):
    conv = [{"role": "user", "content": "Hello"}]
    out = eng.chat([conv], GREEDY)[0]
    rendered = eng.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert out.prompt_token_ids == eng.tokenizer.encode(rendered, add_special_tokens=False)
    assert len(out.samples[0].token_ids) == 16


def test_in_flight_score_of_running_samples(eng):
    prompt = _prompts(eng, [14], seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, n=2, score=False)
    plain = eng.generate([prompt], params)[0]
    rid = eng.add_request(prompt, params)
    for _ in range(4):  # prefill + 3 decodes: each sample has 4 tokens
        eng.step()
    assert eng.score_in_flight(rid) == 2
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    for a, b in zip(plain.samples, outs[0].samples):
        assert a.token_ids == b.token_ids
        assert [c for c, _ in b.checkpoint_scores] == [4]
    direct = eng.score([prompt], [plain.samples[0].token_ids[:4]])[0]
    assert outs[0].samples[0].checkpoint_scores[0][1] == pytest.approx(direct, abs=1e-5)
    with pytest.raises(InvalidRequestError, match="not running"):
        eng.score_in_flight(rid)


def test_concurrent_callers_are_serialized(llama_dir):
    import threading

    eng = Engine(str(llama_dir), block_size=4, num_blocks=256)
    prompts = _prompts(eng, [5, 9, 3, 12], seed=8)
    expected = [o.samples[0].token_ids for o in eng.generate(prompts, GREEDY)]
    results, errors = {}, []

    def call(i):
        try:
            results[i] = [o.samples[0].token_ids for o in eng.generate(prompts, GREEDY)]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(results[i] == expected for i in range(4))
    assert eng.num_free_blocks == 256 and not eng.has_unfinished_requests()


def test_a_top_p_that_rounds_to_zero_keeps_the_top_token(eng):
    prompt = _prompts(eng, [6], seed=9)[0]
    greedy = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    tiny = eng.generate([prompt], SamplingParams(temperature=1.0, top_p=1e-300, max_tokens=5,
                                                 ignore_eos=True, seed=1))
    assert tiny[0].samples[0].token_ids == greedy[0].samples[0].token_ids
