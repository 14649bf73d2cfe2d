"""Streaming deltas: what every step reports adds up to the final output, text included, for
multi-byte text, stop strings and n > 1; the detokenizer is incremental and exact."""

import random
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import Engine, SamplingParams
from engine.detokenizer import BytePieces, IncrementalDetokenizer
from engine.errors import InvalidRequestError
from engine.policies import Prune

PIECES = ["a", "é", "日本", "🙂", " ", "Yes", "No", "x", "\n", "1", "ß", "€"]


@pytest.fixture(scope="module")
def eng(llama_dir):
    return Engine(str(llama_dir), block_size=4, num_blocks=512)


def _stream(eng, prompts, params, policy=None):
    """Step until done; (final outputs by request id, deltas joined by (request id, index))."""
    ids = [eng.add_request(p, params, policy) for p in prompts]
    joined, finals, ends = {}, {}, {}
    while eng.has_unfinished_requests():
        for delta in eng.step_deltas():
            for d in delta.samples:
                key = (delta.request_id, d.index)
                text, toks = joined.get(key, ("", []))
                assert key not in ends or not (d.token_ids or d.text), "text after the sample ended"
                joined[key] = (text + d.text, toks + d.token_ids)
                if d.finish_reason is not None:
                    assert key not in ends, "a finish reason reported twice"
                    ends[key] = d.finish_reason
            if delta.finished:
                finals[delta.request_id] = delta.output
    assert sorted(finals) == sorted(ids)
    return finals, joined, ends


def test_random_token_ids_detokenize_exactly(eng):
    rng = random.Random(0)
    vocab = eng.tokenizer.vocab_size
    for _ in range(100):
        prompt = eng.tokenizer.encode(rng.choice(PIECES), add_special_tokens=False)
        if rng.random() < 0.5:
            text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))
            ids = eng.tokenizer.encode(text, add_special_tokens=False)
        else:  # arbitrary bytes: characters split across tokens, some never completed
            ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
        d = IncrementalDetokenizer(eng.tokenizer, prompt)
        got = "".join(d.push([t]) for t in ids) + d.push([], final=True)
        assert got == d.text == eng.tokenizer.decode(ids, skip_special_tokens=True)
        d = IncrementalDetokenizer(eng.tokenizer, prompt)  # several tokens a push: the general path
        got = "".join(d.push(ids[i:i + 3]) for i in range(0, len(ids), 3)) + d.push([], final=True)
        assert got == d.text == eng.tokenizer.decode(ids, skip_special_tokens=True)


def test_byte_pieces_emit_the_streams_text_token_by_token(eng):
    # the table stands in for DecodeStream on whole-character tokens: every push returns what the
    # stream alone returns (one token a push, several, with stop strings), and the text is the
    # response's own decode, also after a prompt that ends inside a character
    tok = eng.tokenizer
    pieces = BytePieces.of(tok)
    assert pieces is not None  # the test tokenizer decodes with ByteLevel
    rng = random.Random(1)
    specials = [t for t in (tok.bos_token_id, tok.eos_token_id) if t is not None]
    used = 0
    for case in range(300):
        if rng.random() < 0.5:
            prompt = tok.encode(rng.choice(PIECES), add_special_tokens=False)
        else:  # may end inside a character
            prompt = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 6))]
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12)))
        ids = tok.encode(text, add_special_tokens=False) if rng.random() < 0.5 else \
            [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 20))]
        ids = [rng.choice(specials) if specials and rng.random() < 0.05 else t for t in ids]
        stop = [rng.choice(PIECES) + rng.choice(PIECES)] if case % 3 == 0 else []
        chunks, i = [], 0
        while i < len(ids):
            n = rng.choice([1, 1, 2, 3])
            chunks.append(ids[i:i + n])
            i += n
        plain = IncrementalDetokenizer(tok, prompt, stop)
        fast = IncrementalDetokenizer(tok, prompt, stop, pieces=pieces)
        assert [plain.push(c) for c in chunks] == [fast.push(c) for c in chunks]
        assert plain.push([], final=True) == fast.push([], final=True)
        assert plain.text == fast.text
        if not stop:
            assert fast.text == tok.decode(ids, skip_special_tokens=True)
        used += sum(pieces.get(t) is not None for t in ids)
    assert used > 100  # the table answered for most whole-character tokens
    assert all(v is None for k, v in pieces.items() if k in specials)


