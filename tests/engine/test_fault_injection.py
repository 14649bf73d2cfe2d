"""A step is all or nothing: an exception (or Ctrl-C) at any phase of any step, after that phase
changed state, is undone (a one-off error is raised to the caller once the engine finds that no
request fails alone), and stepping on gives exactly the outputs of an uninterrupted run:
greedy, seeded n > 1, a pruning policy, mid-generation scores, a shared prefix (cache hits) and a
cache small enough to preempt."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import Engine, SamplingParams
from engine.policies import Prune
from engine.sampling import RequestOutput

PHASES = ["schedule", "forward", "sample", "update"]


class Injected(Exception):
    pass


def _requests(vocab):
    g = torch.Generator().manual_seed(11)
    system = torch.randint(5, vocab, (13,), generator=g).tolist()
    prompts = [system + torch.randint(5, vocab, (n,), generator=g).tolist() for n in (2, 7, 4, 9)]
    return [
        (prompts[0], SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, score_at=(3,)), None),
        (prompts[1], SamplingParams(temperature=1.0, max_tokens=10, ignore_eos=True, n=3, seed=5), None),
        (prompts[2], SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True, seed=6),
         Prune(4, checkpoints=(3,), keep=0.5)),
        (prompts[3], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), None),
    ]


def _run(llama_dir, faults=(), exc=Injected):
    eng = Engine(str(llama_dir), block_size=4, num_blocks=40, max_batch_tokens=64)
    ids = [eng.add_request(p, sp, pol) for p, sp, pol in _requests(eng.model.config.vocab_size)]
    pending = {step: phase for step, phase in faults}
    originals = {"schedule": eng.core.scheduler.schedule, "forward": eng.core.runner.execute,
                 "sample": eng.core._sample, "update": eng.core.scheduler.update_from_output}
    targets = {"schedule": eng.core.scheduler, "forward": eng.core.runner, "sample": eng.core,
               "update": eng.core.scheduler}
    names = {"schedule": "schedule", "forward": "execute", "sample": "_sample",
             "update": "update_from_output"}
    outs, step, raised = {}, 0, 0
    while eng.has_unfinished_requests():
        phase = pending.pop(step, None)
        if phase is not None:  # the phase runs (and changes state), then raises, once
            fired = []

            def boom(*a, _f=originals[phase], _fired=fired, **k):
                result = _f(*a, **k)
                if not _fired:
                    _fired.append(1)
                    raise exc("injected")
                return result
            setattr(targets[phase], names[phase], boom)
        try:
            for out in eng.step():
                outs[out.request_id] = out
        except (Injected, KeyboardInterrupt):
            raised += 1
        finally:
            if phase is not None:
                setattr(targets[phase], names[phase], originals[phase])
        step += 1
        assert step < 500, "the engine stopped making progress"
    assert eng.num_free_blocks == 40
    result = [[(s.token_ids, s.text, s.finish_reason, s.score, s.checkpoint_scores) for s in outs[i].samples]
              for i in ids]
    return result, raised, step


@pytest.fixture(scope="module")
def baseline(llama_dir):
    result, _, steps = _run(llama_dir)
    assert steps > 11  # every fault below lands on a step that runs
    return result


@settings(max_examples=12, deadline=None)
@given(faults=st.lists(st.tuples(st.integers(0, 10), st.sampled_from(PHASES)), min_size=1, max_size=4,
                       unique_by=lambda f: f[0]),
       interrupt=st.booleans())
def test_faults_at_any_phase_leave_the_outputs_unchanged(llama_dir, baseline, faults, interrupt):
    got, raised, _ = _run(llama_dir, faults, KeyboardInterrupt if interrupt else Injected)
    # A fault on a step that never runs that phase (no sample rows, say) raises nothing.
    assert raised >= 1 or all(phase == "sample" for _, phase in faults)
    assert got == baseline


def test_generate_interrupted_leaves_nothing_behind(llama_dir, monkeypatch):
    eng = Engine(str(llama_dir), block_size=4, num_blocks=64)
    calls = {"n": 0}
    real = eng.core.runner.execute

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(eng.core.runner, "execute", flaky)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    with pytest.raises(KeyboardInterrupt):
        eng.generate([[5, 6, 7], [8, 9]], params)
    assert not eng.has_unfinished_requests() and eng.num_free_blocks == 64
    assert [len(o.samples[0].token_ids) for o in eng.generate([[5, 6, 7]], params)] == [8]


def reject_temperature(eng, monkeypatch, temperature=0.5):
    """Make eng's sampler raise on any step with a sample at `temperature`: that request's own
    input makes every step it is in fail."""
    real = eng.core._sample

    def picky(out, logits, *rest):
        if any(s.temperature == temperature for s in out.sample_seqs):
            raise ValueError("unsupported temperature")
        return real(out, logits, *rest)

    monkeypatch.setattr(eng.core, "_sample", picky)


def test_a_request_that_makes_every_step_fail_is_failed_alone(llama_dir, monkeypatch):
    """Its own input (here: a temperature the sampler rejects) fails it; the others go on."""
    eng = Engine(str(llama_dir), block_size=4, num_blocks=64)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    expected = eng.generate([[5, 6, 7], [9, 10]], params)
    reject_temperature(eng, monkeypatch)
    bad = SamplingParams(temperature=0.5, max_tokens=6, ignore_eos=True)
    outs = eng.generate([[5, 6, 7], [1, 2, 3], [9, 10]], [params, bad, params])
    assert [o.samples[0].token_ids for o in (outs[0], outs[2])] == [e.samples[0].token_ids for e in expected]
    assert "unsupported temperature" in outs[1].error and outs[1].samples[0].finish_reason == "error"
    assert eng.num_free_blocks == 64 and not eng.has_unfinished_requests()


@pytest.mark.parametrize("max_num_seqs", [1, 2, 256])
def test_a_poisoned_request_fails_alone_whatever_the_queue(llama_dir, max_num_seqs):
    """Requests queued past max_num_seqs are put back exactly after the probes that find it."""
    def run(poison):
        eng = Engine(str(llama_dir), block_size=4, num_blocks=64, max_num_seqs=max_num_seqs)
        real = eng.core.runner.execute

        def execute(step, *a, **k):
            if poison and 299 in step.token_ids.tolist():
                raise RuntimeError("poisoned batch")
            return real(step, *a, **k)

        eng.core.runner.execute = execute
        prompts = [[10, 11, 12], [299, 5, 6], [20, 21], [30, 31, 32, 33]]
        params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, n=2 if i == 3 else 1)
                  for i in range(4)]
        outs = eng.generate(prompts, params)
        assert eng.num_free_blocks == 64 and not eng.has_unfinished_requests()
        return [(o.error, [(s.token_ids, s.finish_reason) for s in o.samples]) for o in outs]

    clean, poisoned = run(False), run(True)
    assert [poisoned[i] for i in (0, 2, 3)] == [clean[i] for i in (0, 2, 3)]
    assert "poisoned batch" in poisoned[1][0] and poisoned[1][1] == [([], "error")]


def _drain(eng, max_steps=200):
    """Step until nothing is unfinished, keeping every delivered output; an interrupt or error
    raised out of a step is swallowed (the caller's loop goes on, as a server's would)."""
    outs = {}
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            return outs
        try:
            for out in eng.step():
                outs[out.request_id] = out
        except (KeyboardInterrupt, Exception):
            pass
    raise AssertionError(f"still unfinished after {max_steps} steps: delivered {sorted(outs)}")


def _stream_to_the_end(eng, ids, step, streamed_ids=None, max_steps=300):
    """Call step() until nothing is unfinished, counting the KeyboardInterrupts raised out of it
    (the caller's loop goes on, as a server's would). step() gives deltas (step_deltas) or the
    finished requests' outputs (step); the deltas streamed for streamed_ids (default: every
    request) must add up to each sample's output. Returns (outputs by request id, interrupts)."""
    streamed, final, raised, deltas = {}, {}, 0, False
    for _ in range(max_steps):
        if not eng.has_unfinished_requests():
            break
        try:
            got = step()
        except KeyboardInterrupt:
            raised += 1
            continue
        for d in got:
            if isinstance(d, RequestOutput):
                final[d.request_id] = d
                continue
            deltas = True
            for s in d.samples:
                tokens, text = streamed.get((d.request_id, s.index), ([], ""))
                streamed[d.request_id, s.index] = (tokens + s.token_ids, text + s.text)
            if d.finished:
                final[d.request_id] = d.output
    assert set(final) == set(ids)
    if deltas:
        for i in ids if streamed_ids is None else streamed_ids:
            for s in final[i].samples:
                assert streamed[i, s.index] == (s.token_ids, s.text)
    return final, raised


