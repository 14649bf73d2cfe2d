"""Async scheduling (EngineConfig.async_scheduling): the next decode step is launched before the
host has the current step's tokens, and the outputs are exactly the synchronous loop's: tokens,
text, logprobs, top logprobs, confidences, finish reasons, scores at checkpoints, pruning, stop
tokens and strings that end a sample while its next row is already computed, aborts between
steps, a cache small enough to preempt, and errors or Ctrl-C with a step in flight. Each test also
checks that steps did run ahead (and rows were discarded where a sample ended), so none passes
by falling back to the synchronous loop."""

import pytest
import torch

from engine import Engine, SamplingParams
from engine.errors import InvalidRequestError
from engine.policies import Adaptive, BestOfN, Prune
from engine.runner import ModelRunner


def _engine(llama_dir, async_scheduling, static=False, **kw):
    kw = {"block_size": 4, "num_blocks": 200, "max_batch_tokens": 256, **kw}
    eng = Engine(str(llama_dir), async_scheduling=async_scheduling, **kw)
    if static:  # the decode-graph path's padded static buffers (what a CUDA graph replays)
        core = eng.core
        core.runner = ModelRunner(core.model, core.device, core.dtype, core.runner.num_blocks,
                                  core.runner.block_size, core.max_model_len, graphs="static",
                                  max_graph_batch=16)
    return eng


def _workload(vocab):
    g = torch.Generator().manual_seed(3)
    out = []
    for i in range(8):
        prompt = torch.randint(5, vocab, (3 + i,), generator=g).tolist()
        params = SamplingParams(
            temperature=(0.0, 1.0)[i % 2], max_tokens=15 + 3 * i, seed=i, n=(1, 2, 3)[i % 3] if i != 5 else 1,
            ignore_eos=i % 4 == 0, logprobs=2 if i == 3 else 0,
            stop_token_ids=[7, 9, 11, 13] if i % 2 else [],  # sampled rows stop early
            score_at=(4,) if i == 2 else ())
        policy = Prune(4, checkpoints=(3,), keep=0.5) if i == 5 else None
        out.append((prompt, params, policy))
    return out


def _outputs(eng, requests, on_step=None):
    """Each request's final samples (with the text its deltas streamed), or None if it never
    finished (aborted)."""
    ids = [eng.add_request(*r) for r in requests]
    final, streamed, steps = {}, {}, 0
    while eng.has_unfinished_requests():
        for d in eng.step_deltas():
            for s in d.samples:
                tokens, text = streamed.get((d.request_id, s.index), ([], ""))
                streamed[d.request_id, s.index] = (tokens + s.token_ids, text + s.text)
            if d.finished:
                final[d.request_id] = d.output
        steps += 1
        if on_step is not None:
            on_step(eng, steps, ids)
        assert steps < 1000
    assert eng.num_free_blocks == eng.core.block_manager.num_blocks
    return [None if i not in final else
            [(s.token_ids, s.text, streamed.get((i, s.index)), s.finish_reason, s.logprobs, s.top_logprobs,
              s.confidences, s.score, s.checkpoint_scores, s.pruned_at) for s in final[i].samples]
            for i in ids]


@pytest.mark.parametrize("static", [False, True])
def test_async_outputs_are_the_synchronous_loops(llama_dir, static):
    sync = _engine(llama_dir, False, static)
    expected = _outputs(sync, _workload(sync.model.config.vocab_size))
    eng = _engine(llama_dir, True, static)
    got = _outputs(eng, _workload(eng.model.config.vocab_size))
    assert sync.core.ahead_steps == 0
    assert eng.core.ahead_steps >= 10 and eng.core.ahead_rows_discarded >= 1
    assert [s[3] for r in got for s in r].count("stop") >= 1
    assert got == expected


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("graphs", [True, False])
def test_async_on_cuda_matches_the_synchronous_loop(llama_dir, graphs):
    """The CUDA-only parts: pinned draws read after an event, ids copied on the device into a
    replayed graph's buffer (or the eager path's), host buffers in turn, no stream waits."""
    kw = dict(device="cuda", dtype=torch.float32, cuda_graphs=graphs)
    sync = _engine(llama_dir, False, **kw)
    expected = _outputs(sync, _workload(sync.model.config.vocab_size))
    eng = _engine(llama_dir, True, **kw)
    got = _outputs(eng, _workload(eng.model.config.vocab_size))
    assert eng.core.ahead_steps >= 10 and eng.core.ahead_rows_discarded >= 1
    assert [[s[0] for s in r] for r in got] == [[s[0] for s in r] for r in expected]
    assert _same(got, expected, rel=1e-4)