def test_a_prompt_ending_inside_a_character_is_not_repeated(eng):
    # the stream's context is cut back to whole characters; before, the first text of such a
    # prompt was the prompt's own text
    tok = eng.tokenizer
    prompt = tok.encode("The quick 日", add_special_tokens=False)
    assert tok.decode(prompt[:-1]).endswith("\ufffd")  # the test needs a split character
    ids = tok.encode(" Pa bc", add_special_tokens=False)
    for pieces in (None, BytePieces.of(tok)):
        d = IncrementalDetokenizer(tok, prompt[:-1], pieces=pieces)
        got = "".join(d.push([t]) for t in ids) + d.push([], final=True)
        assert got == d.text == " Pa bc"
    out = eng.generate([prompt[:-1]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    sample = out.samples[0]
    assert sample.text == tok.decode(sample.token_ids, skip_special_tokens=True)


def test_a_prompt_of_replacement_characters_keeps_the_decoders_spacing():
    # every piece of the prompt's window ends in U+FFFD: the stream cannot start on it, and no
    # context at all would drop a Metaspace decoder's leading space; the window decode runs until
    # the first text, then the stream takes over
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "\u2581\ufffd": 1, "\u2581Hello": 2, "\u2581world": 3, "\ufffd": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    for prompt in ([1, 1, 1], [4, 4], [2, 1], []):
        for chunk in (1, 3):
            gen = [2, 3, 2, 3]
            d = IncrementalDetokenizer(tok, prompt)
            got = "".join(d.push(gen[i:i + chunk]) for i in range(0, len(gen), chunk))
            got += d.push([], final=True)
            before = backend.decode(prompt) if prompt else ""
            expected = backend.decode(prompt + gen)[len(before):] if prompt else backend.decode(gen)
            assert got == d.text == expected, (prompt, chunk)
        d = IncrementalDetokenizer(tok, prompt)
        d.push([2])
        assert d.lean  # the stream runs once the first text is out


def test_stop_string_text_is_held_back_and_never_emitted(eng):
    ids = eng.tokenizer.encode("ab日本cd€ef", add_special_tokens=False)
    d = IncrementalDetokenizer(eng.tokenizer, [], stop=["本cd", "zz"])
    out = ""
    for t in ids:
        out += d.push([t])
        assert "本" not in out  # the start of a possible stop string is never emitted early
    out += d.push([], final=True)
    assert d.stopped and out == d.text == "ab日"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deltas_add_up_to_the_output_for_multibyte_prompts(eng, seed):
    rng = random.Random(seed)
    prompts = ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 10))) for _ in range(4)]
    params = SamplingParams(temperature=1.0, max_tokens=rng.randint(5, 20), n=rng.choice([1, 3]),
                            seed=seed, score=rng.random() < 0.5)
    finals, joined, ends = _stream(eng, prompts, params)
    for rid, out in finals.items():
        assert len(out.samples) == params.n
        for s in out.samples:
            text, toks = joined[(rid, s.index)]
            assert toks == s.token_ids and text == s.text
            assert text == eng.tokenizer.decode(s.token_ids, skip_special_tokens=True)
            assert ends[(rid, s.index)] == s.finish_reason
    assert eng.num_free_blocks == 512


def test_stop_strings_cut_streamed_and_final_text(eng):
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(5, eng.model.config.vocab_size, (7,), generator=g).tolist()
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    free = eng.generate([prompt], greedy)[0].samples[0]
    assert free.text == eng.tokenizer.decode(free.token_ids, skip_special_tokens=True)
    stop = free.text[len(free.text) // 3: len(free.text) // 3 + 3]
    assert len(stop.strip()) >= 2, "the random model should produce visible text"
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop, "\x00never"], n=2)
    finals, joined, ends = _stream(eng, [prompt], params)
    [out] = finals.values()
    for s in out.samples:
        assert s.finish_reason == "stop" and stop not in s.text
        assert free.text.startswith(s.text) and free.text[len(s.text):].startswith(stop)
        assert joined[(out.request_id, s.index)][0] == s.text