def test_a_failing_scorer_fails_its_request_and_every_other_is_delivered(llama_dir):
    from engine.policies import BestOfN, Scorer

    class Broken(Scorer):
        def __call__(self, seq, upto=None):
            raise ZeroDivisionError("scorer bug")

    greedy = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    expected = Engine(str(llama_dir)).generate([[5, 6, 7]], greedy)[0].samples[0].token_ids
    eng = Engine(str(llama_dir))
    sampled = SamplingParams(max_tokens=5, ignore_eos=True)
    bad = eng.add_request([5, 6, 7], sampled, BestOfN(2, scorer=Broken()))
    good = eng.add_request([5, 6, 7], greedy)
    outs = _drain(eng)  # before the fix: the bad request's output raised and took the good one with it
    assert set(outs) == {bad, good}
    assert "scorer" in (outs[bad].error or "") and outs[good].error is None
    assert outs[good].samples[0].token_ids == expected


def test_an_interrupt_while_outputs_are_made_delivers_them_on_the_next_step(llama_dir):
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    expected = [o.samples[0].token_ids for o in Engine(str(llama_dir)).generate(prompts, greedy)]
    eng = Engine(str(llama_dir))
    ids = [eng.add_request(p, greedy) for p in prompts]
    delta, fired = eng.core.outputs.delta, []

    def interrupted(request, journal=None, rows=None):  # Ctrl-C while the step that finishes them builds
        if request.finished and not fired:                # its outputs
            fired.append(request.request_id)
            raise KeyboardInterrupt
        return delta(request, journal, rows)

    eng.core.outputs.delta = interrupted
    outs = _drain(eng)
    assert fired and set(outs) == set(ids)
    assert [outs[i].samples[0].token_ids for i in ids] == expected