def test_async_policies_and_stop_strings(llama_dir):
    """Best-of-n and adaptive sampling on self-evaluation scores and confidences, and a stop
    string that ends a sample only when its text is decoded (after the next step launched)."""
    def run(async_scheduling):
        eng = _engine(llama_dir, async_scheduling)
        vocab = eng.model.config.vocab_size
        prompt = torch.randint(5, vocab, (6,), generator=torch.Generator().manual_seed(4)).tolist()
        base = dict(max_tokens=20, ignore_eos=True, seed=9)
        free = _outputs(eng, [(prompt, SamplingParams(**base), None)])
        stop = next(t for t in free[0][0][1][4:] if t.strip())  # a character it prints mid-way
        requests = [
            (prompt, SamplingParams(**base, stop=[stop]), None),
            (prompt, SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=1),
             BestOfN(3, scorer="selfeval")),
            (prompt, SamplingParams(temperature=0.8, max_tokens=12, ignore_eos=True, seed=2),
             Adaptive(0.99, max_samples=4, rounds=(1, 1, 2), scorer="confidence")),
        ]
        return _outputs(eng, requests), eng.core
    expected, _ = run(False)
    got, core = run(True)
    assert core.ahead_steps >= 5 and core.ahead_rows_discarded >= 1
    assert got[0][0][3] == "stop"
    # Tokens, text, finish reasons exactly; log-probabilities and scores to float rounding: a step
    # that ran ahead holds rows a sample no longer needs, and the CPU GEMM may round a batch of
    # another size differently in the last bits (seen: 1e-7 relative on one logprob).
    assert _same(got, expected, rel=1e-5)


def test_abort_and_preemption_with_a_step_in_flight(llama_dir):
    def abort_third(eng, steps, ids):
        if steps == 6:
            eng.abort(ids[2])

    def run(async_scheduling, num_blocks):
        eng = _engine(llama_dir, async_scheduling, num_blocks=num_blocks)
        requests = _workload(eng.model.config.vocab_size)
        preempted = []
        real = eng.core.scheduler.preempt
        eng.core.scheduler.preempt = lambda seq: (preempted.append(seq), real(seq))
        out = _outputs(eng, requests, abort_third)
        assert bool(preempted) == (num_blocks == 40)
        return out, eng.core
    for num_blocks in (200, 40):  # 40 blocks of 4: samples are preempted and recomputed
        expected, _ = run(False, num_blocks)
        got, core = run(True, num_blocks)
        assert core.ahead_steps >= 5 and got[2] is None
        if num_blocks == 200:
            assert _same(got, expected, rel=1e-5)  # floats to rounding, the rest exactly (as above)
        else:  # running ahead moves a preemption by a step: a sample recomputed after it has the
            # same tokens, its KV (a prefill's, not the decode steps') equal to rounding
            assert _same(got, expected, rel=1e-5)


def _same(a, b, rel):
    """Equal, floats to within rel."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= rel * max(abs(a), abs(b), 1e-30)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, rel) for x, y in zip(a, b))
    return a == b


def test_a_queue_longer_than_max_num_seqs_runs_ahead_with_the_same_tokens(llama_dir):
    """Requests wait for a slot: steps run ahead while every slot is taken, and a slot that a
    stop token frees is filled a step later; tokens as in the synchronous loop."""
    def run(async_scheduling):
        eng = _engine(llama_dir, async_scheduling, max_num_seqs=3)
        g = torch.Generator().manual_seed(5)
        requests = [(torch.randint(5, 384, (4,), generator=g).tolist(),
                     SamplingParams(temperature=1.0, max_tokens=12, seed=i,
                                    stop_token_ids=list(range(5, 40))),
                     None) for i in range(10)]
        return _outputs(eng, requests), eng.core
    expected, _ = run(False)
    got, core = run(True)
    assert core.ahead_steps >= 18 and core.ahead_rows_discarded >= 1  # 9 if nothing may wait
    assert [[s[0] for s in r] for r in got] == [[s[0] for s in r] for r in expected]
    assert _same(got, expected, rel=1e-4)


def test_arrivals_mid_run_draw_the_same_tokens(llama_dir):
    """A request added while a step is in flight joins a step later: its batches differ from
    the synchronous loop's, so floats may differ in rounding, never the tokens."""
    def run(async_scheduling):
        eng = _engine(llama_dir, async_scheduling)
        requests = _workload(eng.model.config.vocab_size)
        ids = [eng.add_request(*r) for r in requests[:3]]
        final, steps = {}, 0
        while eng.has_unfinished_requests() or len(ids) < len(requests):
            if steps % 3 == 2 and len(ids) < len(requests):
                ids.append(eng.add_request(*requests[len(ids)]))
            for o in eng.step():
                final[o.request_id] = o
            steps += 1
        assert eng.num_free_blocks == 200
        return [[(s.token_ids, s.finish_reason, s.logprobs, s.score, s.checkpoint_scores, s.pruned_at)
                 for s in final[i].samples] for i in ids], eng.core.ahead_steps
    expected, _ = run(False)
    got, ahead = run(True)
    assert ahead >= 10
    assert [[s[0] for s in r] for r in got] == [[s[0] for s in r] for r in expected]
    assert _same(got, expected, rel=1e-4)