def test_policy_samples_stream_with_pruning(eng):
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(5, eng.model.config.vocab_size, (9,), generator=g).tolist()
    params = SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, seed=5)
    finals, joined, ends = _stream(eng, [prompt], params, Prune(4, checkpoints=(3,), keep=0.5))
    [out] = finals.values()
    assert sorted(ends.values()) == ["length", "length", "pruned", "pruned"]
    for s in out.samples:
        assert joined[(out.request_id, s.index)] == (s.text, s.token_ids)
    assert eng.num_free_blocks == 512


def test_top_logprobs_are_the_models_most_likely_tokens(eng, llama_dir):
    """logprobs=k: at every position the k most likely tokens under the untempered model, from
    the same logits a full forward of the sampled text gives; the sampled token's log-probability
    sits among them when it is likely enough (greedy: it is the first)."""
    prompt = [5, 6, 7, 8]
    greedy = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, logprobs=3,
                                                   ignore_eos=True))[0].samples[0]
    assert len(greedy.top_logprobs) == 6 and all(len(top) == 3 for top in greedy.top_logprobs)
    hf = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()  # the oracle
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + greedy.token_ids[:-1]])).logits[0, len(prompt) - 1:]
    want = ref.float().log_softmax(-1).topk(3, dim=-1)
    for top, values, ids, token, lp in zip(greedy.top_logprobs, want.values, want.indices,
                                            greedy.token_ids, greedy.logprobs):
        assert [t for t, _ in top] == ids.tolist() and top[0][0] == token
        assert [v for _, v in top] == pytest.approx(values.tolist(), abs=1e-4)
        assert top[0][1] == pytest.approx(lp, abs=1e-5)
    plain = eng.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))[0]
    assert plain.samples[0].top_logprobs == [] and plain.samples[0].token_ids == greedy.token_ids
    finals, _, _ = _stream(eng, [prompt], SamplingParams(temperature=1.0, max_tokens=5, n=2, seed=4,
                                                          logprobs=2))
    for s in next(iter(finals.values())).samples:
        assert len(s.top_logprobs) == len(s.token_ids) == len(s.logprobs)
        for top, token, lp in zip(s.top_logprobs, s.token_ids, s.logprobs):
            assert top[0][1] >= top[1][1]
            assert dict(top).get(token, lp) == pytest.approx(lp, abs=1e-5)  # sampled: the same value


def _outputs(eng, prompts, params, policy=None, deltas_from: int | None = None):
    """Run to the end with step() (finished requests only), switching to step_deltas() at step
    deltas_from; (outputs by prompt, the deltas' text and tokens joined by (prompt, index))."""
    ids = [eng.add_request(p, params, policy) for p in prompts]
    outs, joined, steps = {}, {}, 0
    while eng.has_unfinished_requests():
        if deltas_from is None or steps < deltas_from:
            done = eng.step()
        else:
            done = []
            for delta in eng.step_deltas():
                for d in delta.samples:
                    text, toks = joined.get((ids.index(delta.request_id), d.index), ("", []))
                    joined[(ids.index(delta.request_id), d.index)] = (text + d.text, toks + d.token_ids)
                if delta.finished:
                    done.append(delta.output)
        steps += 1
        for o in done:
            outs[ids.index(o.request_id)] = o
    return outs, joined


@pytest.mark.parametrize("policy", [None, Prune(4, checkpoints=(3,), keep=0.5)])
def test_final_only_steps_give_the_streamed_outputs(eng, policy):
    """step() leaves text for the end when no stop string needs it (and builds no deltas for
    running requests); outputs are those of step_deltas(), and switching to step_deltas() midway
    delivers everything the skipped steps held, text included."""
    rng = random.Random(7)
    prompts = [eng.tokenizer.encode("".join(rng.choice(PIECES) for _ in range(6)), add_special_tokens=False)
               for _ in range(3)]
    stop = eng.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))[0]
    n = 1 if policy is not None else 2  # a policy draws its own samples
    for params in (SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=3, n=n),
                   SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True, seed=3, n=n,
                                  stop=[stop.samples[0].text[4:6] or "\x00"])):
        ref, _ = _outputs(eng, prompts, params, policy, deltas_from=0)
        final_only, _ = _outputs(eng, prompts, params, policy)
        mixed, joined = _outputs(eng, prompts, params, policy, deltas_from=4)
        for k, r in ref.items():
            for got in (final_only[k], mixed[k]):
                assert [(s.text, s.token_ids, s.finish_reason) for s in got.samples] == \
                       [(s.text, s.token_ids, s.finish_reason) for s in r.samples]
            for s in mixed[k].samples:  # the deltas after the switch carry the steps before it
                assert joined[(k, s.index)] == (s.text, s.token_ids)
    assert eng.num_free_blocks == 512