def _steps_of(eng, rows: bool):
    """eng.step_deltas, or (rows) a step whose one-token deltas come as TokenDeltas rows."""
    if not rows:
        return eng.step_deltas

    def step():
        deltas, tokens = eng.step_token_deltas()
        return tokens.merge_into(deltas)
    return step


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("after", [False, True])
@pytest.mark.parametrize("call", [2, 5, 9, 14])
def test_an_interrupt_while_deltas_are_built_loses_nothing_streamed(llama_dir, call, after, rows):
    """Ctrl-C in the output phase, before or after a request's delta was built (by delta() or by
    decode_delta(), the plain requests' decode steps, as an object or a TokenDeltas row): the
    deltas built before it come with the next step's, so the streamed tokens and text add up to
    the output."""
    params = [SamplingParams(temperature=1.0, max_tokens=7, ignore_eos=True, seed=i, n=1 + (i == 1))
              for i in range(3)]
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]

    def run(fault):
        eng = Engine(str(llama_dir))
        ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
        outputs, calls = eng.core.outputs, []

        def interrupting(build):
            def interrupted(request, journal=None, *rest):
                calls.append(request.request_id)
                if fault and len(calls) == call:
                    if after:
                        build(request, journal, *rest)
                    raise KeyboardInterrupt
                return build(request, journal, *rest)
            return interrupted

        outputs.delta, outputs.decode_delta = interrupting(outputs.delta), interrupting(outputs.decode_delta)
        final, raised = _stream_to_the_end(eng, ids, _steps_of(eng, rows))
        assert raised == fault
        return [[(s.token_ids, s.text) for s in final[i].samples] for i in ids]

    assert run(True) == run(False)