class Injected(Exception):
    pass


@pytest.mark.parametrize("exc", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("where", ["forward", "sample", "update"])
def test_a_fault_with_a_step_in_flight_is_undone(llama_dir, exc, where):
    """The step launched ahead is forgotten (its samples' caches cut back) and computed again:
    the outputs are an uninterrupted run's."""
    expected = _outputs(_engine(llama_dir, False), _workload(384))
    eng = _engine(llama_dir, True)
    assert eng.model.config.vocab_size == 384
    core = eng.core
    target, name = {"forward": (core.runner, "execute"), "sample": (core, "_sample"),
                    "update": (core.scheduler, "update_from_output")}[where]
    real, fired, state = getattr(target, name), [], {}
    real_step = core._step_transaction

    def step(*a, **k):
        state["in_flight"] = core._flight is not None  # this step applies one launched ahead
        return real_step(*a, **k)

    def flaky(*a, **k):
        result = real(*a, **k)
        if state["in_flight"] and core.ahead_steps >= 4 and len(fired) < 3:
            fired.append(core.ahead_steps)
            raise exc("injected")
        return result

    setattr(target, name, flaky)
    core._step_transaction = step
    ids = [eng.add_request(*r) for r in _workload(384)]
    final, steps = {}, 0
    while eng.has_unfinished_requests():
        try:
            for o in eng.step():  # final outputs only (deltas=False)
                final[o.request_id] = o
        except (Injected, KeyboardInterrupt):
            pass
        steps += 1
        assert steps < 1000
    assert len(fired) == 3 and core.ahead_steps > fired[-1]
    assert eng.num_free_blocks == 200
    got = [[(s.token_ids, s.text, s.finish_reason, s.logprobs, s.top_logprobs, s.confidences, s.score,
             s.checkpoint_scores, s.pruned_at) for s in final[i].samples] for i in ids]
    assert got == [[x[:2] + x[3:] for x in r] for r in expected]


def test_a_request_that_fails_at_a_later_position_is_failed_alone(llama_dir):
    """Its failure first comes while launching the step ahead: the step is run again without it,
    and the next step (synchronous) finds the culprit, as the synchronous loop does."""
    def run(async_scheduling):
        eng = _engine(llama_dir, async_scheduling, num_blocks=64)
        real = eng.core.runner.execute

        def execute(step, *a, **k):
            if (step.positions >= 12).any():
                raise RuntimeError("poisoned position")
            return real(step, *a, **k)

        eng.core.runner.execute = execute
        greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        long = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        ids = [eng.add_request([5, 6, 7], greedy), eng.add_request([8, 9, 10, 11], long),
               eng.add_request([9, 10], greedy)]
        outs, steps = {}, 0
        while eng.has_unfinished_requests():
            for o in eng.step():  # nothing raises: the culprit is failed, the rest go on
                outs[o.request_id] = o
            steps += 1
            assert steps < 60
        assert eng.num_free_blocks == 64
        return [(outs[i].error, outs[i].samples[0].token_ids) for i in ids], eng.core.ahead_steps
    expected, _ = run(False)
    got, ahead = run(True)
    assert ahead >= 3 and "poisoned position" in got[1][0] and got[0][0] is None
    assert got == expected


def test_async_scheduling_settings(llama_dir):
    with pytest.raises(InvalidRequestError, match="async_scheduling"):
        Engine(str(llama_dir), async_scheduling="yes")
    with pytest.raises(InvalidRequestError, match="one process"):
        Engine(str(llama_dir), async_scheduling=True, tensor_parallel_size=2)