def test_final_only_steps_report_each_request_where_streaming_does(llama_dir):
    """step() reports a request in the step, and at the place, where step_deltas() reports it
    finished, however it ends (length, stop token, stop string, end score, n > 1): a final-only
    step looks only at the requests a step changed, in the step's order."""
    rng = random.Random(11)
    prompts = [[rng.randrange(5, 200) for _ in range(3 + i)] for i in range(8)]
    params = [SamplingParams(temperature=1.0, max_tokens=3 + 2 * i % 7, seed=i, n=1 + i % 2, score=i % 3 == 0,
                             stop=[";", "%"] if i % 4 == 1 else None, stop_token_ids=[77] if i == 3 else None)
              for i in range(8)]

    def finished(final_only):
        eng = Engine(str(llama_dir), block_size=4, num_blocks=512)  # a fresh prefix cache each time
        ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
        order, steps = [], 0
        while eng.has_unfinished_requests():
            done = ([o.request_id for o in eng.step()] if final_only
                    else [d.request_id for d in eng.step_deltas() if d.finished])
            order += [(steps, ids.index(r)) for r in done]
            steps += 1
        return order

    assert finished(final_only=True) == finished(final_only=False)


def test_plain_requests_stream_the_general_paths_deltas(llama_dir):
    """decode_delta (a plain request's decode step: advance_text and delta at once) gives every
    step the deltas the general path gives, field for field, beside requests it does not take
    (n > 1, stop strings, top logprobs, scores, a policy) and through characters split across
    tokens, stop tokens, lengths and an abort."""
    rng = random.Random(5)
    prompts = [[rng.randrange(5, 250) for _ in range(2 + i % 5)] for i in range(10)]
    params = [SamplingParams(temperature=1.0, max_tokens=6 + 3 * i, seed=i, ignore_eos=i % 2 == 0,
                             stop_token_ids=[rng.randrange(5, 250) for _ in range(8)] if i == 4 else None,
                             n=2 if i == 5 else 1, stop=["e"] if i == 6 else None,
                             logprobs=2 if i == 7 else 0, score_at=(3,) if i == 8 else ())
              for i in range(10)]

    def run(fast, rows=False):
        eng = Engine(str(llama_dir), block_size=4, num_blocks=512)
        if not fast:
            eng.core.outputs.decode_delta = lambda request, journal, rows=None: None
        calls = []
        decode_delta = eng.core.outputs.decode_delta

        def counted(request, journal, rows=None):
            d = decode_delta(request, journal, rows)
            calls.append(d is not None)
            return d

        def one_step():  # rows: the one-token deltas as TokenDeltas rows, put back in request order
            if not rows:
                return eng.step_deltas()
            deltas, tokens = eng.step_token_deltas()
            calls.append(-len(tokens))
            return sorted(tokens.merge_into(deltas), key=lambda d: d.request_id)

        eng.core.outputs.decode_delta = counted
        ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
        ids.append(eng.add_request(prompts[0], SamplingParams(temperature=1.0, max_tokens=30, seed=9),
                                   Prune(3, checkpoints=(2,), keep=0.5)))
        steps = []
        for step in range(200):
            if not eng.has_unfinished_requests():
                break
            if step == 5:
                eng.abort(ids[2])
            steps.append([(d.request_id, d.finished,
                           [(s.index, s.token_ids, s.text, s.logprobs, s.finish_reason, s.score,
                             s.checkpoint_scores, s.top_logprobs) for s in d.samples],
                           d.output and [(s.token_ids, s.text, s.finish_reason) for s in d.output.samples])
                          for d in one_step()])
        assert eng.num_free_blocks == 512
        return steps, calls

    fast, calls = run(True)
    assert sum(calls) > 40  # the fast path took most plain decode steps
    assert run(False)[0] == fast
    in_rows, calls = run(True, rows=True)
    assert -sum(c for c in calls if c < 0) > 40  # most of them went as rows
    assert in_rows == [sorted(deltas, key=lambda d: d[0]) for deltas in fast]