@pytest.mark.parametrize("rows", [False, True])
@pytest.mark.parametrize("where", ["push_token", "push", "advance_text", "delta", "decode_delta"])
def test_a_real_ctrl_c_in_the_text_and_output_phases_loses_nothing(llama_dir, monkeypatch, where, rows):
    """SIGINT itself (signal.raise_signal), at calls inside the text and delta code, where Python's
    handler would raise between two statements: held back to the end of the output phase, then
    raised. The streamed deltas add up to each output, and the outputs are an uninterrupted run's."""
    import signal

    from engine.detokenizer import IncrementalDetokenizer
    from engine.outputs import OutputProcessor

    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14, 15]]
    params = [SamplingParams(temperature=1.0, max_tokens=9, ignore_eos=True, seed=i, n=1 + (i == 1),
                             stop=["\x00"] if i == 2 else None) for i in range(4)]

    def run():
        eng = Engine(str(llama_dir))
        ids = [eng.add_request(p, sp) for p, sp in zip(prompts, params)]
        final, raised = _stream_to_the_end(eng, ids, _steps_of(eng, rows))
        return [[(s.token_ids, s.text) for s in final[i].samples] for i in ids], raised

    clean, _ = run()
    owner = IncrementalDetokenizer if where in ("push_token", "push") else OutputProcessor
    real, calls = getattr(owner, where), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) % 7 == 3:
            signal.raise_signal(signal.SIGINT)  # Python's handler would raise right here
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, where, interrupted)
    got, raised = run()
    assert raised > 0 and got == clean


@pytest.mark.parametrize("mode", ["deltas", "final_only", "rows"])
def test_a_real_ctrl_c_at_any_line_of_a_step_loses_nothing_and_wedges_nothing(llama_dir, mode):
    """SIGINT at line events of engine/core.py spread over a run (after the commit, in the policy
    loop, around the hold, in the output phase's tail...), with an Adaptive, a Prune, an n=2 and a
    stop-string request: every request ends with the uninterrupted run's output, the streamed
    deltas add up to it, and every KV block comes back. Inside the transaction the step is undone;
    anywhere else the Ctrl-C is held to the end of the step (or raised by the next one). Not
    fired: once step() has put Python's handler back (its last lines), where a Ctrl-C still
    raises before the step's deltas reach the caller (the window _HeldInterrupt documents)."""
    import signal
    import sys

    import engine.core as core_mod
    from engine.policies import Adaptive, Prune

    def run(fire_at=None):
        eng = Engine(str(llama_dir), block_size=4, num_blocks=256)
        base = eng.num_free_blocks
        ids = [eng.add_request([18, 19], SamplingParams(max_tokens=6, seed=6, ignore_eos=True),
                               Adaptive(threshold=2.0, max_samples=4, rounds=(1, 1, 2))),
               eng.add_request([20, 21, 22], SamplingParams(max_tokens=8, seed=7, ignore_eos=True),
                               Prune(3, checkpoints=(3,), keep=0.5)),
               eng.add_request([23], SamplingParams(max_tokens=7, seed=8, ignore_eos=True, n=2)),
               eng.add_request([24, 25], SamplingParams(max_tokens=7, seed=9, ignore_eos=True,
                                                        stop=["\x00"]))]
        lines = [0]
        step = _steps_of(eng, mode == "rows")

        source = open(core_mod.__file__).read().splitlines()
        tail = ("held.restore()", "self._held = None", "self._interrupt_pending = True")

        def tracer(frame, event, arg):
            if frame.f_code.co_filename != core_mod.__file__ or frame.f_code.co_name == "restore":
                return None
            if event == "line" and not (frame.f_code.co_name == "step"
                                         and source[frame.f_lineno - 1].strip().startswith(tail)):
                lines[0] += 1
                if lines[0] == fire_at:
                    signal.raise_signal(signal.SIGINT)
            return tracer

        def traced():
            sys.settrace(tracer if fire_at else None)
            try:
                return eng.step() if mode == "final_only" else step()
            finally:
                sys.settrace(None)

        # the requests without a policy stream every sample
        final, raised = _stream_to_the_end(eng, ids, traced, streamed_ids=ids[2:])
        assert eng.num_free_blocks == base
        outs = [[(s.token_ids, s.text, s.finish_reason) for s in final[i].samples] for i in ids]
        return outs, raised, lines[0]

    clean, _, total = run(fire_at=-1)  # counts the line events, fires none
    for fire_at in range(1, total, max(1, total // 40)):
        outs, raised, _ = run(fire_at)
        assert raised <= 1 and outs == clean, fire_at