def test_a_plain_request_scored_in_flight_streams_its_score_in_that_step(llama_dir):
    """Engine.score_in_flight gives a plain request a checkpoint score: the step that lands it
    streams it (decode_delta leaves that step to the general path), sync and async alike."""
    def run(fast, async_scheduling):
        eng = Engine(str(llama_dir), block_size=4, num_blocks=128, async_scheduling=async_scheduling)
        if not fast:
            eng.core.outputs.decode_delta = lambda request, journal, rows=None: None
        rid = eng.add_request([5, 6, 7], SamplingParams(max_tokens=8, ignore_eos=True, seed=3))
        log = []
        for step in range(50):
            if not eng.has_unfinished_requests():
                break
            if step == 3:
                assert eng.score_in_flight(rid) == 1
            log += [(step, s.token_ids, s.checkpoint_scores) for d in eng.step_deltas() for s in d.samples]
        return log

    for async_scheduling in (False, True):
        fast = run(True, async_scheduling)
        assert fast == run(False, async_scheduling)
        scored = [(step, scores) for step, _, scores in fast if scores]
        assert len(scored) == 1 and scored[0][0] <= 4  # in the step that scored it, not at the end


def test_deltas_cross_a_pickle_whole(eng):
    # the engine process pickles every step's deltas to the server's (engine.async_engine): each
    # field comes back, the last delta's full output too
    import pickle

    params = SamplingParams(temperature=1.0, max_tokens=6, seed=4, n=2, logprobs=2, score_at=(2,),
                            ignore_eos=True)
    eng.add_request([5, 6, 7], params)
    sent = []
    while eng.has_unfinished_requests():
        sent += eng.step_deltas()
    back = pickle.loads(pickle.dumps(sent))
    assert back == sent and back[-1].finished and back[-1].output is not None
    assert any(d.checkpoint_scores for delta in back for d in delta.samples)
    assert any(d.top_logprobs and d.finish_reason for delta in back for d in delta.samples)


def test_every_delta_field_crosses_a_pickle():
    # __reduce__ lists the fields by position: each one set to a value of its own must come back
    import dataclasses
    import pickle

    from engine.sampling import RequestDelta, SampleDelta

    sample = SampleDelta(3, [7, 8], "ab", [-0.5, -1.0], "stop", (0.9, 0.8, 0.1), [(4, 0.7)], [[(7, -0.5)]])
    delta = RequestDelta(11, [sample], True, "an output")
    for obj in (sample, delta):
        back = pickle.loads(pickle.dumps(obj))
        assert type(back) is type(obj)
        for f in dataclasses.fields(obj):
            assert getattr(back, f.name) == getattr(obj, f.name), f.name
            assert getattr(obj, f.name) != f.default, f.name  # no field left at its default


def test_detokenize_false_streams_the_same_tokens_with_no_text(llama_dir):
    """SamplingParams(detokenize=False), vLLM's: the tokens and logprobs of a run with text, and
    empty text in every delta and output; stop strings, which match text, are refused."""
    prompts = [[5, 6, 7], [8, 9], [10]]
    params = [SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True, seed=i, n=1 + (i == 1))
              for i in range(3)]

    def run(detokenize):
        eng = Engine(str(llama_dir), block_size=4, num_blocks=256)
        ids = [eng.add_request(p, replace(sp, detokenize=detokenize)) for p, sp in zip(prompts, params)]
        texts, finals = [], {}
        while eng.has_unfinished_requests():
            for d in eng.step_deltas():
                texts += [s.text for s in d.samples]
                if d.finished:
                    finals[d.request_id] = d.output
        assert eng.num_free_blocks == 256
        outs = [[(s.token_ids, s.logprobs) for s in finals[i].samples] for i in ids]
        return outs, texts, [s.text for i in ids for s in finals[i].samples]

    with_text, texts, final_texts = run(True)
    without, no_texts, no_final_texts = run(False)
    assert without == with_text and any(texts) and all(final_texts)
    assert not any(no_texts) and not any(no_final_texts)
    with pytest.raises(InvalidRequestError, match="detokenize"):
        SamplingParams(stop=["a"], detokenize=False)
    with pytest.raises(InvalidRequestError, match="detokenize"):
        SamplingParams(detokenize=1)
